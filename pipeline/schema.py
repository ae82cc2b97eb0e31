"""Column names and the output Arrow schema shared by every stage (stages import this, not each other)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "ID",
    "SOURCE",
    "LABEL_SOURCE",
    "STATUS",
    "ERROR",
    "RETRYABLE",
    "ATTEMPT",
    "SHARD",
    "SUPERSEDES",
    "IMAGE_BYTES",
    "LABEL_BYTES",
    "IMAGE",
    "LABEL",
    "HEIGHT",
    "WIDTH",
    "LOGITS",
    "UPSAMPLE_OFFSET",
    "LABEL_PROBLEM",
    "RAW_MASK",
    "MASK",
    "OK",
    "ErrorKind",
    "OUTPUT_SCHEMA",
    "TIMING_COLUMNS",
    "NODE_COLUMNS",
    "VOC_CLASSES",
    "class_names",
    "is_missing",
    "text_or_none",
    "object_column",
    "clean_text_columns",
    "retryable_flags",
    "voc_palette",
]

# Work item / row identity
ID = "image_id"  # str, from the object key (relative path without extension)
SOURCE = "source"  # str, URI of the image
LABEL_SOURCE = "label_source"  # str | None, URI of the ground-truth PNG
STATUS = "status"  # "ok" or an ErrorKind value
ERROR = "error"  # str | None, human-readable reason
RETRYABLE = "retryable"  # bool: the error came from the environment, not the image; a re-run retries the row
ATTEMPT = "attempt"  # int: which attempt at this image the row is (1 = first run; a retried row counts up)
SHARD = "shard"  # str, shard URI for shard inputs (the row's bytes live inside it), else ""
SUPERSEDES = (
    "supersedes"  # str: name of the committed part whose row for this image this one replaces, else ""
)

# In-flight columns (never written)
IMAGE_BYTES = "image_bytes"  # bytes, encoded image as stored
LABEL_BYTES = "label_bytes"  # bytes | None, encoded label PNG
IMAGE = "image"  # uint8 (H, W, 3) RGB, C-contiguous
LABEL = "label"  # uint8 (H, W), 255 = void; empty (0, 0) array when no label
LOGITS = "logits"  # float16 (C, h, w) DCNN scores at stride 8
UPSAMPLE_OFFSET = "upsample_offset"  # int, top-left crop offset after x8 interpolation (model family)
LABEL_PROBLEM = "label_problem"  # str | None: why the label can't be used (the mask is still produced)

# Output columns
HEIGHT = "height"
WIDTH = "width"
RAW_MASK = "raw_mask"  # uint8 (H, W) argmax of the DCNN (in flight); raw_mask_png in the output
MASK = "mask"  # uint8 (H, W) final mask (CRF when on)

OK = "ok"


class ErrorKind:
    """Values of the `status` column for rows that did not produce a mask."""

    READ = "read_error"  # object missing or unreadable
    DECODE = "decode_error"  # not an image, truncated, unsupported
    TOO_LARGE = "too_large"  # over the pixel limit (decompression bomb guard)
    LABEL = "label_error"  # label unusable (missing, undecodable, wrong size, bad values); mask still written
    DCNN = "dcnn_error"
    CRF = "crf_error"
    ENCODE = "encode_error"


TIMING_COLUMNS = ("decode_s", "dcnn_s", "crf_s", "encode_s")
NODE_COLUMNS = ("dcnn_node", "crf_node")

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(LABEL_SOURCE, pa.string()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(WIDTH, pa.int32()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string()),
        pa.field(RETRYABLE, pa.bool_(), nullable=False),
        pa.field(ATTEMPT, pa.int32()),  # null in parts written before the column existed: read as 1
        pa.field("mask_png", pa.binary()),
        pa.field("raw_mask_png", pa.binary()),
        # Per-image confusion counts, flattened C*C int64 (row = ground truth, column = prediction), void skipped.
        pa.field("confusion_raw", pa.list_(pa.int64())),
        pa.field("confusion_crf", pa.list_(pa.int64())),
        pa.field("num_classes", pa.int32()),
        pa.field("model_variant", pa.string()),
        pa.field("model_digest", pa.string()),
        *[pa.field(name, pa.float32()) for name in TIMING_COLUMNS],
        *[pa.field(name, pa.string()) for name in NODE_COLUMNS],
    ]
)


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def class_names(num_classes: int) -> list[str]:
    """VOC's 21 names when ``num_classes == 21``, else ``background, class_1, ..., class_{K-1}``."""
    if not 2 <= num_classes <= 255:
        raise ValueError(f"num_classes must be in [2, 255], got {num_classes}")
    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return ["background"] + [f"class_{k}" for k in range(1, num_classes)]


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map, flat ``[r0, g0, b0, r1, ...]`` for indices 0..255 (255 = void, light beige)."""
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):  # bit-interleave the index into the high bits of r, g, b
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


# --- batch helpers shared by every stage -------------------------------------------------------------------------
TEXT_COLUMNS = (LABEL_SOURCE, ERROR, LABEL_PROBLEM)  # nullable strings that ride through every stage


def is_missing(value: Any) -> bool:
    """None, or NaN: Ray hands an all-null Arrow column to the next stage as a float NaN array."""
    return value is None or (isinstance(value, float | np.floating) and bool(np.isnan(value)))


def text_or_none(value: Any) -> str | None:
    return None if is_missing(value) else str(value)


def object_column(values: Iterable[Any]) -> np.ndarray:
    """A 1-D object array, one element per value (np.array(list_of_arrays) would stack equal shapes)."""
    values = list(values)
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def clean_text_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn NaN placeholders back into None in the nullable string columns, in place.

    Without this a stage that passes an all-null column on unchanged emits it as float, and the next batch that
    joins that block with one holding a real string fails the job ("incompatible types: float vs string").
    """
    for name in TEXT_COLUMNS:
        if name in batch:
            batch[name] = object_column(text_or_none(v) for v in batch[name])
    return batch


def retryable_flags(batch: dict[str, np.ndarray]) -> np.ndarray:
    """A writable bool copy of the batch's RETRYABLE column (all False when a stage upstream did not set it)."""
    n = len(batch[ID])
    if RETRYABLE not in batch:
        return np.zeros(n, dtype=bool)
    return np.array([bool(v) and not is_missing(v) for v in batch[RETRYABLE]], dtype=bool)
