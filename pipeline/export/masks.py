"""After the job (write -> metrics -> **export**): a finished output's Parquet masks -> files other tools read.

``deeplab export --masks OUTPUT --to DIR`` reads ``OUTPUT/masks/*.parquet`` (``pipeline/schema.py``) and writes, for
every row whose status is ``ok``:

- ``--format png`` (default): ``DIR/<image_id>.png``, a VOC-style mask: mode P with the full 256-colour VOC palette
  (``schema.voc_palette``), pixel value = class index, 255 = void, like VOC's ``SegmentationClass`` files. Ids with
  ``/`` keep their folders. ``--raw`` exports the DCNN argmax (``raw_mask_png``) instead of the final mask.
- ``--format coco``: one ``DIR/coco.json`` with an image entry per row and, per image and class present, one
  annotation whose ``segmentation`` is COCO's compressed RLE (pycocotools), ``category_id`` = class index
  (0 = background), categories named from ``OUTPUT/_manifest.json`` (the checkpoint's class names).
- ``--overlay``: also ``DIR/<image_id>.overlay.jpg``, the input image (from the row's ``source``; a shard input's
  ``shard_uri#image_id`` is read from inside the shard) with every non-background class tinted in its VOC colour.
  The suffix keeps overlays next to their masks and can never collide with a mask (masks end in ``.png``).
  Overlays need the inputs still reachable (``deeplab demo``'s in-memory S3 is gone after the demo).

Rows whose status is not ``ok`` are not exported; they are listed with their status and error in
``DIR/_errors.csv``, together with rows this command could not export (status ``export_error``: mask unreadable,
image missing, size mismatch); the command then exits 1. ``DIR/_export.json`` records what was exported (which
output, final or raw, format).

Resumable: a PNG or overlay already in ``DIR`` is skipped (local files are written by rename and S3 objects appear
only when complete, so one that exists is whole); delete one and re-run to re-create it. Exporting final masks and
then raw ones (or another output) into the same ``DIR`` is refused instead of silently keeping the first set.
``coco.json`` is rebuilt on every run and written atomically. Large outputs run on Ray Data (``cluster.parquet``
reads the parts, then a ``map_batches`` whose tasks write the files and return one outcome row per image); small
ones in this process.
Both sides may be local paths or ``s3://``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image, ImageOps

from pipeline import storage
from pipeline.schema import ERROR, HEIGHT, ID, OK, SOURCE, STATUS, WIDTH, class_names, voc_palette
from pipeline.storage import StorageConfig

__all__ = [
    "FORMATS",
    "EXPORT_ERROR",
    "ExportSetup",
    "ExportError",
    "mask_png_voc",
    "overlay_image",
    "coco_annotations",
    "export_rows",
    "export_batch",
    "export_masks",
    "export_main",
]

log = logging.getLogger(__name__)

FORMATS = ("png", "coco")
EXPORT_ERROR = "export_error"  # status in _errors.csv of an ok row this command could not export
MASK_PNG, RAW_MASK_PNG, NUM_CLASSES = "mask_png", "raw_mask_png", "num_classes"
EXPORT_COLUMNS = (ID, SOURCE, STATUS, ERROR, HEIGHT, WIDTH, MASK_PNG, RAW_MASK_PNG, NUM_CLASSES)
ERRORS_FILE, RECORD_FILE, COCO_FILE = "_errors.csv", "_export.json", "coco.json"
OVERLAY_SUFFIX = ".overlay.jpg"
RAY_MIN_ROWS = 2000  # below this Ray's start-up costs more than it saves
_BATCH_ROWS = 64  # rows per Ray batch: mask PNGs are small; overlays fetch one image at a time
OVERLAY_ALPHA = 0.5
# What reading or writing one object can raise (missing, unreachable, no credentials, denied): that row's error.
_STORAGE_ERRORS = (OSError, BotoCoreError, ClientError, pa.ArrowException)
_VOC_PALETTE = voc_palette()
_PALETTE_RGB = np.array(_VOC_PALETTE, np.float32).reshape(256, 3)

# One outcome row per input row (what the Ray tasks return to the driver).
OUTCOME_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field("outcome", pa.string()),  # written | skipped | not_ok | failed
        pa.field(STATUS, pa.string()),
        pa.field(ERROR, pa.string()),
        pa.field("coco", pa.string()),  # JSON {"image": {...}, "annotations": [...]} for --format coco
    ]
)


class ExportError(ValueError):
    """The export cannot start (no masks, options that contradict what DIR already holds); the message says why."""


@dataclass(frozen=True)
class ExportSetup:
    """What each export task needs (pickled to Ray workers; holds no secrets)."""

    dest_uri: str
    storage_cfg: StorageConfig
    fmt: str = "png"
    raw: bool = False
    overlay: bool = False

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ExportError(f"format must be one of {FORMATS}, got {self.fmt!r}")


# --- per-image encoders -------------------------------------------------------------------------------------------


def decode_mask(data: bytes) -> np.ndarray:
    """Stored mask PNG (mode L or P, pixel value = class index) -> uint8 (H, W). Pillow's bomb guard stays on."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"mask PNG must be mode L or P (class indices), got mode {im.mode}")
        return np.array(im, dtype=np.uint8)


def mask_png_voc(mask: np.ndarray) -> bytes:
    """uint8 (H, W) class indices -> VOC-style PNG: mode P, the full 256-entry VOC palette (255 = void colour)."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be uint8 (H, W), got {mask.dtype} {mask.shape}")
    im = Image.fromarray(np.ascontiguousarray(mask), mode="L")
    im.putpalette(_VOC_PALETTE)  # "L" -> "P", pixel values unchanged
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def overlay_image(rgb: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGB uint8 (H, W, 3) with every pixel of class >= 1 (void excepted) blended with its VOC colour."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(
            f"image is {rgb.shape[1]}x{rgb.shape[0]} but its mask is {mask.shape[1]}x{mask.shape[0]}"
        )
    out = rgb.astype(np.float32)
    tint = (mask != 0) & (mask != 255)  # background and void keep the image as it is
    out[tint] = (1 - alpha) * out[tint] + alpha * _PALETTE_RGB[mask[tint]]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # 4:4:4: chroma subsampling would smear the tint across class edges
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=90, subsampling=0)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """Image bytes -> RGB uint8 (H, W, 3) after EXIF orientation (as the decode stage sizes the mask)."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            im = Image.alpha_composite(black, rgba)  # the decode stage composites alpha on black too
        return np.asarray(im.convert("RGB"))


def coco_annotations(mask: np.ndarray) -> list[dict]:
    """One annotation per class present in ``mask`` (void skipped): compressed RLE, area, bbox [x, y, w, h]."""
    from pycocotools import mask as coco_mask

    classes = [int(c) for c in np.unique(mask) if c != 255]
    if not classes:
        return []
    stack = np.asfortranarray(np.stack([mask == c for c in classes], axis=-1).astype(np.uint8))  # (H, W, K)
    rles = coco_mask.encode(stack)
    areas, boxes = coco_mask.area(rles), coco_mask.toBbox(rles)
    return [
        {
            "category_id": cls,
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(area),
            "bbox": [float(v) for v in box],
            "iscrowd": 0,
        }
        for cls, rle, area, box in zip(classes, rles, areas, boxes, strict=True)
    ]


# --- per-row work (both paths) ------------------------------------------------------------------------------------


def _shard_of(row: dict) -> str | None:
    """``shard_uri#image_id`` sources (Parquet shard inputs) -> the shard URI; None for a plain object URI."""
    source, image_id = row.get(SOURCE) or "", row[ID]
    suffix = f"#{image_id}"
    return source[: -len(suffix)] if source.endswith(suffix) else None


def _shard_images(rows: Sequence[dict], cfg: StorageConfig) -> dict[tuple[str, str], bytes | None]:
    """Image bytes of the rows whose source is inside a shard: one filtered read per shard, not one per row."""
    wanted: dict[str, set[str]] = {}
    for row in rows:
        if (shard := _shard_of(row)) is not None:
            wanted.setdefault(shard, set()).add(row[ID])
    out: dict[tuple[str, str], bytes | None] = {}
    for shard, ids in sorted(wanted.items()):
        fs, path = storage.filesystem(shard, cfg)
        table = pq.read_table(
            path, filesystem=fs, columns=["image_id", "image"], filters=[("image_id", "in", sorted(ids))]
        )
        for image_id, image in zip(
            table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True
        ):
            out[(shard, image_id)] = image
    return out


def _image_bytes(row: dict, shard_images: dict, cfg: StorageConfig) -> bytes:
    shard = _shard_of(row)
    if shard is None:
        return storage.read_bytes(row[SOURCE], cfg)
    data = shard_images.get((shard, row[ID]))
    if data is None:
        raise FileNotFoundError(f"image {row[ID]!r} not in shard {shard}")
    return data


def _row_mask(row: dict, setup: ExportSetup) -> np.ndarray:
    # A null raw_mask_png means the CRF never ran on the row: mask_png is then the DCNN mask (pipeline/metrics/evaluate.py).
    data = row.get(RAW_MASK_PNG) if setup.raw else None
    data = data if data is not None else row.get(MASK_PNG)
    if data is None:
        raise ValueError("status is ok but the row has no mask")
    mask = decode_mask(data)
    height, width = row.get(HEIGHT), row.get(WIDTH)
    if height and width and mask.shape != (height, width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, the row says {width}x{height}")
    return mask


def _targets(image_id: str, setup: ExportSetup) -> tuple[str | None, str | None]:
    # One file per id: an id that is not a canonical relative path ('a//b', 'a/', '/a') would share a file with
    # another id ('a/b') on a filesystem, so it is refused (its row says which file it would have written).
    canonical = posixpath.normpath(image_id)
    if canonical != image_id or image_id.startswith("/"):
        raise ValueError(
            f"it is not a canonical path: it would write the file of id {canonical.lstrip('/')!r}"
        )
    mask_uri = storage.join(setup.dest_uri, f"{image_id}.png") if setup.fmt == "png" else None
    overlay_uri = storage.join(setup.dest_uri, f"{image_id}{OVERLAY_SUFFIX}") if setup.overlay else None
    return mask_uri, overlay_uri


def _outcome(
    image_id: str, outcome: str, status: str, error: str | None = None, coco: str | None = None
) -> dict:
    return {ID: image_id, "outcome": outcome, STATUS: status, ERROR: error, "coco": coco}


def _needs_work(row: dict, setup: ExportSetup) -> tuple[str | None, str | None]:
    """The targets still missing for an ok row (None for one that is there or not asked for)."""
    mask_uri, overlay_uri = _targets(row[ID], setup)
    if mask_uri is not None and storage.exists(mask_uri, setup.storage_cfg):
        mask_uri = None
    if overlay_uri is not None and storage.exists(overlay_uri, setup.storage_cfg):
        overlay_uri = None
    return mask_uri, overlay_uri


def export_rows(rows: Iterable[dict], setup: ExportSetup) -> list[dict]:
    """The per-row work of both paths: output rows (dicts of EXPORT_COLUMNS) -> one outcome dict per row."""
    cfg = setup.storage_cfg
    rows = list(rows)
    out: list[dict] = []
    todo: list[tuple[dict, str | None, str | None]] = []
    for row in rows:
        image_id = str(row[ID])
        if row[STATUS] != OK:
            out.append(_outcome(image_id, "not_ok", str(row[STATUS]), row.get(ERROR)))
            continue
        try:
            mask_uri, overlay_uri = _needs_work(row, setup)
        except ValueError as e:  # an id with '.' or '..' segments: it would escape DIR
            out.append(_outcome(image_id, "failed", EXPORT_ERROR, f"cannot export id {image_id!r}: {e}"))
            continue
        if mask_uri is None and overlay_uri is None and setup.fmt == "png":
            out.append(_outcome(image_id, "skipped", OK))
            continue
        todo.append((row, mask_uri, overlay_uri))
    shard_images: dict = {}
    overlay_rows = [row for row, _, overlay_uri in todo if overlay_uri is not None]
    if overlay_rows:
        try:
            shard_images = _shard_images(overlay_rows, cfg)
        except _STORAGE_ERRORS as e:  # each row then fails alone below with "not in shard"
            log.warning(
                "cannot read the shards of %d overlay images: %s", len(overlay_rows), storage.redact(str(e))
            )
    for row, mask_uri, overlay_uri in todo:
        image_id = str(row[ID])
        try:
            mask = _row_mask(row, setup)
            coco = None
            if setup.fmt == "coco":
                # file_name: the input image relative to the input root (the id plus the source's extension)
                ext = "" if _shard_of(row) is not None else Path(str(row.get(SOURCE) or "")).suffix
                image = {
                    "file_name": f"{image_id}{ext}",
                    "height": int(mask.shape[0]),
                    "width": int(mask.shape[1]),
                }
                image |= {"deeplab_image_id": image_id, "source": row.get(SOURCE)}
                coco = json.dumps(
                    {"image": image, "annotations": coco_annotations(mask)}, separators=(",", ":")
                )
            if mask_uri is not None:
                storage.write_bytes(mask_uri, mask_png_voc(mask), cfg)
            if overlay_uri is not None:
                rgb = decode_rgb(_image_bytes(row, shard_images, cfg))
                storage.write_bytes(overlay_uri, _jpeg(overlay_image(rgb, mask)), cfg)
        except (*_STORAGE_ERRORS, ValueError, Image.DecompressionBombError) as e:
            # Expected data problems (unreadable mask or image, size mismatch, missing object) become error rows.
            msg = storage.redact(f"{type(e).__name__}: {e}")
            log.warning("cannot export %s: %s", image_id, msg)
            out.append(_outcome(image_id, "failed", EXPORT_ERROR, msg))
            continue
        out.append(_outcome(image_id, "written", OK, coco=coco))
    return out


def export_batch(batch: pa.Table, setup: ExportSetup) -> pa.Table:
    """Ray Data UDF: a batch of output rows -> one outcome row each (the files are written as a side effect)."""
    return pa.Table.from_pylist(export_rows(batch.to_pylist(), setup), schema=OUTCOME_SCHEMA)


# --- driver -------------------------------------------------------------------------------------------------------


def _mask_paths(output_uri: str, cfg: StorageConfig) -> tuple:
    masks_uri = storage.join(output_uri, "masks")
    files = storage.list_files(masks_uri, cfg, suffixes=(".parquet",))
    if not files:
        raise ExportError(f"no Parquet files under {masks_uri}: expected the OUTPUT of a segment run")
    fs = storage.filesystem(files[0], cfg)[0]
    paths = [storage.filesystem(f, cfg)[1] for f in files]
    names = pads.dataset(paths, filesystem=fs, format="parquet").schema.names
    missing = [c for c in EXPORT_COLUMNS if c not in names]
    if missing:
        raise ExportError(f"{masks_uri} lacks columns {missing}: expected the schema of pipeline/schema.py")
    return fs, paths


def _iter_rows_local(fs, paths: list[str]) -> Iterator[list[dict]]:
    for path in paths:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, columns=list(EXPORT_COLUMNS)):
                yield batch.to_pylist()


def _run_ray(fs, paths: list[str], setup: ExportSetup, address: str | None) -> Iterator[dict]:
    from pipeline.cluster.parquet import parquet_files_dataset
    from pipeline.cluster.ray_init import init_ray

    init_ray(address)  # no-op when Ray is up; else RAY_ADDRESS or a local Ray, progress bars off
    ds = parquet_files_dataset(paths, fs, EXPORT_COLUMNS)
    ds = ds.map_batches(
        export_batch, batch_format="pyarrow", batch_size=_BATCH_ROWS, fn_kwargs={"setup": setup}
    )
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=1024):
        yield from batch.to_pylist()


def _local_key(uri: str) -> str:
    return uri.rstrip("/") if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


def _check_record(output_uri: str, setup: ExportSetup) -> dict:
    """DIR/_export.json: what DIR holds. Refuse to mix final and raw masks, formats or outputs in one DIR."""
    record = {
        "masks": _local_key(output_uri),
        "masks_kind": "raw" if setup.raw else "final",
        "format": setup.fmt,
    }
    uri = storage.join(setup.dest_uri, RECORD_FILE)
    if storage.exists(uri, setup.storage_cfg):
        try:
            held = json.loads(storage.read_bytes(uri, setup.storage_cfg))
        except (ValueError, UnicodeDecodeError) as e:
            raise ExportError(
                f"{uri} is not the JSON this command writes ({e}): remove it or use another --to"
            ) from e
        differs = {k: (held.get(k), v) for k, v in record.items() if held.get(k) != v}
        if differs:
            what = ", ".join(f"{k} {a!r} (asked: {b!r})" for k, (a, b) in differs.items())
            raise ExportError(
                f"{setup.dest_uri} already holds an export with {what}: use another --to directory"
            )
    return record


def _class_names(output_uri: str, fs, paths: list[str], cfg: StorageConfig) -> list[str]:
    """The checkpoint's class names from the job manifest, else the defaults for the rows' num_classes."""
    manifest_uri = storage.join(output_uri, "_manifest.json")
    names: list[str] | None = None
    if storage.exists(manifest_uri, cfg):
        try:
            names = json.loads(storage.read_bytes(manifest_uri, cfg)).get("class_names")
        except (ValueError, AttributeError) as e:
            log.warning("%s unreadable (%s): default class names", manifest_uri, e)
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=[NUM_CLASSES])
    counts = sorted(int(v) for v in pc.unique(table[NUM_CLASSES].drop_null()).to_pylist())
    if len(counts) > 1:
        raise ExportError(f"all rows must have the same num_classes, got {counts}")
    if not counts:
        return list(names or [])
    if names and len(names) == counts[0]:
        return [str(n) for n in names]
    return class_names(counts[0])


def _write_coco(outcomes: list[dict], names: list[str], output_uri: str, setup: ExportSetup) -> str:
    images, annotations = [], []
    for image_number, row in enumerate(
        sorted((o for o in outcomes if o["coco"]), key=lambda o: o[ID]), start=1
    ):
        entry = json.loads(row["coco"])
        images.append({"id": image_number, **entry["image"]})
        for ann in entry["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_number, **ann})
    doc = {
        "info": {
            "description": f"deeplab export of {output_uri} ({'DCNN' if setup.raw else 'final'} masks)",
            "segmentation": "semantic: one RLE per image and class present; category_id = class index",
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in enumerate(names)],
    }
    uri = storage.join(setup.dest_uri, COCO_FILE)
    storage.write_bytes(uri, json.dumps(doc, separators=(",", ":")).encode(), setup.storage_cfg)
    return uri


def _write_errors(errors: list[dict], setup: ExportSetup) -> str:
    from pipeline.metrics.page import csv_cell

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([ID, STATUS, ERROR])
    for row in sorted(errors, key=lambda r: r[ID]):  # ids are untrusted text: never a spreadsheet formula
        writer.writerow([csv_cell(str(row[ID])), row[STATUS], csv_cell(row[ERROR] or "")])
    uri = storage.join(setup.dest_uri, ERRORS_FILE)
    storage.write_bytes(uri, buf.getvalue().encode(), setup.storage_cfg)
    return uri


def export_masks(
    output_uri: str,
    dest_uri: str,
    *,
    storage_cfg: StorageConfig | None = None,
    fmt: str = "png",
    raw: bool = False,
    overlay: bool = False,
    use_ray: bool | None = None,
    address: str | None = None,
) -> dict:
    """Export ``output_uri``'s masks to ``dest_uri`` (see the module docstring); returns the counts and paths.

    ``use_ray``: None = Ray Data from ``RAY_MIN_ROWS`` rows on, else as given; Ray is joined at ``address`` (or
    RAY_ADDRESS) or started locally when it is not running.
    Returns ``{"rows", "written", "skipped", "not_ok", "failed", "errors_csv", "coco_json", "errors": [...]}``.
    """
    storage_cfg = storage_cfg or StorageConfig.from_env()
    setup = ExportSetup(dest_uri=dest_uri, storage_cfg=storage_cfg, fmt=fmt, raw=raw, overlay=overlay)
    storage.check_access(output_uri, storage_cfg, what="input")
    storage.check_access(dest_uri, storage_cfg, what="output")
    fs, paths = _mask_paths(output_uri, storage_cfg)
    record = _check_record(output_uri, setup)
    names = _class_names(output_uri, fs, paths, storage_cfg) if fmt == "coco" else []
    num_rows = pads.dataset(paths, filesystem=fs, format="parquet").count_rows()
    if use_ray is None:
        use_ray = num_rows >= RAY_MIN_ROWS
    storage.write_bytes(
        storage.join(dest_uri, RECORD_FILE), json.dumps(record, indent=1).encode(), storage_cfg
    )
    log.info(
        "exporting %d rows of %s to %s (%s, %s)",
        num_rows,
        output_uri,
        dest_uri,
        fmt,
        "Ray" if use_ray else "local",
    )
    if use_ray:
        outcomes = list(_run_ray(fs, paths, setup, address))
    else:
        outcomes = [o for rows in _iter_rows_local(fs, paths) for o in export_rows(rows, setup)]
    counts = Counter(o["outcome"] for o in outcomes)
    errors = [o for o in outcomes if o["outcome"] in ("not_ok", "failed")]
    result = {
        "rows": len(outcomes),
        **{k: counts.get(k, 0) for k in ("written", "skipped", "not_ok", "failed")},
        "errors_csv": _write_errors(errors, setup),
        "coco_json": _write_coco(outcomes, names, output_uri, setup) if fmt == "coco" else None,
        "errors": sorted(({k: o[k] for k in (ID, STATUS, ERROR)} for o in errors), key=lambda e: e[ID]),
    }
    return result


def export_main(argv: list[str] | None = None) -> int:
    """``deeplab export --masks OUTPUT --to DIR [--format png|coco] [--raw] [--overlay]``."""
    p = argparse.ArgumentParser(
        prog="deeplab export",
        description="Write a segment output's masks as VOC-style PNGs (or one COCO RLE JSON), optionally overlays.",
    )
    p.add_argument("--masks", required=True, help="the segment job's OUTPUT prefix (local path or s3://)")
    p.add_argument("--to", required=True, dest="dest", help="destination directory or s3:// prefix")
    p.add_argument(
        "--format", choices=FORMATS, default="png", help="png: DIR/<image_id>.png; coco: DIR/coco.json"
    )
    p.add_argument(
        "--raw", action="store_true", help="export the DCNN masks (raw_mask_png), not the final ones"
    )
    p.add_argument("--overlay", action="store_true", help=f"also write DIR/<image_id>{OVERLAY_SUFFIX}")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ray", dest="use_ray", action="store_true", default=None, help="always use Ray Data")
    mode.add_argument("--no-ray", dest="use_ray", action="store_false", help="single process")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    args = p.parse_args(argv)
    cfg = StorageConfig.from_env(endpoint_url=args.endpoint_url)
    try:
        result = export_masks(
            args.masks,
            args.dest,
            storage_cfg=cfg,
            fmt=args.format,
            raw=args.raw,
            overlay=args.overlay,
            use_ray=args.use_ray,
            address=args.address,
        )
    except ExportError as e:
        from pipeline.console.logs import user_stream

        print(f"deeplab export: error: {storage.redact(str(e))}", file=user_stream())  # not into the log file
        return 2
    what = "DCNN" if args.raw else "final"
    done = result["coco_json"] or args.dest
    print(f"exported {result['written']} {what} masks to {done} ({result['skipped']} already there, skipped)")
    if result["errors"]:
        print(f"{len(result['errors'])} rows not exported ({result['not_ok']} error rows, {result['failed']} failed here), "
              f"listed in {result['errors_csv']}:")  # fmt: skip
        for e in result["errors"][:10]:
            print(f"  {e[ID]}  {e[STATUS]}  {e[ERROR] or ''}")
        if len(result["errors"]) > 10:
            print(f"  ... {len(result['errors']) - 10} more")
    from pipeline.console.summary import print_logs_line

    print_logs_line()
    return 1 if result["failed"] else 0
