"""Write stage (last in the flow): rows -> committed Parquet parts under ``OUTPUT/masks/``; what is done; manifest.

Exactly-once by construction:
- a part's name is a digest of the sorted image ids it holds, so a retried task rewrites the same object instead of
  adding a second copy;
- a part is committed atomically (an S3 PUT appears whole or not at all; locally, temp file + rename), so files from a
  killed run are either whole parts (their images count as done) or invisible temp files (ignored and cleaned);
- a re-run indexes the committed parts' ``image_id`` columns (:class:`IdIndex`, built in Ray tasks: 16 bytes per
  finished image in the object store, nothing per image on the driver) and plans only the images the index lacks;
  after the run the index is rebuilt to check that every input has exactly one row.

Retrying an error row (``retryable``, or any error with ``--retry-errors all``) supersedes it without a moment with
two rows or none: the re-run's row for such an image is written aside, to ``OUTPUT/_supersede/<old part>/``
(invisible to readers of ``masks/``), and then the old part is rewritten in place with the new row instead of the
old one: one atomic PUT of an object whose name, a digest of its ids, does not change. A kill before the rewrite
leaves the old row (the aside file is applied by the next run before it indexes); a kill after it leaves the new
row (applying again is idempotent). :class:`RetryIndex` tells the planner which part holds each row to retry.
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
from pipeline.storage import (
    StorageConfig,
    StorageError,
    StorageOutage,
    delete,
    filesystem,
    is_transient,
    join,
    list_files,
    read_bytes,
    redact,
    write_bytes,
)

__all__ = [
    "MASKS_DIR",
    "SUPERSEDE_DIR",
    "RETRY_POLICIES",
    "part_name",
    "write_part",
    "commit_rows",
    "part_summary",
    "IdIndex",
    "RetryIndex",
    "pending_supersedes",
    "apply_supersedes",
    "PartsSummary",
    "read_part_ids",
    "index_parts",
    "merge_index",
    "merge_retry",
    "find_missing",
    "rows_of",
    "choose_keepers",
    "drop_duplicates",
    "load_done",
    "write_manifest",
    "read_manifest",
]

log = logging.getLogger(__name__)

MASKS_DIR = "masks"
SUPERSEDE_DIR = "_supersede"  # rows that replace committed error rows, until their part is rewritten
MANIFEST = "_manifest.json"
RETRY_POLICIES = ("retryable", "all", "none")  # which committed error rows a re-run processes again


def part_name(image_ids: list[str]) -> str:
    """Deterministic part file name for a set of image ids (order-independent).

    The ids are digested as a JSON list, an unambiguous encoding: no id set can pose as another (``['a\\nb']``
    and ``['a', 'b']`` were one name when ids were joined by newlines).
    """
    encoded = json.dumps(sorted(image_ids), ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_part(table: pa.Table, output_uri: str, storage_cfg: StorageConfig, *, supersedes: str = "") -> str:
    """Commit one part and return its URI. The table must follow ``schema.OUTPUT_SCHEMA``.

    ``supersedes``: the name of the committed part whose rows for these images these replace; the part is then
    written aside under ``_supersede/`` for ``apply_supersedes``.
    """
    ids = table.column(S.ID).to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"a part may not hold an image twice: {[i for i, c in Counter(ids).items() if c > 1]}"
        )
    if supersedes:
        uri = join(output_uri, SUPERSEDE_DIR, supersedes.removesuffix(".parquet"), part_name(ids))
    else:
        uri = join(output_uri, MASKS_DIR, part_name(ids))
    _put_table(table, uri, storage_cfg)
    return uri


def _put_table(table: pa.Table, uri: str, storage_cfg: StorageConfig) -> None:
    buf = io.BytesIO()
    pq.write_table(table.cast(S.OUTPUT_SCHEMA), buf, compression="zstd")
    write_bytes(uri, buf.getvalue(), storage_cfg)


def commit_rows(table: pa.Table, output_uri: str, storage_cfg: StorageConfig) -> pa.Table:
    """Encoded rows (OUTPUT_SCHEMA + SUPERSEDES) -> their committed parts' summaries (``part_summary``).

    New images make one part; rows that replace a committed row make one aside part per part they replace.
    """
    if S.SUPERSEDES not in table.column_names:
        return part_summary(table, write_part(table, output_uri, storage_cfg))
    supersedes = table.column(S.SUPERSEDES)
    table = table.drop_columns([S.SUPERSEDES])
    summaries = []
    for old in sorted(pc.unique(supersedes).to_pylist()):
        rows = table.filter(pc.equal(supersedes, old))
        summaries.append(part_summary(rows, write_part(rows, output_uri, storage_cfg, supersedes=old)))
    return pa.concat_tables(summaries)


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
        index, _, count = cls.with_duplicates(hi, lo)
        return index, count

    @classmethod
    def with_duplicates(cls, hi: np.ndarray, lo: np.ndarray) -> tuple[IdIndex, IdIndex, int]:
        """Sorted, duplicates dropped; also the ids that occur more than once and how many extra rows they have."""
        order = np.lexsort((lo, hi))
        hi, lo = hi[order], lo[order]
        dup = np.zeros(len(hi), dtype=bool)
        if len(hi) > 1:
            dup[1:] = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
        d_hi, d_lo = hi[dup], lo[dup]  # sorted: an id with 3 rows appears twice here
        first = np.ones(len(d_hi), dtype=bool)
        if len(d_hi) > 1:
            first[1:] = (d_hi[1:] != d_hi[:-1]) | (d_lo[1:] != d_lo[:-1])
        return cls(hi[~dup], lo[~dup]), cls(d_hi[first], d_lo[first]), int(dup.sum())

    @classmethod
    def from_ids(cls, ids: list[str]) -> tuple[IdIndex, int]:
        return cls.from_hashes(*_hash_ids(ids))

    def __len__(self) -> int:
        return len(self.hi)

    def contains(self, ids: list[str]) -> np.ndarray:
        """bool (len(ids),): which ids are in the index."""
        return self.find(ids) >= 0

    def find(self, ids: list[str]) -> np.ndarray:
        """int64 (len(ids),): each id's position in the index, -1 where it is absent."""
        found = np.full(len(ids), -1, dtype=np.int64)
        if not ids or not len(self):
            return found
        q_hi, q_lo = _hash_ids(ids)
        pos = np.searchsorted(self.hi, q_hi, side="left")
        # Equal hi values are contiguous; almost always one element (two ids sharing 64 bits is ~never).
        for step in range(4):
            p = pos + step
            valid = p < len(self.hi)
            pc_ = np.where(valid, p, 0)
            same_hi = valid & (self.hi[pc_] == q_hi)
            hit = same_hi & (self.lo[pc_] == q_lo) & (found < 0)
            found[hit] = p[hit]
            if not same_hi.any():
                break
        return found


@dataclass
class RetryIndex:
    """The committed error rows a re-run processes again: id hashes and, for each, its part and its attempt."""

    ids: IdIndex = field(default_factory=IdIndex)
    parts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))  # aligned with ids
    attempts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # aligned with ids

    @classmethod
    def build(cls, hi: np.ndarray, lo: np.ndarray, parts: np.ndarray, attempts: np.ndarray) -> RetryIndex:
        order = np.lexsort((lo, hi))
        return cls(
            IdIndex(hi[order], lo[order]),
            np.asarray(parts, dtype=object)[order],
            np.asarray(attempts, dtype=np.int32)[order],
        )

    def __len__(self) -> int:
        return len(self.ids)

    def parts_of(self, ids: list[str]) -> np.ndarray:
        """object (len(ids),): the part holding each id's row to retry, "" for ids not to retry."""
        return self.lookup(ids)[0]

    def lookup(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(part holding each id's row to retry or "", that row's attempt or 0), each (len(ids),)."""
        pos = self.ids.find(ids)
        parts = np.full(len(ids), "", dtype=object)
        attempts = np.zeros(len(ids), dtype=np.int32)
        if len(self):
            parts[pos >= 0] = self.parts[pos[pos >= 0]]
            attempts[pos >= 0] = self.attempts[pos[pos >= 0]]
        return parts, attempts


def read_part_ids(
    uri: str, storage_cfg: StorageConfig, columns: tuple[str, ...] = (S.ID, S.STATUS)
) -> pa.Table | None:
    """Some columns of a committed part (or plan file), or None when it is torn: its bytes were read whole and do
    not parse. A part that could not be read (timeout, permission, 5xx past retries) raises: it is never judged
    torn, so nothing is deleted because storage was slow."""
    fs, path = filesystem(uri, storage_cfg)
    try:
        return _read_columns(pq.ParquetFile(path, filesystem=fs), columns)
    except (OSError, pa.ArrowInvalid):
        # pyarrow's ranged S3 reads fail without retrying on a throttled small read (a 503 body overflows the
        # range buffer), and say nothing of whether the bytes are whole: judge the part by its whole bytes.
        pass
    data = read_bytes(uri, storage_cfg)  # through boto3, which retries; a storage error propagates
    try:
        return _read_columns(pq.ParquetFile(io.BytesIO(data)), columns)
    except (OSError, pa.ArrowInvalid) as e:  # parsing bytes in memory: the file itself is bad
        log.warning("torn part %s (%d bytes, left by a killed run?): %s", uri, len(data), e)
        return None


def _read_columns(file: pq.ParquetFile, columns: tuple[str, ...]) -> pa.Table:
    """The columns the file has, plus defaults for columns added after it was written (_with_defaults)."""
    table = file.read(columns=[c for c in columns if c in file.schema_arrow.names])
    return _with_defaults(table, columns)


def _with_defaults(table: pa.Table, columns: tuple[str, ...] = (S.RETRYABLE, S.ATTEMPT)) -> pa.Table:
    """A part written before ``retryable`` / ``attempt`` existed: its rows read as not retryable, first attempt."""
    if S.RETRYABLE in columns and S.RETRYABLE not in table.column_names:
        table = table.append_column(S.RETRYABLE, pa.array(np.zeros(table.num_rows, dtype=bool)))
    if S.ATTEMPT in columns:
        if S.ATTEMPT not in table.column_names:
            table = table.append_column(S.ATTEMPT, pa.array(np.ones(table.num_rows, dtype=np.int32)))
        elif table.column(S.ATTEMPT).null_count:
            filled = pc.fill_null(table.column(S.ATTEMPT), 1)
            table = table.set_column(table.schema.get_field_index(S.ATTEMPT), S.ATTEMPT, filled)
    return table


@dataclass
class PartsSummary:
    """What a group of committed parts holds (small: counts, a few examples)."""

    rows: int = 0
    duplicates: int = 0
    retryable: int = 0  # error rows whose cause was the environment (a re-run retries them by default)
    retry: int = 0  # rows the re-run's policy retries
    status_counts: Counter = field(default_factory=Counter)
    unreadable: list[str] = field(default_factory=list)

    def add(self, other: PartsSummary) -> None:
        self.rows += other.rows
        self.duplicates += other.duplicates
        self.retryable += other.retryable
        self.retry += other.retry
        self.status_counts.update(other.status_counts)
        self.unreadable.extend(other.unreadable)


def index_parts(
    part_uris: list[str], storage_cfg: StorageConfig, *, with_status: bool = True, retry: str = "retryable"
) -> tuple[np.ndarray, np.ndarray, PartsSummary, RetryIndex]:
    """Hashes of the ids in some parts (or plan files, ``with_status=False``), duplicates kept, what they hold, and
    the rows to retry under the ``retry`` policy (RETRY_POLICIES)."""
    if retry not in RETRY_POLICIES:
        raise ValueError(f"retry policy must be one of {RETRY_POLICIES}, got {retry!r}")
    summary = PartsSummary()
    his, los, retry_his, retry_los, retry_parts, retry_attempts = [], [], [], [], [], []
    columns = (S.ID, S.STATUS, S.RETRYABLE, S.ATTEMPT) if with_status else (S.ID,)
    for uri in part_uris:
        try:
            table = read_part_ids(uri, storage_cfg, columns)
        except Exception as e:  # noqa: BLE001 - any read failure stops the step; nothing is judged torn by it
            raise _unreadable(uri, e) from e
        if table is None:
            summary.unreadable.append(uri)
            continue
        hi, lo = _hash_ids(table.column(S.ID).to_pylist())
        his.append(hi)
        los.append(lo)
        summary.rows += table.num_rows
        if not with_status:
            continue
        status = table.column(S.STATUS).to_numpy(zero_copy_only=False)
        retryable = table.column(S.RETRYABLE).to_numpy(zero_copy_only=False).astype(bool) & (status != S.OK)
        summary.status_counts.update(status.tolist())
        summary.retryable += int(retryable.sum())
        again = {"retryable": retryable, "all": status != S.OK, "none": np.zeros(len(status), bool)}[retry]
        if again.any():
            retry_his.append(hi[again])
            retry_los.append(lo[again])
            retry_parts.append(np.full(int(again.sum()), uri.rsplit("/", 1)[-1], dtype=object))
            retry_attempts.append(table.column(S.ATTEMPT).to_numpy(zero_copy_only=False)[again])
            summary.retry += int(again.sum())
    empty = np.zeros(0, np.uint64)
    retry_index = RetryIndex.build(
        np.concatenate([*retry_his, empty]),
        np.concatenate([*retry_los, empty]),
        np.concatenate([*retry_parts, np.zeros(0, dtype=object)]),
        np.concatenate([*retry_attempts, np.zeros(0, dtype=np.int32)]),
    )
    return np.concatenate([*his, empty]), np.concatenate([*los, empty]), summary, retry_index


def _unreadable(uri: str, exc: BaseException) -> StorageError:
    """The one-line error of a part that could not be read: an outage (exit 75) when storage may answer later."""
    reason = redact((str(exc).strip().splitlines() or [type(exc).__name__])[0][:300])
    if is_transient(exc):
        return StorageOutage(
            f"storage outage: cannot read the committed part {uri} ({reason}); nothing was deleted: re-run the "
            "same command when storage answers"
        )
    return StorageError(
        f"cannot read the committed part {uri} ({type(exc).__name__}: {reason}); nothing was deleted: give "
        "this user read access to the output (or run as its owner)"
    )


def merge_index(*hashes: np.ndarray) -> tuple[IdIndex, int, IdIndex]:
    """One index from index_parts' outputs passed as hi_0, lo_0, hi_1, lo_1, ...; also the number of duplicate
    rows and an index of the ids that have more than one."""
    empty = np.zeros(0, np.uint64)
    hi = np.concatenate([*hashes[0::2], empty])
    lo = np.concatenate([*hashes[1::2], empty])
    index, duplicated, count = IdIndex.with_duplicates(hi, lo)
    return index, count, duplicated


def merge_retry(*indexes: RetryIndex) -> RetryIndex:
    """One RetryIndex from index_parts' per-group ones."""
    return RetryIndex.build(
        np.concatenate([np.zeros(0, np.uint64), *(r.ids.hi for r in indexes)]),
        np.concatenate([np.zeros(0, np.uint64), *(r.ids.lo for r in indexes)]),
        np.concatenate([np.zeros(0, dtype=object), *(r.parts for r in indexes)]),
        np.concatenate([np.zeros(0, dtype=np.int32), *(r.attempts for r in indexes)]),
    )


def pending_supersedes(output_uri: str, storage_cfg: StorageConfig) -> dict[str, list[str]]:
    """Rows written aside to replace committed ones: {name of the part they replace: [aside part URIs]}."""
    root = join(output_uri, SUPERSEDE_DIR)
    groups: dict[str, list[str]] = {}
    for uri in list_files(root, storage_cfg, (".parquet",)):
        old = uri[len(root) :].strip("/").split("/")[0] + ".parquet"
        groups.setdefault(old, []).append(uri)
    return groups


def apply_supersedes(groups: dict[str, list[str]], output_uri: str, storage_cfg: StorageConfig) -> int:
    """Rewrite each committed part with the rows written aside for it (one atomic PUT each); return rows replaced.

    Idempotent: a kill between the rewrite and the deletion of the aside files is repaired by applying again.
    """
    replaced = 0
    for old, uris in groups.items():
        new = pa.concat_tables([_read_whole(u, storage_cfg) for u in uris])
        new_ids = new.column(S.ID).to_pylist()
        if len(set(new_ids)) != len(new_ids):  # two attempts of one row (can't happen in one run): keep one
            keep = sorted({i: k for k, i in enumerate(new_ids)}.values())
            new = new.take(keep)
        part_uri = join(output_uri, MASKS_DIR, old)
        try:
            current = _read_whole(part_uri, storage_cfg)
        except FileNotFoundError:  # the part is gone (deleted by hand?): the rows become a part of their own
            write_part(new, output_uri, storage_cfg)
        else:
            kept = current.filter(
                pc.invert(pc.is_in(current.column(S.ID), value_set=new.column(S.ID).combine_chunks()))
            )
            _put_table(pa.concat_tables([kept, new]), part_uri, storage_cfg)
        replaced += new.num_rows
        for uri in uris:
            delete(uri, storage_cfg)
    return replaced


def _read_whole(uri: str, storage_cfg: StorageConfig) -> pa.Table:
    table = _with_defaults(pq.read_table(io.BytesIO(read_bytes(uri, storage_cfg))))
    return table.select(S.OUTPUT_SCHEMA.names).cast(S.OUTPUT_SCHEMA)


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


def rows_of(
    uris: list[str], ids: IdIndex, storage_cfg: StorageConfig, columns: tuple[str, ...] = (S.ID, S.STATUS)
) -> pa.Table:
    """The rows of some parts (or plan files) whose id is in ``ids``, some columns, plus "part" (the file's name)."""
    tables = []
    for uri in uris:
        table = read_part_ids(uri, storage_cfg, columns)
        if table is None or not table.num_rows:
            continue
        hit = ids.contains(table.column(S.ID).to_pylist())
        if hit.any():
            rows = table.filter(pa.array(hit))
            tables.append(rows.append_column("part", pa.array([uri.rsplit("/", 1)[-1]] * rows.num_rows)))
    if not tables:
        return pa.table(
            {**{c: pa.array([], pa.string()) for c in columns}, "part": pa.array([], pa.string())}
        )
    return pa.concat_tables(tables, promote_options="permissive")


def choose_keepers(*found: pa.Table) -> RetryIndex:
    """For each id with several rows (rows_of over every part), the part whose row stays: an ok row before an
    error row, then the part whose name sorts first. Returned as a RetryIndex mapping id -> keeper part."""
    tables = [t.select([S.ID, S.STATUS, "part"]) for t in found if t.num_rows]
    if not tables:
        empty = np.zeros(0, np.uint64)
        return RetryIndex.build(empty, empty, np.zeros(0, dtype=object), np.zeros(0, np.int32))
    table = pa.concat_tables(tables)
    rows = sorted(
        zip(table.column(S.ID).to_pylist(), table.column(S.STATUS).to_pylist(), table.column("part").to_pylist(),
            strict=True),
        key=lambda r: (r[0], r[1] != S.OK, r[2]),
    )  # fmt: skip
    keepers: dict[str, str] = {}
    for image_id, _, part in rows:
        keepers.setdefault(image_id, part)
    hi, lo = _hash_ids(list(keepers))
    return RetryIndex.build(
        hi, lo, np.array(list(keepers.values()), dtype=object), np.zeros(len(hi), np.int32)
    )


def drop_duplicates(part_uris: list[str], keepers: RetryIndex, storage_cfg: StorageConfig) -> int:
    """Rewrite each part without its rows of ids that another part keeps (choose_keepers); return rows dropped.

    Each rewrite is one atomic PUT under the same name (a part left with no row is deleted), so a reader or a
    killed repair sees the old part or the new one, and a repeated repair is a no-op."""
    dropped = 0
    for uri in part_uris:
        ids = read_part_ids(uri, storage_cfg, (S.ID,))
        if ids is None:
            continue
        keeper = keepers.parts_of(ids.column(S.ID).to_pylist())
        name = uri.rsplit("/", 1)[-1]
        drop = (keeper != "") & (keeper != name)
        if not drop.any():
            continue
        table = _read_whole(uri, storage_cfg)
        kept = table.filter(pa.array(~drop))
        if kept.num_rows:
            _put_table(kept, uri, storage_cfg)
        else:
            delete(uri, storage_cfg)
        dropped += int(drop.sum())
        log.warning("removed %d duplicate rows from %s", int(drop.sum()), uri)
    return dropped


def part_summary(table: pa.Table, part_uri: str) -> pa.Table:
    """One row per committed part: what the driver counts progress from (no per-image data leaves the worker)."""
    statuses = Counter(table.column(S.STATUS).to_pylist())
    row: dict[str, list] = {
        "part": [part_uri],
        "rows": [table.num_rows],
        "status_counts": [json.dumps(dict(statuses), sort_keys=True)],
        "retryable": [int(pc.sum(table.column(S.RETRYABLE)).as_py() or 0)],
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
    apply_supersedes(pending_supersedes(output_uri, storage_cfg), output_uri, storage_cfg)
    parts = list_files(join(output_uri, MASKS_DIR), storage_cfg, (".parquet",))
    hi, lo, summary, _ = index_parts(parts, storage_cfg)
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
