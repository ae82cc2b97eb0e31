"""Metrics stage driver (after write): recompute every metric from a finished output's Parquet masks and the labels.

Reads ``OUTPUT/masks/*.parquet`` (``pipeline/schema.py``), decodes each row's masks and its ground-truth PNG (at the
row's ``label_source``, or ``labels_uri/<image_id>.png``), sums confusions and trimap bands in a
``MetricsAccumulator`` and writes ``OUTPUT/report/`` via ``pipeline/metrics/report.py``. The per-row work runs on Ray Data
(one partial accumulator per batch, merged on the driver) or in this process; both give identical numbers because
everything summed is an integer count and per-image scores are ordered before any float is aggregated.

Row accounting: status != "ok" -> ``num_errors`` (excluded; a "label_error" row has masks but no usable label);
ok without a label -> ``num_unlabelled``; ok whose label or masks fail here (unreadable, wrong size, values out of
range) -> ``num_eval_errors``. The CRF ran on a row iff ``crf_node`` (set by the CRF stage) or ``confusion_crf`` is
non-null; otherwise ``mask_png`` is the DCNN mask (``pipeline/stages/encode.py`` then writes the same PNG in both mask
columns) and the row adds nothing to the CRF metrics. A null ``raw_mask_png`` also means "raw only".
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import pickle
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline import storage
from pipeline.cluster.parquet import parquet_files_dataset
from pipeline.metrics import report
from pipeline.metrics import timing as report_time
from pipeline.metrics.confusion import BAND_SOURCES, VOC_CLASS_NAMES, MetricsAccumulator
from pipeline.schema import ERROR, ID, LABEL_SOURCE, OK, SOURCE, STATUS
from pipeline.schema import class_names as schema_class_names
from pipeline.stages.labels import MAX_LABEL_BYTES, decode_label_png

__all__ = [
    "EVAL_COLUMNS",
    "EvalSetup",
    "decode_mask_png",
    "decode_label_png",
    "evaluate_rows",
    "evaluate_batch",
    "evaluate_output",
]

log = logging.getLogger(__name__)

MASK_PNG = "mask_png"
RAW_MASK_PNG = "raw_mask_png"
CONFUSION_RAW = "confusion_raw"
CONFUSION_CRF = "confusion_crf"
NUM_CLASSES = "num_classes"
MODEL_VARIANT = "model_variant"
MODEL_DIGEST = "model_digest"
MANIFEST = "_manifest.json"  # written by the segment job beside masks/ (pipeline/stages/write.py)
CRF_NODE = "crf_node"
EVAL_COLUMNS = (
    *(ID, SOURCE, LABEL_SOURCE, STATUS, ERROR),
    *(MASK_PNG, RAW_MASK_PNG, CONFUSION_RAW, CONFUSION_CRF, CRF_NODE),
)
_BATCH_ROWS = 128  # rows per batch: PNG bytes of 128 rows, one decoded image at a time; one partial per batch


@dataclass(frozen=True)
class EvalSetup:
    """What each evaluation task needs (pickled to Ray workers; holds no secrets)."""

    num_classes: int
    widths: tuple[int, ...]
    band_sources: tuple[str, ...]
    storage_cfg: storage.StorageConfig
    labels_uri: str | None = None

    def new_accumulator(self) -> MetricsAccumulator:
        return MetricsAccumulator(self.num_classes, self.widths, self.band_sources)


def decode_mask_png(data: bytes) -> np.ndarray:
    """PNG bytes of a class-index mask -> uint8 (H, W)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"mask PNG must be mode L or P (class indices), got mode {im.mode}")
        return np.array(im, dtype=np.uint8)


def _label_uri(row: dict, labels_uri: str | None) -> str | None:
    if labels_uri:
        return storage.join(labels_uri, f"{row[ID]}.png")
    return row.get(LABEL_SOURCE) or None


def _masks(row: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(raw, crf) masks of an ok row; crf None when the CRF did not run on it."""
    if row.get(MASK_PNG) is None:
        raise ValueError("status is ok but mask_png is null")
    mask = decode_mask_png(row[MASK_PNG])
    crf_ran = row.get(CRF_NODE) is not None or row.get(CONFUSION_CRF) is not None
    if row.get(RAW_MASK_PNG) is None or not crf_ran:
        return mask, None
    return decode_mask_png(row[RAW_MASK_PNG]), mask


def _evaluate_row(row: dict, setup: EvalSetup, acc: MetricsAccumulator) -> None:
    image_id = row[ID]
    if row[STATUS] != OK:
        acc.add_error(image_id, row[STATUS], row.get(ERROR))
        return
    label_uri = _label_uri(row, setup.labels_uri)
    if label_uri is None:
        acc.add_unlabelled()
        return
    try:
        gt = decode_label_png(storage.read_bytes(label_uri, setup.storage_cfg, max_bytes=MAX_LABEL_BYTES))
        raw, crf = _masks(row)
        acc.add_image(
            image_id, gt, raw, crf, stored_raw=row.get(CONFUSION_RAW), stored_crf=row.get(CONFUSION_CRF)
        )
    except (OSError, ValueError, pa.ArrowException) as e:
        # Expected data problems (missing/corrupt label, size mismatch, out-of-range values) become counts.
        msg = storage.redact(f"{type(e).__name__}: {e}")
        log.warning("cannot evaluate %s against %s: %s", image_id, label_uri, msg)
        acc.add_eval_error(image_id, msg)


def evaluate_rows(rows: Iterable[dict], setup: EvalSetup) -> MetricsAccumulator:
    """The per-row work of both paths: rows (dicts of output columns) -> one accumulator."""
    acc = setup.new_accumulator()
    for row in rows:
        _evaluate_row(row, setup, acc)
    return acc


def evaluate_batch(batch: pa.Table, setup: EvalSetup) -> pa.Table:
    """Ray Data UDF: a batch of output rows -> one row holding the pickled partial ``MetricsAccumulator``."""
    acc = evaluate_rows(batch.to_pylist(), setup)
    return pa.table({"partial": pa.array([pickle.dumps(acc, protocol=pickle.HIGHEST_PROTOCOL)], pa.binary())})


def _mask_files(output_uri: str, cfg: storage.StorageConfig) -> list[str]:
    masks_uri = storage.join(output_uri, "masks")
    files = storage.list_files(masks_uri, cfg, suffixes=(".parquet",))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {masks_uri}: expected the output of a segment run")
    return files


def _fs_paths(files: Sequence[str], cfg: storage.StorageConfig) -> tuple:
    fs = storage.filesystem(files[0], cfg)[0]
    return fs, [storage.filesystem(f, cfg)[1] for f in files]


def _read_metadata(fs, paths: list[str]) -> tuple[int | None, list[str]]:
    """num_classes (must agree across rows) and the model variants, from a column-only scan."""
    dataset = pads.dataset(paths, filesystem=fs, format="parquet")
    names = dataset.schema.names
    missing = [c for c in (*EVAL_COLUMNS, NUM_CLASSES) if c not in names]
    if missing:
        raise ValueError(f"output Parquet lacks columns {missing}: expected the schema of pipeline/schema.py")
    cols = [NUM_CLASSES] + ([MODEL_VARIANT] if MODEL_VARIANT in names else [])
    table = dataset.to_table(columns=cols)
    counts = sorted(int(v) for v in pc.unique(table[NUM_CLASSES].drop_null()).to_pylist())
    if len(counts) > 1:
        raise ValueError(f"all rows must have the same num_classes, got {counts}")
    variants: list[str] = []
    if MODEL_VARIANT in names:
        variants = sorted(str(v) for v in pc.unique(table[MODEL_VARIANT].drop_null()).to_pylist())
    return (counts[0] if counts else None), variants


def _iter_rows_local(fs, paths: list[str]) -> Iterator[dict]:
    for path in paths:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, columns=list(EVAL_COLUMNS)):
                yield from batch.to_pylist()


def _evaluate_ray(fs, paths: list[str], setup: EvalSetup) -> MetricsAccumulator:
    ds = parquet_files_dataset(paths, fs, EVAL_COLUMNS)
    ds = ds.map_batches(
        evaluate_batch, batch_format="pyarrow", batch_size=_BATCH_ROWS, fn_kwargs={"setup": setup}
    )
    acc = setup.new_accumulator()
    for row in ds.iter_rows():
        acc.merge(pickle.loads(row["partial"]))
    return acc


def _load_examples(
    fs, paths: list[str], ids: dict[str, str], setup: EvalSetup, acc: MetricsAccumulator
) -> list[report.OverlayExample]:
    """Masks, ground truth and image for the few best/worst ids (``ids``: id -> "best"|"worst")."""
    if not ids:
        return []
    cols = [ID, SOURCE, LABEL_SOURCE, MASK_PNG, RAW_MASK_PNG, CONFUSION_CRF, CRF_NODE]
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(
        columns=cols, filter=pc.field(ID).isin(list(ids)) & (pc.field(STATUS) == OK)
    )
    scores = {s.image_id: s for s in acc.images}
    rows = {r[ID]: r for r in table.to_pylist()}
    out: list[report.OverlayExample] = []
    for image_id, kind in ids.items():
        row = rows.get(image_id)
        if row is None:
            continue
        try:
            gt = decode_label_png(storage.read_bytes(_label_uri(row, setup.labels_uri), setup.storage_cfg))
            mask = decode_mask_png(row[MASK_PNG])
            raw, crf = (
                (mask, None) if row[RAW_MASK_PNG] is None else (decode_mask_png(row[RAW_MASK_PNG]), mask)
            )
        except (OSError, ValueError, pa.ArrowException) as e:
            log.warning("overlay for %s skipped: %s", image_id, storage.redact(str(e)))
            continue
        image = None
        try:
            with Image.open(io.BytesIO(storage.read_bytes(row[SOURCE], setup.storage_cfg))) as im:
                image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            if image.shape[:2] != gt.shape:
                log.warning(
                    "image %s is %s but its label is %s: overlay without the image",
                    image_id,
                    image.shape,
                    gt.shape,
                )
                image = None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("image for %s unreadable, overlay without it: %s", image_id, storage.redact(str(e)))
        s = scores[image_id]
        out.append(
            report.OverlayExample(
                image_id=image_id,
                kind=kind,
                image=image,
                gt=gt,
                raw=raw,
                crf=crf,
                mean_iou_raw=s.mean_iou_raw,
                mean_iou_crf=s.mean_iou_crf,
            )
        )
    return out


def _written_utc(output_uri: str, cfg: storage.StorageConfig) -> tuple[str, str] | None:
    """The oldest and newest modification time of the Parquet parts (one listing), as UTC minutes."""
    try:
        fs, path = storage.filesystem(storage.join(output_uri, "masks"), cfg)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except (OSError, ValueError) as e:
        log.warning("part times of %s unknown: %s", output_uri, storage.redact(str(e)))
        return None
    times = sorted(i.mtime for i in infos if i.path.endswith(".parquet") and i.mtime is not None)
    if not times:
        return None

    def utc(t: datetime.datetime) -> str:
        t = t if t.tzinfo else t.replace(tzinfo=datetime.UTC)
        return t.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M")

    return utc(times[0]), utc(times[-1])


def _read_manifest(output_uri: str, cfg: storage.StorageConfig) -> dict:
    """The segment job's manifest when there is one (a report made after the run, e.g. from a local copy)."""
    try:
        return json.loads(storage.read_bytes(storage.join(output_uri, MANIFEST), cfg))
    except (OSError, ValueError):
        return {}


def _run_facts(
    fs, paths: list[str], output_uri: str, cfg: storage.StorageConfig, prices: report_time.Prices,
    run_summary: dict | None,
) -> dict:  # fmt: skip
    """Where, when, which model and where the time went, for the report header (``report/run.json``).

    A column-only pass over the parts (status, timings, nodes, digest), one row group at a time."""
    samples = report_time.TimingSamples()
    digests: set[str] = set()
    for path in paths:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            cols = report_time.timing_columns(names) + ([MODEL_DIGEST] if MODEL_DIGEST in names else [])
            for batch in pf.iter_batches(batch_size=65536, columns=cols):
                table = pa.Table.from_batches([batch])
                samples.add(table)
                if MODEL_DIGEST in names:
                    digests.update(d for d in pc.unique(table[MODEL_DIGEST]).to_pylist() if d)
    manifest = _read_manifest(output_uri, cfg)
    run = run_summary if run_summary is not None else manifest.get("run") or {}
    timing = report_time.summarize_timing(
        samples, prices=prices, wall_s=run.get("wall_s"), wall_images=run.get("processed")
    )
    original = ((manifest.get("config") or {}).get("write") or {}).get("output_uri")
    return report_time.run_facts(
        output_uri,
        timing=timing,
        original_output=original,
        model_digests=sorted(digests),
        written_utc=_written_utc(output_uri, cfg),
    )


def evaluate_output(
    output_uri: str,
    *,
    storage_cfg: storage.StorageConfig,
    labels_uri: str | None = None,
    widths: Sequence[int] = tuple(range(1, 41)),
    class_names: Sequence[str] | None = None,
    use_ray: bool = True,
    worst_k: int = 8,
    band_source: str = "auto",
    num_overlays: int = 3,
    write_report: bool = True,
    prices: report_time.Prices | None = None,
    run_summary: dict | None = None,
) -> dict:
    """Recompute every metric of ``output_uri`` from its Parquet masks and the ground truth; write the report.

    ``band_source``: "auto" (void band when at least half the labelled images have void pixels, else label edges),
    "void" or "edges". ``num_overlays`` best and as many worst images get overlay figures. Returns the
    ``metrics.json`` document (see ``pipeline/metrics/report.py``).
    """
    if band_source != "auto" and band_source not in BAND_SOURCES:
        raise ValueError(f"band_source must be 'auto' or one of {BAND_SOURCES}, got {band_source!r}")
    if worst_k < 0 or num_overlays < 0:
        raise ValueError(f"worst_k and num_overlays must be >= 0, got {worst_k} and {num_overlays}")
    files = _mask_files(output_uri, storage_cfg)
    fs, paths = _fs_paths(files, storage_cfg)
    num_classes, variants = _read_metadata(fs, paths)
    if num_classes is None:
        # Every row failed before producing a mask: nothing to score, but the error counts still matter.
        num_classes = len(class_names) if class_names else len(VOC_CLASS_NAMES)
        log.warning("no row of %s has num_classes; assuming %d classes", output_uri, num_classes)
    if class_names is None:
        class_names = schema_class_names(num_classes)
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names, expected num_classes = {num_classes}")
    setup = EvalSetup(
        num_classes=num_classes,
        widths=tuple(int(w) for w in widths),
        band_sources=BAND_SOURCES if band_source == "auto" else (band_source,),
        storage_cfg=storage_cfg,
        labels_uri=labels_uri,
    )
    log.info("evaluating %d Parquet files of %s (%s)", len(files), output_uri, "Ray" if use_ray else "local")
    acc = _evaluate_ray(fs, paths, setup) if use_ray else evaluate_rows(_iter_rows_local(fs, paths), setup)
    if acc.num_confusion_mismatches:
        log.warning(
            "%d images' stored confusion counts differ from the recomputed ones", acc.num_confusion_mismatches
        )
    metrics = report.build_metrics(
        acc,
        class_names=list(class_names),
        band_source=band_source,
        worst_k=worst_k,
        output_uri=output_uri,
        model_variants=variants,
    )
    if write_report:
        ranked = [s for s in acc.sorted_images() if s.mean_iou is not None]  # worst first
        worst = ranked[:num_overlays]
        best = list(reversed(ranked[num_overlays:][-num_overlays:])) if num_overlays else []
        ids = {s.image_id: "worst" for s in worst} | {s.image_id: "best" for s in best}
        examples = _load_examples(fs, paths, ids, setup, acc)
        try:
            run = _run_facts(fs, paths, output_uri, storage_cfg, prices or report_time.Prices(), run_summary)
        except (OSError, ValueError, pa.ArrowException) as e:  # the header loses its timing, the report stays
            log.warning("run facts of %s unavailable: %s", output_uri, storage.redact(str(e)))
            run = None
        report.write_report(
            metrics,
            storage.join(output_uri, "report"),
            storage_cfg=storage_cfg,
            examples=examples,
            per_image=acc.sorted_images(),
            run=run,
        )
    return metrics
