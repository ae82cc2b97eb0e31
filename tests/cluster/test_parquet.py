"""cluster.parquet: the read each task of evaluate's and export's Ray datasets does (their Ray runs are tested in
tests/metrics/test_evaluate.py and tests/export/test_export.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.cluster.parquet import parquet_files_dataset, read_parquet_group


def test_a_group_of_files_is_read_in_order_with_only_the_named_columns(tmp_path):
    paths = []
    for k in range(3):
        path = str(tmp_path / f"part-{k}.parquet")
        pq.write_table(pa.table({"id": [f"{k}a", f"{k}b"], "n": [k, k], "big": [b"x" * 10, b"y"]}), path)
        paths.append(path)
    batch = {"files": np.array(["\n".join(paths[:2]), paths[2]], dtype=object)}
    table = read_parquet_group(batch, pafs.LocalFileSystem(), ["id", "n"])
    assert table.column_names == ["id", "n"]
    assert table["id"].to_pylist() == ["0a", "0b", "1a", "1b", "2a", "2b"]


def test_no_files_is_an_error_not_an_empty_dataset():
    with pytest.raises(ValueError, match="no Parquet files"):
        parquet_files_dataset([], pafs.LocalFileSystem(), ["id"])
