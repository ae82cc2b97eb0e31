"""Read stage (after plan, before decode): fetch the bytes of the plan's work items inside Ray tasks.

A work item is a plan row (``schema.ID``, ``SOURCE``, ``LABEL_SOURCE``, ``SHARD``): a URI for loose objects, or
``shard_uri#image_id`` for the Parquet shards ``deeplab shard`` writes (rows of one shard are read together).
Fetching is per row: a missing or unreadable object becomes an error row, never a failed block.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.storage import StorageConfig, filesystem, read_bytes, redact

__all__ = ["fetch_batch"]

log = logging.getLogger(__name__)


def fetch_batch(batch: dict[str, np.ndarray], storage_cfg: StorageConfig) -> dict[str, np.ndarray]:
    """Work items -> rows with IMAGE_BYTES / LABEL_BYTES, STATUS and ERROR. One bad object = one error row."""
    n = len(batch[S.ID])
    image_bytes: list[bytes | None] = [None] * n
    label_bytes: list[bytes | None] = [None] * n
    status = [S.OK] * n
    error: list[str | None] = [None] * n
    label_problem: list[str | None] = [None] * n
    shard_rows = _read_shard_rows({s for s in batch[S.SHARD] if s}, set(batch[S.ID]), storage_cfg)
    for i in range(n):
        image_id, source, shard = batch[S.ID][i], batch[S.SOURCE][i], batch[S.SHARD][i]
        label_source = S.text_or_none(batch[S.LABEL_SOURCE][i])
        try:
            if shard:
                image_bytes[i], label_bytes[i] = shard_rows[(shard, image_id)]
            else:
                image_bytes[i] = read_bytes(source, storage_cfg)
        except Exception as e:  # noqa: BLE001 - any storage failure for this object is this row's error
            status[i], error[i] = S.ErrorKind.READ, redact(f"cannot read {source}: {_reason(e)}")
            continue
        if label_source and not shard:
            try:
                label_bytes[i] = read_bytes(label_source, storage_cfg)
            except Exception as e:  # noqa: BLE001
                label_problem[i] = redact(f"cannot read label {label_source}: {_reason(e)}")
    return {
        S.ID: batch[S.ID],
        S.SOURCE: batch[S.SOURCE],
        S.LABEL_SOURCE: batch[S.LABEL_SOURCE],
        S.STATUS: np.array(status, dtype=object),
        S.ERROR: np.array(error, dtype=object),
        S.IMAGE_BYTES: S.object_column(image_bytes),
        S.LABEL_BYTES: S.object_column(label_bytes),
        S.LABEL_PROBLEM: np.array(label_problem, dtype=object),
    }


def _reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "object not found"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def _read_shard_rows(
    shards: set[str], wanted: set[str], storage_cfg: StorageConfig
) -> dict[tuple[str, str], tuple[bytes | None, bytes | None]]:
    rows: dict[tuple[str, str], tuple[bytes | None, bytes | None]] = {}
    for shard in sorted(shards):
        fs, path = filesystem(shard, storage_cfg)
        # Row-group statistics on the sorted image_id column let pyarrow skip the groups this batch doesn't need.
        table = pq.read_table(path, filesystem=fs, filters=[("image_id", "in", sorted(wanted))])
        for image_id, image, label in zip(
            table.column("image_id").to_pylist(),
            table.column("image").to_pylist(),
            table.column("label").to_pylist(),
            strict=True,
        ):
            if image_id in wanted:
                rows[(shard, image_id)] = (image, label)
    return rows
