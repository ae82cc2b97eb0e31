"""Plan stage (first in the flow): list the inputs in Ray tasks into a Parquet work plan, and know what is done.

The driver never holds the dataset. Listing is split into *units*, each listed by one Ray task:
- image prefixes and VOC trees: one directory (local) or one ``/`` level of a prefix (S3); a unit's task lists the
  files directly in it and returns its subdirectories, which become the next units (breadth first);
- shard inputs: one shard file (its ``image_id`` and label-validity columns, a few KB);
- manifests: one manifest file (Parquet or CSV), streamed in record batches.

A unit's task writes two kinds of plan files under ``OUTPUT/_plan/`` and returns only counts:
``todo/<unit>-<k>.parquet`` (work items not yet done; what the job streams, ``read_plan`` reading them in Ray
tasks) and ``inputs/<unit>-<k>.parquet`` (every input id; what the final check reads).

Done-ness comes in as a ``write.IdIndex`` (hashes of the committed parts' ids, in Ray's object store): a unit task
writes only the items it lacks to ``todo/``, plus the items whose committed row is to be retried
(``write.RetryIndex``), each with the name of the part its new row supersedes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.storage import (
    StorageConfig,
    check_source_allowed,
    filesystem,
    is_s3,
    join,
    list_files,
    read_bytes,
    s3_client,
    split_s3,
    write_bytes,
)

__all__ = [
    "PLAN_DIR",
    "PLAN_SCHEMA",
    "UNITS_PER_TASK",
    "LIST_TASKS_IN_FLIGHT",
    "IMAGE_DIR",
    "LABEL_DIR",
    "SETS_DIR",
    "MANIFEST_SUFFIXES",
    "PlanSource",
    "UnitResult",
    "detect_format",
    "plan_source",
    "root_units",
    "list_unit",
    "plan_unit",
    "read_plan",
    "list_inputs",
]

if TYPE_CHECKING:
    from pipeline.stages.write import IdIndex, RetryIndex

log = logging.getLogger(__name__)

PLAN_DIR = "_plan"
IMAGE_DIR, LABEL_DIR, SETS_DIR = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation"
MANIFEST_SUFFIXES = (".parquet", ".csv")
PLAN_ROWS_PER_FILE = 10_000  # rows per inputs/ file (and per listing batch of a manifest)
_WRITE_THREADS = 8
PLAN_SCHEMA = pa.schema(
    [
        pa.field(S.ID, pa.string(), nullable=False),
        pa.field(S.SOURCE, pa.string(), nullable=False),
        pa.field(S.LABEL_SOURCE, pa.string()),
        pa.field(S.SHARD, pa.string(), nullable=False),
        pa.field(
            S.SUPERSEDES, pa.string(), nullable=False
        ),  # the part holding an error row this item retries
        pa.field(S.ATTEMPT, pa.int32(), nullable=False),  # this run's attempt at the item (1 unless retried)
    ]
)
INPUTS_COLUMNS = (
    S.ID,
    S.SOURCE,
)  # what inputs/ files keep of each item: the final check and the duplicate check
# Listing tasks: up to this many units per task (a tree of 1M one-image folders is 16k tasks, not 1M), and at most
# _LIST_TASKS_IN_FLIGHT tasks at once (the driver holds their refs and the units still to list, nothing per image).
UNITS_PER_TASK = 64
LIST_TASKS_IN_FLIGHT = 16
# Manifest columns: the first name present is used.
_MANIFEST_IMAGE = ("image_uri", "source", "url", "image")
_MANIFEST_LABEL = ("label_uri", "label_source", "label")
_MANIFEST_ID = ("image_id", "id")


# --- what to list ------------------------------------------------------------------------------------------------


def detect_format(input_uri: str, storage_cfg: StorageConfig) -> str:
    """manifest for a .parquet/.csv file, shards if the input has _manifest.json, voc if JPEGImages/, else images."""
    from pipeline.storage import exists

    if input_uri.lower().endswith(MANIFEST_SUFFIXES) and not _is_dir(input_uri):
        return "manifest"
    if exists(join(input_uri, "_manifest.json"), storage_cfg):
        return "shards"
    if _has_entries(join(input_uri, IMAGE_DIR), storage_cfg):
        return "voc"
    return "images"


def _is_dir(uri: str) -> bool:
    return not is_s3(uri) and os.path.isdir(os.path.expanduser(uri))


def _has_entries(prefix: str, storage_cfg: StorageConfig) -> bool:
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        page = s3_client(storage_cfg).list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        return bool(page.get("KeyCount"))
    path = os.path.expanduser(prefix)
    if not os.path.isdir(path):
        return False
    with os.scandir(path) as it:
        return any(True for _ in it)


@dataclass(frozen=True)
class PlanSource:
    """What every unit task of one job lists (small: the split's ids, if any, travel separately)."""

    fmt: str  # voc | images | shards | manifest
    image_root: str  # the prefix image ids are relative to (the manifest file itself for manifests)
    label_root: str | None = None
    allowed_prefixes: tuple[str, ...] = ()  # read.allowed_prefixes: where a manifest's URIs may point


def plan_source(
    input_uri: str,
    fmt: str,
    labels_uri: str | None,
    storage_cfg: StorageConfig,
    allowed_prefixes: tuple[str, ...] = (),
) -> PlanSource:
    """What the unit tasks of a job with this input list."""
    if fmt == "voc":
        return PlanSource(fmt, join(input_uri, IMAGE_DIR), labels_uri or join(input_uri, LABEL_DIR))
    if fmt in ("images", "shards", "manifest"):
        return PlanSource(fmt, input_uri.rstrip("/"), labels_uri, tuple(allowed_prefixes))
    raise ValueError(f"unknown input format {fmt!r}")


def read_split(voc_root: str, split: str, storage_cfg: StorageConfig) -> list[str]:
    text = read_bytes(join(voc_root, SETS_DIR, f"{split}.txt"), storage_cfg).decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


def root_units(source: PlanSource, storage_cfg: StorageConfig) -> list[tuple[str, str]]:
    """The first units to list: ("dir", "") for prefixes, one ("shard", uri) per shard, ("manifest", uri) per file."""
    if source.fmt in ("voc", "images"):
        return [("dir", "")]
    if source.fmt == "shards":
        manifest = json.loads(read_bytes(join(source.image_root, "_manifest.json"), storage_cfg))
        units = []
        for entry in manifest["shards"]:
            name = entry["path"] if isinstance(entry, dict) else entry
            units.append(
                ("shard", name if "://" in name or name.startswith("/") else join(source.image_root, name))
            )
        return units
    uri = source.image_root
    if uri.lower().endswith(MANIFEST_SUFFIXES) and not _is_dir(uri):
        return [("manifest", uri)]
    return [("manifest", u) for u in list_files(uri, storage_cfg, MANIFEST_SUFFIXES)]


# --- listing one unit ----------------------------------------------------------------------------------------------


def _listable(name: str) -> bool:
    # Hidden names (.DS_Store, our own .<name>.tmp files) are not data.
    return not name.startswith(".")


def _list_level(prefix: str, rel: str, storage_cfg: StorageConfig) -> tuple[list[str], list[str]]:
    """(file names, subdirectory names) directly under prefix/rel, unsorted. Keys are data: no normalisation."""
    base = f"{prefix.rstrip('/')}/{rel}" if rel else prefix.rstrip("/")
    files: list[str] = []
    dirs: list[str] = []
    if is_s3(base):
        bucket, key = split_s3(base)
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client(storage_cfg).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(key) :]
                if name and _listable(name):
                    files.append(name)
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(key) :].rstrip("/")
                if name and (_listable(name) or name in (".", "..")):
                    dirs.append(name)
        return files, dirs
    path = os.path.expanduser(base)
    if not os.path.isdir(path):
        return files, dirs
    with os.scandir(path) as it:
        for entry in it:
            if not _listable(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):  # a linked folder is not descended (no loops)
                dirs.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
    return files, dirs


def _strip_ext(name: str) -> str:
    root, ext = posixpath.splitext(name)
    return root if ext else name


def _uri(prefix: str, rel: str) -> str:
    # Plain concatenation: keys are data ('../x' is a legal S3 key), not paths to normalise.
    if is_s3(prefix):
        return f"{prefix.rstrip('/')}/{rel}"
    return os.path.join(os.path.abspath(os.path.expanduser(prefix)), rel)


def _dir_items(
    source: PlanSource, rel: str, split_ids: frozenset[str] | None, storage_cfg: StorageConfig
) -> tuple[dict[str, list], list[str], int]:
    """Work items for the files directly in one directory, its subdirectories, and how many split ids matched."""
    names, subdirs = _list_level(source.image_root, rel, storage_cfg)
    names.sort()
    stems = [_strip_ext(n) for n in names]
    local_ids = _local_ids(names, stems)
    prefix = f"{rel}/" if rel else ""
    ids = [prefix + i for i in local_ids]
    uris = [_uri(source.image_root, prefix + n) for n in names]
    matched = 0
    if split_ids is not None:
        keep = [k for k, stem in enumerate(stems) if prefix + stem in split_ids]
        matched = len(keep)
        ids, uris, local_ids = [ids[k] for k in keep], [uris[k] for k in keep], [local_ids[k] for k in keep]
    labels: list[str | None] = [None] * len(ids)
    if source.label_root and ids:
        label_names, _ = _list_level(source.label_root, rel, storage_cfg)
        by_stem = {n[:-4]: n for n in label_names if n.lower().endswith(".png")}
        labels = [_uri(source.label_root, prefix + by_stem[i]) if i in by_stem else None for i in local_ids]
    items = {S.ID: ids, S.SOURCE: uris, S.LABEL_SOURCE: labels, S.SHARD: [""] * len(ids)}
    return items, [prefix + d for d in sorted(subdirs)], matched


def _local_ids(names: list[str], stems: list[str]) -> list[str]:
    """image_id of each file in one folder: its name without extension, or its whole name where that would
    collide with another file's id (a.jpg + a.png -> "a.jpg", "a.png"; also a.jpg.png beside them). Names in
    a folder are unique, so this ends with ids as unique as the names."""
    ids = list(stems)
    while True:
        counts = Counter(ids)
        clash = [k for k, i in enumerate(ids) if counts[i] > 1 and ids[k] != names[k]]
        if not clash:
            return ids
        for k in clash:
            ids[k] = names[k]


def _shard_items(shard_uri: str, storage_cfg: StorageConfig) -> dict[str, list]:
    fs, path = filesystem(shard_uri, storage_cfg)
    table = pq.read_table(path, columns=["image_id", "label"], filesystem=fs)
    ids = table.column("image_id").to_pylist()
    labelled = table.column("label").is_valid().to_pylist()
    sources = [f"{shard_uri}#{i}" for i in ids]
    return {
        S.ID: ids,
        S.SOURCE: sources,
        S.LABEL_SOURCE: [s if ok else None for s, ok in zip(sources, labelled, strict=True)],
        S.SHARD: [shard_uri] * len(ids),
    }


def _pick(names: list[str], options: tuple[str, ...], what: str, uri: str, required: bool) -> str | None:
    for name in options:
        if name in names:
            return name
    if required:
        raise ValueError(f"manifest {uri} has no {what} column: expected one of {list(options)}, got {names}")
    return None


def _manifest_uri(value: str | None, base: str) -> str | None:
    """Manifest URIs: s3:// and absolute paths as they are; relative ones are relative to the manifest's folder."""
    if value is None or value == "":
        return None
    if "://" in value or value.startswith("/"):
        return value
    return f"{base}/{value}"


def _id_from_uri(uri: str) -> str:
    """image_id for a manifest row without one: the key (S3) or absolute path, without scheme and extension."""
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    return _strip_ext(rest.lstrip("/"))


def _manifest_batches(uri: str, storage_cfg: StorageConfig) -> Iterator[pa.RecordBatch]:
    fs, path = filesystem(uri, storage_cfg)
    if uri.lower().endswith(".csv"):
        data = read_bytes(uri, storage_cfg)
        reader = pacsv.open_csv(
            io.BytesIO(data), convert_options=pacsv.ConvertOptions(strings_can_be_null=True)
        )
        yield from reader
        return
    with fs.open_input_file(path) as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=PLAN_ROWS_PER_FILE)


def _manifest_strings(batch: pa.RecordBatch, name: str, uri: str) -> list[str | None]:
    """One manifest column as strings; a nested column (list, struct, map) is a user's error, not a crash."""
    column = batch.column(name)
    if pa.types.is_nested(column.type) or not (
        pa.types.is_string(column.type)
        or pa.types.is_large_string(column.type)
        or pa.types.is_integer(column.type)
        or pa.types.is_null(column.type)
        or pa.types.is_dictionary(column.type)
    ):
        raise ValueError(f"manifest {uri}: column {name!r} must hold strings, got {column.type}")
    return column.cast(pa.string()).to_pylist()


def _manifest_items(
    uri: str, storage_cfg: StorageConfig, allowed_prefixes: tuple[str, ...] = ()
) -> Iterator[dict[str, list]]:
    """A manifest's work items; every image and label it names must pass storage.check_source_allowed."""
    base = uri.rsplit("/", 1)[0]
    for batch in _manifest_batches(uri, storage_cfg):
        names = batch.schema.names
        image_col = _pick(names, _MANIFEST_IMAGE, "image URI", uri, required=True)
        label_col = _pick(names, _MANIFEST_LABEL, "label URI", uri, required=False)
        id_col = _pick(names, _MANIFEST_ID, "image id", uri, required=False)
        sources = [_manifest_uri(v, base) for v in _manifest_strings(batch, image_col, uri)]
        bad = [k for k, v in enumerate(sources) if v is None]
        if bad:
            raise ValueError(f"manifest {uri}: {len(bad)} rows have no image URI (first at row {bad[0]})")
        labels = (
            [_manifest_uri(v, base) for v in _manifest_strings(batch, label_col, uri)]
            if label_col
            else [None] * len(sources)
        )
        for named in (*sources, *labels):
            if named is not None:
                check_source_allowed(named, uri, allowed_prefixes)
        if id_col:
            ids = _manifest_strings(batch, id_col, uri)
            ids = [i if i else _id_from_uri(s) for i, s in zip(ids, sources, strict=True)]
        else:
            ids = [_id_from_uri(s) for s in sources]
        yield {S.ID: ids, S.SOURCE: sources, S.LABEL_SOURCE: labels, S.SHARD: [""] * len(ids)}


def list_unit(
    source: PlanSource,
    unit: tuple[str, str],
    storage_cfg: StorageConfig,
    split_ids: frozenset[str] | None = None,
) -> tuple[Iterable[dict[str, list]], list[tuple[str, str]], int]:
    """One unit's work items (column batches, possibly a stream), the units it leads to, the split ids it matched."""
    kind, value = unit
    if kind == "dir":
        items, subdirs, matched = _dir_items(source, value, split_ids, storage_cfg)
        return [items], [("dir", d) for d in subdirs], matched
    if kind == "shard":
        return [_shard_items(value, storage_cfg)], [], 0
    if kind == "manifest":
        return (
            _manifest_items(value, storage_cfg, source.allowed_prefixes),
            [],
            0,
        )  # streamed: a manifest file may hold millions
    raise ValueError(f"unknown plan unit {unit!r}")


# --- planning one unit ----------------------------------------------------------------------------------------------


@dataclass
class UnitResult:
    """What one unit task reports to the driver: counts and the next units, never the items."""

    inputs: int = 0
    todo: int = 0
    retried: int = 0  # of todo: items whose committed error row is retried
    labelled: int = 0
    split_matched: int = 0
    subunits: list[tuple[str, str]] = field(default_factory=list)


def _unit_key(units: list[tuple[str, str]]) -> str:
    return hashlib.sha1(json.dumps(units).encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _write_table(table: pa.Table, uri: str, storage_cfg: StorageConfig) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue(), storage_cfg)


def _list_units(
    source: PlanSource,
    units: list[tuple[str, str]],
    storage_cfg: StorageConfig,
    split_ids: frozenset[str] | None,
    result: UnitResult,
) -> Iterator[dict[str, list]]:
    """The work items of several units as one stream; their subunits and split matches go into ``result``."""
    for unit in units:
        batches, subunits, matched = list_unit(source, unit, storage_cfg, split_ids)
        result.subunits.extend(subunits)
        result.split_matched += matched
        yield from batches


def plan_unit(
    source: PlanSource,
    units: tuple[str, str] | list[tuple[str, str]],
    done: IdIndex,  # write.IdIndex: anything with contains(ids) -> bool array
    plan_uri: str,
    storage_cfg: StorageConfig,
    split_ids: frozenset[str] | None = None,
    retry: RetryIndex | None = None,
    *,
    todo_rows_per_file: int = 250,
    write_files: bool = True,
) -> UnitResult:
    """List some units (one task's share), drop what ``done`` holds (unless ``retry`` names its row), write their
    plan files together; return counts.

    ``write_files=False`` (``deeplab segment --dry-run``): the same counts, nothing written.

    ``todo/`` files hold ``todo_rows_per_file`` items (read.items_per_block): each is one block of the job, read by
    a short task that needs no CPU slot. ``inputs/`` files hold up to PLAN_ROWS_PER_FILE ids (and sources, which
    the duplicate check names) for the final check.
    """
    units = [units] if isinstance(units, tuple) else list(units)
    result = UnitResult()
    batches = _list_units(source, units, storage_cfg, split_ids, result)
    key = _unit_key(units)
    pending = PLAN_SCHEMA.empty_table()  # todo rows not yet written (fewer than todo_rows_per_file)
    in_flight: list = []
    num_todo_files = 0
    # Written as they are listed, a bounded number of PUTs in flight: a 10M-row manifest streams through.
    with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:

        def write(table: pa.Table, name: str) -> None:
            if not write_files:
                return
            in_flight.append(pool.submit(_write_table, table, f"{plan_uri}/{name}", storage_cfg))
            while len(in_flight) > 4 * _WRITE_THREADS:
                in_flight.pop(0).result()

        for k, chunk in enumerate(_chunks(batches)):
            ids = chunk[S.ID]
            if retry is not None and len(retry):
                supersedes, attempts = retry.lookup(ids)
            else:
                supersedes, attempts = np.full(len(ids), "", object), np.zeros(len(ids), np.int32)
            todo_rows = np.flatnonzero(~done.contains(ids) | (supersedes != ""))
            columns = {**chunk, S.SUPERSEDES: supersedes.tolist(), S.ATTEMPT: (attempts + 1).tolist()}
            table = pa.Table.from_pydict(columns, schema=PLAN_SCHEMA)
            write(table.select(list(INPUTS_COLUMNS)), f"inputs/{key}-{k:06d}.parquet")
            pending = pa.concat_tables([pending, table.take(todo_rows)])
            full = pending.num_rows - pending.num_rows % todo_rows_per_file
            for start in range(0, full, todo_rows_per_file):
                write(pending.slice(start, todo_rows_per_file), f"todo/{key}-{num_todo_files:06d}.parquet")
                num_todo_files += 1
            pending = pending.slice(full)
            result.inputs += len(ids)
            result.todo += len(todo_rows)
            result.retried += int((supersedes != "").sum())
            result.labelled += sum(1 for v in chunk[S.LABEL_SOURCE] if v)
        if pending.num_rows:
            write(pending, f"todo/{key}-{num_todo_files:06d}.parquet")
        for future in in_flight:
            future.result()
    return result


def _chunks(batches: Iterable[dict[str, list]]) -> Iterator[dict[str, list]]:
    """Column batches cut to at most PLAN_ROWS_PER_FILE rows."""
    for items in batches:
        for start in range(0, len(items[S.ID]), PLAN_ROWS_PER_FILE):
            yield {c: v[start : start + PLAN_ROWS_PER_FILE] for c, v in items.items()}


def read_plan(batch: dict[str, np.ndarray], storage_cfg: StorageConfig) -> pa.Table:
    """Ray Data UDF: plan file URIs (column "plan_files", newline-separated) -> their work items (PLAN_SCHEMA)."""
    tables = []
    for uris in batch["plan_files"]:
        for uri in str(uris).split("\n"):
            tables.append(pq.read_table(io.BytesIO(read_bytes(uri, storage_cfg))).cast(PLAN_SCHEMA))
    return pa.concat_tables(tables) if tables else PLAN_SCHEMA.empty_table()


def list_inputs(
    input_uri: str,
    storage_cfg: StorageConfig,
    *,
    input_format: str = "auto",
    labels_uri: str | None = None,
    split: str | None = None,
) -> tuple[str, list[dict]]:
    """Every work item in this process, sorted by image_id: for small inputs (tests, tune-crf, the reference loop).

    The segment job never calls this: it plans in Ray tasks (``flow.plan_job``). Same units, same items.
    """
    fmt = detect_format(input_uri, storage_cfg) if input_format == "auto" else input_format
    source = plan_source(input_uri, fmt, labels_uri, storage_cfg)
    split_ids = frozenset(read_split(input_uri, split, storage_cfg)) if split and fmt == "voc" else None
    units = root_units(source, storage_cfg)
    items: list[dict] = []
    while units:
        unit = units.pop()
        batches, subunits, _ = list_unit(source, unit, storage_cfg, split_ids)
        units.extend(subunits)
        for cols in batches:
            items.extend(dict(zip(cols, row, strict=True)) for row in zip(*cols.values(), strict=True))
    return fmt, sorted(items, key=lambda it: it[S.ID])
