"""Ground-truth label PNGs outside the flow: decoding one safely, and checking a job's labels against the model.

``evaluate`` decodes labels with ``decode_label_png`` (a pixel limit checked from the header, so a decompression
bomb is an error row, not a worker out of memory); ``segment`` calls ``label_class_warning`` before any work, so a
dataset whose labels hold classes the model does not have is named at the start, not after 24 ``label_error`` rows.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.schema import LABEL_SOURCE
from pipeline.stages.decode import DecodeConfig

__all__ = [
    "MAX_LABEL_PIXELS",
    "MAX_LABEL_BYTES",
    "VOID",
    "decode_label_png",
    "label_class_warning",
    "plan_label_warning",
]

log = logging.getLogger(__name__)

MAX_LABEL_PIXELS = DecodeConfig().max_pixels  # the same limit as the images the labels go with
MAX_LABEL_BYTES = 256 << 20  # as read.max_bytes' default
VOID = 255  # VOC's "don't care" value: never a class


def decode_label_png(data: bytes, *, max_pixels: int = MAX_LABEL_PIXELS) -> np.ndarray:
    """Ground-truth PNG (palette or grayscale; pixel value = class index, 255 = void) -> uint8 (H, W).

    Raises ValueError for anything else, without echoing the file's bytes: not a PNG, a header over
    ``max_pixels`` (checked before any pixel is decoded), a mode that is not class indices.
    """
    with warnings.catch_warnings():
        # Pillow warns between its limit and twice it and raises above; ours, which names the size, comes first.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=("PNG",))
        except Image.DecompressionBombError:
            raise ValueError(
                f"label PNG header claims more than {max_pixels:,} pixels: not decoded"
            ) from None
        except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError is an OSError
            raise ValueError(f"label is not a readable PNG ({len(data):,} bytes)") from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ValueError(
                f"label PNG header claims {width}x{height} pixels, over the limit of {max_pixels:,}: not decoded"
            )
        # Palette indices are the classes (VOC SegmentationClass): never convert through the palette's colours.
        if im.mode not in ("P", "L"):
            raise ValueError(
                f"label PNG must be a palette (P) or grayscale (L) image of class indices, got {im.mode}"
            )
        try:
            return np.array(im, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError):  # a truncated or corrupt body
            raise ValueError(f"label PNG {width}x{height} is truncated or corrupt") from None


def label_class_warning(
    label_uris: Sequence[str],
    num_classes: int,
    storage_cfg: storage.StorageConfig,
    *,
    class_names: Sequence[str] | None = None,
    max_labels: int = 8,
) -> str | None:
    """A one-line warning when some of the first ``max_labels`` readable labels hold class values the model does
    not have (>= ``num_classes``, other than void 255), else None. Unreadable labels are skipped: the job reports
    them per row. Call it before any work, with a few of the job's label URIs (plain object URIs, not shard
    rows)."""
    seen: set[int] = set()
    checked: list[str] = []
    for uri in (u for u in label_uris if u and "#" not in u):
        if len(checked) >= max_labels:
            break
        try:
            values = np.unique(
                decode_label_png(storage.read_bytes(uri, storage_cfg, max_bytes=MAX_LABEL_BYTES))
            )
        except Exception as e:  # noqa: BLE001 - a sample: any failure here shows up again as that row's error
            log.debug("label check skipped %s: %s", uri, storage.redact(str(e)))
            continue
        checked.append(uri)
        seen.update(int(v) for v in values if v != VOID)
    extra = sorted(v for v in seen if v >= num_classes)
    if not extra:
        return None
    names = f" ({', '.join(class_names)})" if class_names else ""
    return (
        f"labels hold class values {extra} that the model does not have: it has {num_classes} classes{names}; "
        f"seen in {len(checked)} sampled label(s), e.g. {checked[0]}. Those images' rows will be label errors: "
        "check --labels and --model (make-scenes --num-classes must match the model's)"
    )


def plan_label_warning(
    todo_uri: str,
    num_classes: int,
    storage_cfg: storage.StorageConfig,
    *,
    class_names: Sequence[str] | None = None,
    max_labels: int = 8,
) -> str | None:
    """``label_class_warning`` for a planned job: samples the label URIs of its first ``todo/`` plan file
    (flow.JobPlan.todo_uri). None when nothing is to do or nothing is labelled."""
    import pyarrow.parquet as pq

    files = storage.list_files(todo_uri, storage_cfg, (".parquet",))
    if not files:
        return None
    fs, path = storage.filesystem(files[0], storage_cfg)
    with fs.open_input_file(path) as f:
        column = pq.ParquetFile(f).read_row_group(0, columns=[LABEL_SOURCE]).column(0)
    uris = [u for u in column.to_pylist() if u][: max_labels * 4]  # spares for unreadable ones
    return label_class_warning(uris, num_classes, storage_cfg, class_names=class_names, max_labels=max_labels)
