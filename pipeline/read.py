"""Read stage: list the inputs into work items on the driver, then fetch their bytes inside Ray tasks.

Three input layouts, local or ``s3://``:
- a VOC root (``JPEGImages/``, optional ``SegmentationClass/`` and ``ImageSets/Segmentation/<split>.txt``);
- a prefix of images (every object under it is an input), with an optional parallel prefix of label PNGs;
- the Parquet shards written by ``deeplab shard`` (a ``_manifest.json`` beside them).

Listing yields only URIs (no image bytes), so resuming filters finished images before anything is downloaded.
Fetching is per row: a missing or unreadable object becomes an error row, never a failed block.
"""

from __future__ import annotations

import json
import logging
import posixpath

import numpy as np
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.storage import StorageConfig, filesystem, is_s3, join, list_files, read_bytes, redact

__all__ = ["WorkItem", "detect_format", "list_inputs", "fetch_batch", "SHARD"]

log = logging.getLogger(__name__)

SHARD = "shard"  # work-item column: shard URI for shard inputs (the row's bytes live inside it), else ""
WorkItem = dict  # {image_id, source, label_source, shard}

IMAGE_DIR, LABEL_DIR, SETS_DIR = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation"


def detect_format(input_uri: str, storage_cfg: StorageConfig) -> str:
    """voc if the input has JPEGImages/, shards if it has _manifest.json with shards, else images."""
    from pipeline.storage import exists

    if exists(join(input_uri, "_manifest.json"), storage_cfg):
        return "shards"
    if list_files(join(input_uri, IMAGE_DIR), storage_cfg)[:1]:
        return "voc"
    return "images"


def _strip_ext(rel: str) -> str:
    root, ext = posixpath.splitext(rel)
    return root if ext else rel


def _relative(uri: str, prefix: str) -> str:
    prefix = prefix.rstrip("/") + "/"
    if not is_s3(prefix):
        from pathlib import Path

        return Path(uri).resolve().relative_to(Path(prefix).expanduser().resolve()).as_posix()
    return uri[len(prefix) :]


def _ids_for(uris: list[str], prefix: str) -> list[str]:
    """image_id = key relative to the prefix without extension; colliding stems keep their extension."""
    rels = [_relative(u, prefix) for u in uris]
    stems = [_strip_ext(r) for r in rels]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else r for s, r in zip(stems, rels, strict=True)]


def list_inputs(
    input_uri: str,
    storage_cfg: StorageConfig,
    *,
    input_format: str = "auto",
    labels_uri: str | None = None,
    split: str | None = None,
) -> tuple[str, list[WorkItem]]:
    """Return (format, items sorted by image_id). Shard inputs yield one item per image (ids from the shards)."""
    fmt = detect_format(input_uri, storage_cfg) if input_format == "auto" else input_format
    if fmt == "shards":
        return fmt, _list_shards(input_uri, storage_cfg)
    if fmt == "voc":
        image_root = join(input_uri, IMAGE_DIR)
        label_root = labels_uri or join(input_uri, LABEL_DIR)
        uris = list_files(image_root, storage_cfg)
        if split:
            wanted = set(_read_split(input_uri, split, storage_cfg))
            uris = [u for u in uris if _strip_ext(_relative(u, image_root)) in wanted]
            missing = wanted - {_strip_ext(_relative(u, image_root)) for u in uris}
            if missing:
                log.warning("%d ids of split %r have no image under %s", len(missing), split, image_root)
    else:
        image_root, label_root = input_uri, labels_uri
        uris = list_files(image_root, storage_cfg)
    ids = _ids_for(uris, image_root)
    label_ids: set[str] = set()
    if label_root:
        label_ids = {
            _strip_ext(_relative(u, label_root)) for u in list_files(label_root, storage_cfg, (".png",))
        }
    items = [
        {
            S.ID: image_id,
            S.SOURCE: uri,
            # Plain concatenation: keys are data ('../x' is a legal S3 key), not paths to normalise.
            S.LABEL_SOURCE: f"{label_root.rstrip('/')}/{image_id}.png" if image_id in label_ids else None,
            SHARD: "",
        }
        for image_id, uri in zip(ids, uris, strict=True)
    ]
    if label_root and not label_ids:
        log.warning("no label PNGs found under %s: metrics will not be computed", label_root)
    return fmt, sorted(items, key=lambda it: it[S.ID])


def _read_split(voc_root: str, split: str, storage_cfg: StorageConfig) -> list[str]:
    text = read_bytes(join(voc_root, SETS_DIR, f"{split}.txt"), storage_cfg).decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _list_shards(input_uri: str, storage_cfg: StorageConfig) -> list[WorkItem]:
    manifest = json.loads(read_bytes(join(input_uri, "_manifest.json"), storage_cfg))
    items: list[WorkItem] = []
    for entry in manifest["shards"]:
        name = entry["path"] if isinstance(entry, dict) else entry
        shard_uri = name if "://" in name or name.startswith("/") else join(input_uri, name)
        fs, path = filesystem(shard_uri, storage_cfg)
        ids = pq.read_table(path, columns=["image_id", "label"], filesystem=fs)
        has_label = ids.column("label").is_valid().to_pylist()
        for image_id, labelled in zip(ids.column("image_id").to_pylist(), has_label, strict=True):
            items.append(
                {
                    S.ID: image_id,
                    S.SOURCE: f"{shard_uri}#{image_id}",
                    S.LABEL_SOURCE: f"{shard_uri}#{image_id}" if labelled else None,
                    SHARD: shard_uri,
                }
            )
    return sorted(items, key=lambda it: it[S.ID])


def fetch_batch(batch: dict[str, np.ndarray], storage_cfg: StorageConfig) -> dict[str, np.ndarray]:
    """Work items -> rows with IMAGE_BYTES / LABEL_BYTES, STATUS and ERROR. One bad object = one error row."""
    n = len(batch[S.ID])
    image_bytes: list[bytes | None] = [None] * n
    label_bytes: list[bytes | None] = [None] * n
    status = [S.OK] * n
    error: list[str | None] = [None] * n
    label_problem: list[str | None] = [None] * n
    shard_rows = _read_shard_rows({s for s in batch[SHARD] if s}, set(batch[S.ID]), storage_cfg)
    for i in range(n):
        image_id, source, shard = batch[S.ID][i], batch[S.SOURCE][i], batch[SHARD][i]
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
