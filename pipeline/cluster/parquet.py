"""A Ray Dataset over Parquet files whose paths are already known (the output's parts): evaluate and export read
them this way.

Not ``ray.data.read_parquet``: on Ray 2.60 each call lists the paths again in a task that starts 32 footer-reading
actors (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS), 2-5 s before the first row even for a two-file output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["parquet_files_dataset"]

FILES_PER_TASK = 16  # parts of a few hundred rows each: one task reads a few MB, and 10M rows are ~2.5k items


def read_parquet_group(
    batch: dict[str, np.ndarray], filesystem: pafs.FileSystem, columns: list[str]
) -> pa.Table:
    """Ray Data UDF: newline-separated paths (column "files") -> their ``columns``, concatenated."""
    tables = [
        pq.read_table(path, columns=columns, filesystem=filesystem)
        for paths in batch["files"]
        for path in str(paths).split("\n")
    ]
    return pa.concat_tables(tables)


def parquet_files_dataset(
    paths: Sequence[str],
    filesystem: pafs.FileSystem,
    columns: Sequence[str],
    files_per_task: int = FILES_PER_TASK,
):
    """A Dataset of ``columns`` of ``paths`` (paths within ``filesystem``, as ``storage.filesystem`` gives them),
    read by one task per ``files_per_task`` files. The driver holds one item per task, not per file."""
    import ray.data

    if not paths:
        raise ValueError("no Parquet files to read")
    groups = ["\n".join(paths[i : i + files_per_task]) for i in range(0, len(paths), files_per_task)]
    ds = ray.data.from_items([{"files": g} for g in groups], override_num_blocks=len(groups))
    return ds.map_batches(
        read_parquet_group,
        fn_kwargs={"filesystem": filesystem, "columns": list(columns)},
        batch_size=1,
        batch_format="numpy",
    )
