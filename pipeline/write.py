"""Write stage (last in the flow): rows -> committed Parquet parts under ``OUTPUT/masks/``; what is done; manifest.

Exactly-once by construction:
- a part's name is a digest of the sorted image ids it holds, so a retried task rewrites the same object instead of
  adding a second copy;
- a part is committed atomically (an S3 PUT appears whole or not at all; locally, temp file + rename), so files from a
  killed run are either whole parts (their images count as done) or invisible temp files (ignored and cleaned);
- a re-run indexes the committed parts' ``image_id`` columns (:class:`IdIndex`, built in Ray tasks: 16 bytes per
  finished image in the object store, nothing per image on the driver) and plans only the images the index lacks;
  after the run the index is rebuilt to check that every input has exactly one row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.storage import StorageConfig, delete, filesystem, join, list_files, read_bytes, write_bytes

__all__ = [
    "MASKS_DIR",
    "part_name",
    "write_part",
    "part_summary",
    "IdIndex",
    "PartsSummary",
    "read_part_ids",
    "index_parts",
    "merge_index",
    "find_missing",
    "load_done",
    "write_manifest",
    "read_manifest",
]

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


def _hash_ids(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """128-bit blake2b of each id as (hi, lo) uint64 arrays. Collisions: ~1e-23 at 100M ids."""
    digest = b"".join(hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids)
    pairs = np.frombuffer(digest, dtype="<u8").reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


@dataclass
class IdIndex:
    """A sorted set of 128-bit id hashes (16 bytes per id); membership is a vectorised binary search."""

    hi: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    lo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    @classmethod
    def from_hashes(cls, hi: np.ndarray, lo: np.ndarray) -> tuple[IdIndex, int]:
        """Sorted, duplicates dropped; also returns how many duplicates there were."""
        order = np.lexsort((lo, hi))
        hi, lo = hi[order], lo[order]
        dup = np.zeros(len(hi), dtype=bool)
        if len(hi) > 1:
            dup[1:] = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
        return cls(hi[~dup], lo[~dup]), int(dup.sum())

    @classmethod
    def from_ids(cls, ids: list[str]) -> tuple[IdIndex, int]:
        return cls.from_hashes(*_hash_ids(ids))

    def __len__(self) -> int:
        return len(self.hi)

    def contains(self, ids: list[str]) -> np.ndarray:
        """bool (len(ids),): which ids are in the index."""
        if not ids or not len(self):
            return np.zeros(len(ids), dtype=bool)
        q_hi, q_lo = _hash_ids(ids)
        pos = np.searchsorted(self.hi, q_hi, side="left")
        found = np.zeros(len(ids), dtype=bool)
        # Equal hi values are contiguous; almost always one element (two ids sharing 64 bits is ~never).
        for step in range(4):
            p = pos + step
            valid = p < len(self.hi)
            pc_ = np.where(valid, p, 0)
            same_hi = valid & (self.hi[pc_] == q_hi)
            found |= same_hi & (self.lo[pc_] == q_lo)
            if not same_hi.any():
                break
        return found


def read_part_ids(
    uri: str, storage_cfg: StorageConfig, columns: tuple[str, ...] = (S.ID, S.STATUS)
) -> pa.Table | None:
    """Some columns of a committed part (or plan file), or None if it is unreadable (a torn local file)."""
    fs, path = filesystem(uri, storage_cfg)
    columns = list(columns)
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (OSError, pa.ArrowInvalid):
        # pyarrow's ranged S3 reads fail without retrying on a throttled small read (a 503 body overflows the
        # range buffer), so a committed part must not be judged by them: re-read it whole through boto3,
        # which retries; a storage error that outlasts the retries raises (not OSError) and fails the job.
        try:
            return pq.read_table(io.BytesIO(read_bytes(uri, storage_cfg)), columns=columns)
        except (OSError, pa.ArrowInvalid) as e:
            log.warning("unreadable part %s (left by a killed run?): %s", uri, e)
            return None


@dataclass
class PartsSummary:
    """What a group of committed parts holds (small: counts, a few examples)."""

    rows: int = 0
    duplicates: int = 0
    status_counts: Counter = field(default_factory=Counter)
    unreadable: list[str] = field(default_factory=list)


def index_parts(
    part_uris: list[str], storage_cfg: StorageConfig, *, with_status: bool = True
) -> tuple[np.ndarray, np.ndarray, PartsSummary]:
    """Hashes of the ids in some parts (or plan files, ``with_status=False``), duplicates kept, and what they hold."""
    summary = PartsSummary()
    his, los = [], []
    for uri in part_uris:
        table = read_part_ids(uri, storage_cfg, (S.ID, S.STATUS) if with_status else (S.ID,))
        if table is None:
            summary.unreadable.append(uri)
            continue
        hi, lo = _hash_ids(table.column(S.ID).to_pylist())
        his.append(hi)
        los.append(lo)
        summary.rows += table.num_rows
        if with_status:
            summary.status_counts.update(table.column(S.STATUS).to_pylist())
    if not his:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), summary
    return np.concatenate(his), np.concatenate(los), summary


def merge_index(*hashes: np.ndarray) -> tuple[IdIndex, int]:
    """One index from index_parts' outputs passed as hi_0, lo_0, hi_1, lo_1, ...; also the number of duplicates."""
    empty = np.zeros(0, np.uint64)
    hi = np.concatenate([*hashes[0::2], empty])
    lo = np.concatenate([*hashes[1::2], empty])
    return IdIndex.from_hashes(hi, lo)


def find_missing(
    input_files: list[str], done: IdIndex, storage_cfg: StorageConfig
) -> tuple[int, int, list[str]]:
    """(inputs, inputs without a row, up to 5 such ids) for some ``_plan/inputs`` files against the output index."""
    total, missing, examples = 0, 0, []
    for uri in input_files:
        table = read_part_ids(uri, storage_cfg, (S.ID,))
        if table is None:
            raise OSError(f"cannot read the plan file {uri}")
        ids = table.column(S.ID).to_pylist()
        absent = np.flatnonzero(~done.contains(ids))
        total += len(ids)
        missing += len(absent)
        examples.extend(ids[i] for i in absent[: 5 - len(examples)])
    return total, missing, examples[:5]


def part_summary(table: pa.Table, part_uri: str) -> pa.Table:
    """One row per committed part: what the driver counts progress from (no per-image data leaves the worker)."""
    statuses = Counter(table.column(S.STATUS).to_pylist())
    row: dict[str, list] = {
        "part": [part_uri],
        "rows": [table.num_rows],
        "status_counts": [json.dumps(dict(statuses), sort_keys=True)],
    }
    for c in S.TIMING_COLUMNS:
        row[c] = [float(pc.sum(table.column(c).cast(pa.float64())).as_py() or 0.0)]
    for c in S.NODE_COLUMNS:
        row[c] = [",".join(sorted(v for v in pc.unique(table.column(c).drop_null()).to_pylist() if v))]
    return pa.table(row)


def load_done(output_uri: str, storage_cfg: StorageConfig) -> tuple[IdIndex, PartsSummary]:
    """The index of every committed part's ids, in this process (small outputs: tests, the reference loop).

    The segment job builds the same index in Ray tasks (``flow.index_output``). Unreadable parts are removed.
    """
    parts = list_files(join(output_uri, MASKS_DIR), storage_cfg, (".parquet",))
    hi, lo, summary = index_parts(parts, storage_cfg)
    index, summary.duplicates = IdIndex.from_hashes(hi, lo)
    for uri in summary.unreadable:
        delete(uri, storage_cfg)
    return index, summary


def write_manifest(output_uri: str, manifest: dict, storage_cfg: StorageConfig) -> str:
    uri = join(output_uri, MANIFEST)
    write_bytes(uri, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode(), storage_cfg)
    return uri


def read_manifest(output_uri: str, storage_cfg: StorageConfig) -> dict:
    return json.loads(read_bytes(join(output_uri, MANIFEST), storage_cfg))
