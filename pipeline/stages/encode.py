"""Encode stage (crf -> **encode** -> write): class-index masks -> PNG bytes, per-image confusion counts, output row.

The output has exactly the columns of `schema.OUTPUT_SCHEMA`, in that order, one row per input row.

Decisions:
- **Mask PNGs** are palette ("P") images with the PASCAL VOC colour map, like VOC's own `SegmentationClass`
  files: any viewer shows coloured classes, and the pixel values are the class indices
  (`np.asarray(Image.open(png))` gives the uint8 (H, W) mask back, the palette is ignored).
- **Confusion counts** (`confusion_raw`, `confusion_crf`): flattened C*C int64, row = ground truth, column =
  prediction, void (255) skipped, from `confusion_matrix` below (pipeline/metrics sums and scores them); None when the row has no usable label.
  `confusion_crf` is None when the CRF is off (no `mask` column): there is no CRF mask to score, and `mask_png`
  is then the DCNN mask.
- **Statuses.** A row with a `label_problem` becomes `label_error` with the problem as its error; its masks are
  still written. Rows that arrived with another non-ok status keep it and get no masks. A row whose mask is
  malformed (wrong shape, values >= num_classes) becomes `encode_error` rather than failing the batch.
- `height`/`width` of 0 (size unknown) are written as null.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import schema

__all__ = ["EncodeConfig", "VOC_PALETTE", "mask_to_png", "encode_batch", "to_table"]

logger = logging.getLogger(__name__)

# zlib level 6 (Pillow's default): on a 500x375 scene mask level 1 was 50% larger for 15% less time.
_PNG_COMPRESS_LEVEL = 6

VOID = 255  # ground-truth value of pixels no class is scored on


def _check_pair(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> None:
    if num_classes < 1 or num_classes > VOID:
        raise ValueError(f"num_classes must be in 1..{VOID}, got {num_classes}")
    if gt.ndim != 2 or pred.ndim != 2:
        raise ValueError(f"gt and pred must be 2-D (H, W), got shapes {gt.shape} and {pred.shape}")
    if gt.shape != pred.shape:
        raise ValueError(f"prediction size {pred.shape} must equal the ground truth size {gt.shape}")


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 (C, C) counts, row = ground truth class, column = predicted class; gt == 255 pixels skipped.

    Raises ValueError when sizes differ, a ground-truth value is >= num_classes (and not 255), or a prediction
    value is >= num_classes.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    _check_pair(gt, pred, num_classes)
    valid = gt != VOID
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if g.size and int(g.max()) >= num_classes:
        bad = np.unique(g[g >= num_classes]).tolist()
        raise ValueError(f"ground truth values must be < {num_classes} or {VOID}, got {bad}")
    if p.size and int(p.max()) >= num_classes:
        bad = np.unique(p[p >= num_classes]).tolist()
        raise ValueError(f"prediction values must be < {num_classes}, got {bad}")
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


VOC_PALETTE = schema.voc_palette()


@dataclass(frozen=True)
class EncodeConfig:
    """Encode-stage settings, all written into every output row.

    num_classes: C, the model's class count (confusion matrices are C x C).
    model_variant: model family/variant name (e.g. "DeepLab-LargeFOV").
    model_digest: checkpoint digest (e.g. "sha256:...").
    max_retries: write.max_retries; a retryable row of that attempt (schema.ATTEMPT) is written permanent.
    """

    num_classes: int
    model_variant: str
    model_digest: str
    max_retries: int = 3

    def __post_init__(self) -> None:
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or not 1 <= self.num_classes <= 255
        ):
            raise ValueError(f"num_classes must be an int in 1..255, got {self.num_classes!r}")
        if not isinstance(self.model_variant, str) or not self.model_variant:
            raise ValueError(f"model_variant must be a non-empty str, got {self.model_variant!r}")
        if not isinstance(self.model_digest, str):
            raise ValueError(f"model_digest must be a str, got {type(self.model_digest).__name__}")


def mask_to_png(mask: np.ndarray, num_classes: int = 256) -> bytes:
    """uint8 (H, W) class indices -> palette PNG bytes (pixel value = class index, VOC colours).

    The palette holds only the first `num_classes` colours (mask values must be below it): a full 256-entry
    palette is 768 bytes, about 40% of a typical mask PNG.
    """
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be uint8 (H, W), got {mask.dtype} {mask.shape}")
    if not 1 <= num_classes <= 256 or (mask.size and int(mask.max()) >= num_classes):
        raise ValueError(f"mask values must be < num_classes={num_classes} (max 256), got max {mask.max()}")
    image = Image.fromarray(np.ascontiguousarray(mask))  # mode "L"
    image.putpalette(VOC_PALETTE[: 3 * num_classes])  # "L" -> "P", same pixel values
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


class _RowError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _checked_mask(value: Any, name: str, shape: tuple[int, int] | None, num_classes: int) -> np.ndarray:
    """A mask as uint8 (H, W) with values < num_classes, or _RowError(ENCODE) saying what is wrong."""
    if not isinstance(value, np.ndarray) or value.ndim != 2 or value.size == 0:
        got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise _RowError(schema.ErrorKind.ENCODE, f"{name} must be a non-empty (H, W) array, got {got}")
    if shape is not None and value.shape != shape:
        raise _RowError(schema.ErrorKind.ENCODE, f"{name} shape {value.shape} != image shape {shape}")
    if not np.issubdtype(value.dtype, np.integer):
        raise _RowError(schema.ErrorKind.ENCODE, f"{name} must hold integer class indices, got {value.dtype}")
    top = int(value.max())
    if top >= num_classes or int(value.min()) < 0:
        raise _RowError(
            schema.ErrorKind.ENCODE, f"{name} values must be in 0..{num_classes - 1}, got max {top}"
        )
    return value.astype(np.uint8, copy=False)


def _confusion(label: np.ndarray, pred: np.ndarray, num_classes: int) -> list[int]:
    try:
        return confusion_matrix(label, pred, num_classes).ravel().tolist()  # (C, C) -> C*C, row = gt
    except ValueError as e:  # the prediction was validated already, so this is about the label
        raise _RowError(schema.ErrorKind.LABEL, f"label unusable for scoring: {e}") from None


def _float_or_none(value: Any) -> float | None:
    return None if schema.is_missing(value) else float(value)


def _size_or_none(value: Any) -> int | None:
    return int(value) if value is not None and int(value) > 0 else None


# One function on purpose (~90 lines): every output column's conversion in schema order, one short block each.
def encode_batch(batch: dict[str, np.ndarray], cfg: EncodeConfig) -> dict[str, list]:
    """Batch after dcnn/crf -> {column: python list} with exactly OUTPUT_SCHEMA's columns (see `to_table`).

    In:  ID, SOURCE, LABEL_SOURCE, STATUS, ERROR, HEIGHT, WIDTH, LABEL (uint8 (H, W) or empty), LABEL_PROBLEM,
         RAW_MASK uint8 (H, W), MASK uint8 (H, W) (absent when the CRF is off), optional timing columns
         (decode_s, dcnn_s, crf_s) and node columns (dcnn_node, crf_node). Anything else (IMAGE, LOGITS, ...) is
         dropped. Mask columns may be object arrays of per-row arrays or one stacked (N, H, W) array.
    """
    num_rows = len(batch[schema.ID])
    num_classes = cfg.num_classes
    has_crf = schema.MASK in batch
    statuses = [str(s) for s in batch[schema.STATUS]]  # never null: every stage sets it
    if schema.RAW_MASK not in batch and any(s == schema.OK for s in statuses):
        raise ValueError(f"encode_batch needs a {schema.RAW_MASK!r} column; got {sorted(batch)}")

    def column(name: str) -> Any:
        return batch[name] if name in batch else [None] * num_rows

    errors = [schema.text_or_none(e) for e in column(schema.ERROR)]
    retryable = schema.retryable_flags(batch)
    heights = [_size_or_none(h) for h in column(schema.HEIGHT)]
    widths = [_size_or_none(w) for w in column(schema.WIDTH)]
    problems = [schema.text_or_none(p) for p in column(schema.LABEL_PROBLEM)]
    labels = column(schema.LABEL)
    mask_png: list[bytes | None] = [None] * num_rows
    raw_mask_png: list[bytes | None] = [None] * num_rows
    confusion_raw: list[list[int] | None] = [None] * num_rows
    confusion_crf: list[list[int] | None] = [None] * num_rows
    encode_s: list[float | None] = [None] * num_rows

    for i in range(num_rows):
        if statuses[i] != schema.OK:
            continue
        start = time.perf_counter()
        shape = (heights[i], widths[i]) if heights[i] and widths[i] else None
        try:
            raw = _checked_mask(batch[schema.RAW_MASK][i], "raw_mask", shape, num_classes)
            final = _checked_mask(batch[schema.MASK][i], "mask", raw.shape, num_classes) if has_crf else raw
            raw_png = mask_to_png(raw, num_classes)
            raw_mask_png[i] = raw_png
            mask_png[i] = mask_to_png(final, num_classes) if has_crf else raw_png
            if problems[i]:
                raise _RowError(schema.ErrorKind.LABEL, str(problems[i]))
            label = labels[i]
            if isinstance(label, np.ndarray) and label.size > 0:
                confusion_raw[i] = _confusion(label, raw, num_classes)
                confusion_crf[i] = _confusion(label, final, num_classes) if has_crf else None
        except _RowError as e:
            statuses[i], errors[i] = e.kind, e.message
            confusion_raw[i] = confusion_crf[i] = None
            if e.kind != schema.ErrorKind.LABEL:  # a label problem keeps its masks; a bad mask has none
                mask_png[i] = raw_mask_png[i] = None
            logger.debug("%s: %s: %s", batch[schema.ID][i], e.kind, e.message)
        encode_s[i] = time.perf_counter() - start

    attempts = [int(a) if not schema.is_missing(a) else 1 for a in column(schema.ATTEMPT)]
    retryable = [bool(r) and s != schema.OK for r, s in zip(retryable, statuses, strict=True)]
    for i, (again, attempt) in enumerate(zip(retryable, attempts, strict=True)):
        if again and attempt >= cfg.max_retries:  # the last attempt: permanent, so re-runs on exit 75 end
            retryable[i] = False
            errors[i] = (
                f"{errors[i]} (attempt {attempt} of write.max_retries {cfg.max_retries}: not retried again)"
            )
    timings = {name: [_float_or_none(v) for v in column(name)] for name in schema.TIMING_COLUMNS}
    timings["encode_s"] = encode_s
    out: dict[str, list] = {
        schema.ID: [str(v) for v in batch[schema.ID]],
        schema.SOURCE: [str(v) for v in batch[schema.SOURCE]],
        schema.LABEL_SOURCE: [schema.text_or_none(v) for v in column(schema.LABEL_SOURCE)],
        schema.HEIGHT: heights,
        schema.WIDTH: widths,
        schema.STATUS: statuses,
        schema.ERROR: errors,
        schema.RETRYABLE: retryable,
        schema.ATTEMPT: attempts,
        "mask_png": mask_png,
        "raw_mask_png": raw_mask_png,
        "confusion_raw": confusion_raw,
        "confusion_crf": confusion_crf,
        "num_classes": [num_classes] * num_rows,
        "model_variant": [cfg.model_variant] * num_rows,
        "model_digest": [cfg.model_digest] * num_rows,
        **timings,
        **{name: [schema.text_or_none(v) for v in column(name)] for name in schema.NODE_COLUMNS},
    }
    assert list(out) == schema.OUTPUT_SCHEMA.names, (list(out), schema.OUTPUT_SCHEMA.names)
    return out


def to_table(columns: dict[str, list]) -> pa.Table:
    """encode_batch's output -> a pyarrow Table with exactly OUTPUT_SCHEMA (hand this, not the dict, to Ray/Parquet:
    type inference would turn the confusion lists into tensors and the int32 sizes into int64)."""
    return pa.Table.from_pydict(columns, schema=schema.OUTPUT_SCHEMA)
