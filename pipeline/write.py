"""Write stage: output rows -> committed Parquet parts under ``OUTPUT/masks/``, resume state, ``_manifest.json``.

Exactly-once by construction:
- a part's name is a digest of the sorted image ids it holds, so a retried task rewrites the same object instead of
  adding a second copy;
- a part is committed atomically (an S3 PUT appears whole or not at all; locally, temp file + rename), so files from a
  killed run are either whole parts (their images count as done) or invisible temp files (ignored and cleaned);
- a re-run lists the committed parts, reads only their ``image_id`` column and processes only the missing images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.storage import StorageConfig, delete, filesystem, join, list_files, read_bytes, write_bytes

__all__ = ["MASKS_DIR", "part_name", "write_part", "DoneSet", "load_done", "write_manifest", "read_manifest"]

log = logging.getLogger(__name__)

MASKS_DIR = "masks"
MANIFEST = "_manifest.json"


def part_name(image_ids: list[str]) -> str:
    """Deterministic part file name for a set of image ids (order-independent)."""
    digest = hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_part(table: pa.Table, output_uri: str, storage_cfg: StorageConfig) -> str:
    """Commit one part and return its URI. The table must follow ``schema.OUTPUT_SCHEMA``."""
    ids = table.column(S.ID).to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"a part may not hold an image twice: {[i for i, c in Counter(ids).items() if c > 1]}"
        )
    uri = join(output_uri, MASKS_DIR, part_name(ids))
    buf = io.BytesIO()
    pq.write_table(table.cast(S.OUTPUT_SCHEMA), buf, compression="zstd")
    write_bytes(uri, buf.getvalue(), storage_cfg)
    return uri


@dataclass
class DoneSet:
    """What committed parts already hold."""

    ids: set[str]
    parts: list[str]
    duplicates: list[str]  # ids found in more than one part (must stay empty)
    status_counts: Counter

    def __len__(self) -> int:
        return len(self.ids)


def load_done(output_uri: str, storage_cfg: StorageConfig) -> DoneSet:
    """Read the ``image_id``/``status`` columns of every committed part. Unreadable parts are removed (not done)."""
    ids: set[str] = set()
    dups: list[str] = []
    parts: list[str] = []
    statuses: Counter = Counter()
    for uri in list_files(join(output_uri, MASKS_DIR), storage_cfg, (".parquet",)):
        fs, path = filesystem(uri, storage_cfg)
        try:
            table = pq.read_table(path, columns=[S.ID, S.STATUS], filesystem=fs)
        except (OSError, pa.ArrowInvalid):
            # pyarrow's ranged S3 reads fail without retrying on a throttled small read (a 503 body overflows the
            # range buffer), so a committed part must not be judged by them: re-read it whole through boto3,
            # which retries; a storage error that outlasts the retries raises (not OSError) and fails the job.
            try:
                table = pq.read_table(io.BytesIO(read_bytes(uri, storage_cfg)), columns=[S.ID, S.STATUS])
            except (OSError, pa.ArrowInvalid) as e:
                log.warning("removing unreadable part %s (left by a killed run?): %s", uri, e)
                delete(uri, storage_cfg)
                continue
        parts.append(uri)
        for image_id, status in zip(
            table.column(S.ID).to_pylist(), table.column(S.STATUS).to_pylist(), strict=True
        ):
            if image_id in ids:
                dups.append(image_id)
            ids.add(image_id)
            statuses[status] += 1
    return DoneSet(ids=ids, parts=parts, duplicates=dups, status_counts=statuses)


def summary_batch(table: pa.Table, part_uri: str) -> dict[str, np.ndarray]:
    """The few columns the driver needs to count progress (the masks stay in storage)."""
    n = table.num_rows
    return {
        S.ID: np.array(table.column(S.ID).to_pylist(), dtype=object),
        S.STATUS: np.array(table.column(S.STATUS).to_pylist(), dtype=object),
        "part": np.array([part_uri] * n, dtype=object),
        **{c: table.column(c).to_numpy(zero_copy_only=False) for c in (*S.TIMING_COLUMNS, *S.NODE_COLUMNS)},
    }


def write_manifest(output_uri: str, manifest: dict, storage_cfg: StorageConfig) -> str:
    uri = join(output_uri, MANIFEST)
    write_bytes(uri, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode(), storage_cfg)
    return uri


def read_manifest(output_uri: str, storage_cfg: StorageConfig) -> dict:
    return json.loads(read_bytes(join(output_uri, MANIFEST), storage_cfg))
