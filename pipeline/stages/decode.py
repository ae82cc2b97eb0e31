"""Decode stage (read -> **decode** -> dcnn): encoded bytes -> RGB uint8 image and uint8 class-index label.

One output row per input row, same order. A file that can't be used becomes an error row (`decode_error` or
`too_large`) instead of an exception, so one bad file never fails a block. Rows that arrive with a status other
than `ok` pass through with empty arrays.

Decisions (documented in the README's output contract too):
- **Pixel limit.** `DecodeConfig.max_pixels` is checked against the header size, before any pixel data is
  decoded. Pillow's own decompression-bomb guard stays on (`Image.MAX_IMAGE_PIXELS` is never touched): its
  warning and error both become `too_large` rows.
- **Formats.** Only common raster formats are opened (`IMAGE_FORMATS`): Pillow's exotic plugins (EPS runs
  Ghostscript, for example) are attack surface a batch job has no use for.
- **EXIF orientation** is applied (same transpose table as `ImageOps.exif_transpose`). We read the tag and apply
  the transpose ourselves so the label gets exactly the same one, and a malformed EXIF block only loses the
  orientation (logged) instead of losing the image.
- **Modes -> RGB.** Alpha (RGBA, LA, PA, P or L/RGB with a `transparency` key) is composited on **black**
  (`rgb * alpha / 255`): what is under a transparent pixel is arbitrary, black is deterministic. 16-bit
  grayscale (`I;16*`, and `I`, which is how Pillow opens 16-bit data) is scaled by 255/65535 with rounding
  (`I` is clipped to 0..65535 first). `F` is clipped to 0..255. `1`, `L`, `CMYK` (incl. Adobe-inverted JPEGs,
  which Pillow un-inverts), `YCbCr`, `RGBX` use Pillow's conversion. Animated GIF/PNG/WebP: the first frame.
- **Labels** must be PNG, mode `P` or `L` (index = class; `1` and 16-bit modes are accepted when their values
  fit), values in `0..num_classes-1` or 255 (void). Labels are not rotated by their own EXIF. A label is
  compared with the image as stored and as displayed: if it matches the stored size (VOC labels match the
  stored pixels) it gets the image's EXIF transpose; if it only matches the displayed size it is used as is.
  A label that can't be used sets `label_problem` (the row stays `ok`, the mask is still produced, encode marks
  the row `label_error`) and `label` is an empty (0, 0) array.
"""

from __future__ import annotations

import io
import logging
import re
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import schema

__all__ = [
    "IMAGE_FORMATS",
    "DecodeConfig",
    "DecodeError",
    "DecodedImage",
    "decode_image",
    "decode_label",
    "decode_batch",
]

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG includes MPO (camera JPEGs)

# EXIF orientation -> transpose that displays the stored pixels upright (same table as ImageOps.exif_transpose).
EXIF_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class DecodeConfig:
    """Decode-stage settings.

    max_pixels: largest accepted width * height, checked from the header before decoding (bomb guard).
    num_classes: label values must be in 0..num_classes-1 or 255 (void).
    """

    max_pixels: int = 40_000_000
    num_classes: int = 21

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int, got {self.max_pixels!r}")
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or not 1 <= self.num_classes <= 255
        ):
            # 255 is the void label, so at most 255 real classes (0..254).
            raise ValueError(f"num_classes must be an int in 1..255, got {self.num_classes!r}")


class DecodeError(Exception):
    """Why one file can't be used. `kind` is a schema.ErrorKind value; `size` is (W, H) when the header had it."""

    def __init__(self, kind: str, message: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.size = size


@dataclass(frozen=True)
class DecodedImage:
    """image: uint8 (H, W, 3) RGB, C-contiguous, upright. orientation: EXIF tag (1 = none). stored_size: (W, H)."""

    image: np.ndarray
    orientation: int
    stored_size: tuple[int, int]


def _mpx(num_pixels: int) -> str:
    return f"{num_pixels / 1e6:.3g} Mpx"


def _sniff(data: bytes) -> str | None:
    """Format name from the magic bytes, for messages only (Pillow decides what it can open)."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _not_an_image(data: bytes) -> str:
    """Message for bytes that no allowed format recognises: say what they look like."""
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<body" in head:
        return "not an image (HTML?)"
    if head.startswith(b"<?xml") or b"<svg" in head:
        return "not a raster image (XML/SVG?)"
    if head.startswith((b"{", b"[")):
        return "not an image (JSON?)"
    fmt = _sniff(data)
    if fmt is not None:
        return f"corrupt {fmt}: header can't be parsed"
    return f"not a supported image ({', '.join(IMAGE_FORMATS)}): {len(data):,} bytes of another format"


def _failure(fmt: str | None, exc: BaseException, stage: str) -> str:
    text = str(exc) or type(exc).__name__
    what = fmt or "image"
    if "truncated" in text.lower():
        return f"truncated {what} ({text})"
    return f"corrupt {what} while {stage}: {type(exc).__name__}: {text}"


def _open(data: bytes | None, formats: tuple[str, ...], max_pixels: int, what: str) -> Image.Image:
    """Open (header only, no pixel data) and apply both pixel limits; raises DecodeError."""
    if data is None or len(data) == 0:
        raise DecodeError(schema.ErrorKind.DECODE, f"empty {what} (0 bytes)")
    with warnings.catch_warnings(record=True) as caught:
        # Record (don't raise) Pillow's bomb warning so our limit, which states the size, is checked first;
        # other warnings (e.g. "Corrupt EXIF data") are about a file we may still decode: logged below.
        warnings.simplefilter("always")
        try:
            im = Image.open(io.BytesIO(data), formats=formats)
        except Image.DecompressionBombError as e:
            match = _BOMB_PIXELS.search(str(e))
            size = _mpx(int(match.group(1))) if match else "size"
            raise DecodeError(
                schema.ErrorKind.TOO_LARGE,
                f"{what} header claims {size}, over the limit of {_mpx(max_pixels)} (Pillow bomb guard: {e})",
            ) from None
        except UnidentifiedImageError:
            raise DecodeError(schema.ErrorKind.DECODE, _not_an_image(data)) from None
        except Exception as e:  # Pillow's plugins raise many types on malformed headers
            raise DecodeError(
                schema.ErrorKind.DECODE, _failure(_sniff(data), e, "reading the header")
            ) from None
    width, height = im.size
    problem = None
    if width < 1 or height < 1:
        problem = DecodeError(
            schema.ErrorKind.DECODE, f"{im.format} header has an empty size {width}x{height}"
        )
    elif width * height > max_pixels:
        problem = DecodeError(
            schema.ErrorKind.TOO_LARGE,
            f"{width}x{height} = {_mpx(width * height)} over the limit of {_mpx(max_pixels)}",
            size=(width, height),
        )
    elif any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        problem = DecodeError(
            schema.ErrorKind.TOO_LARGE,
            f"{width}x{height} = {_mpx(width * height)} rejected by Pillow's decompression-bomb guard",
            size=(width, height),
        )
    if problem is not None:
        im.close()
        raise problem
    for w in caught:
        logger.debug("%s: %s", what, w.message)
    return im


def _orientation(im: Image.Image) -> int:
    try:
        with warnings.catch_warnings(record=True) as caught:  # Pillow warns on corrupt EXIF: log it, quietly
            warnings.simplefilter("always")
            value = im.getexif().get(_ORIENTATION_TAG, 1)
        for w in caught:
            logger.debug("EXIF: %s", w.message)
    except Exception as e:  # a broken EXIF block loses the orientation, not the image
        logger.debug("ignoring unreadable EXIF (%s: %s)", type(e).__name__, e)
        return 1
    return value if isinstance(value, int) and value in EXIF_TRANSPOSE else 1


def _composite_on_black(im: Image.Image) -> np.ndarray:
    rgba = np.asarray(im.convert("RGBA"))  # (H, W, 4)
    alpha = rgba[..., 3:].astype(np.uint16)
    return ((rgba[..., :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 (H, W, 3). See the module docstring for the choices."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(im)
        if mode == "F":
            gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        else:
            wide = np.clip(values.astype(np.int64), 0, 65535)
            gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        return _composite_on_black(im)
    return np.asarray(im.convert("RGB"))


def decode_image(data: bytes | None, cfg: DecodeConfig) -> DecodedImage:
    """Encoded bytes -> upright RGB uint8. Raises DecodeError (kind DECODE or TOO_LARGE) for unusable input."""
    im = _open(data, IMAGE_FORMATS, cfg.max_pixels, "image")
    fmt = im.format
    stored_size = im.size
    try:
        with im:
            im.load()  # decode pixel data now, inside the try: truncated files fail here
            orientation = _orientation(im)
            upright = im.transpose(EXIF_TRANSPOSE[orientation]) if orientation != 1 else im
            rgb = _to_rgb(upright)
    except DecodeError:
        raise
    except Exception as e:  # decoders raise OSError, ValueError, SyntaxError, zlib errors...
        raise DecodeError(schema.ErrorKind.DECODE, _failure(fmt, e, "decoding"), size=stored_size) from None
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DecodeError(
            schema.ErrorKind.DECODE, f"mode {im.mode} gave shape {rgb.shape}, expected (H, W, 3)"
        )
    if not rgb.flags.writeable:  # np.asarray of a Pillow image can be read-only; downstream may write
        rgb = rgb.copy()
    return DecodedImage(image=rgb, orientation=orientation, stored_size=stored_size)


def decode_label(data: bytes | None, image: DecodedImage, cfg: DecodeConfig) -> np.ndarray:
    """Label PNG -> uint8 (H, W) class indices aligned with `image.image`. Raises DecodeError(kind LABEL)."""
    if data is not None and len(data) > 0 and _sniff(data) != "PNG":
        fmt = _sniff(data)
        detail = f" ({fmt})" if fmt else f": {_not_an_image(data)}"
        raise DecodeError(schema.ErrorKind.LABEL, f"label is not a PNG{detail}")
    try:
        im = _open(data, ("PNG",), cfg.max_pixels, "label")
    except DecodeError as e:
        message = e.message if "label" in e.message else f"label: {e.message}"
        raise DecodeError(schema.ErrorKind.LABEL, message) from None
    height, width = image.image.shape[:2]
    stored_w, stored_h = image.stored_size
    if im.size == (stored_w, stored_h):
        transpose = EXIF_TRANSPOSE.get(image.orientation)  # VOC convention: label matches the stored pixels
    elif im.size == (width, height):
        transpose = None  # already in display orientation
    else:
        upright = f" ({width}x{height} upright)" if (width, height) != (stored_w, stored_h) else ""
        raise DecodeError(
            schema.ErrorKind.LABEL,
            f"label size {im.size[0]}x{im.size[1]} differs from the image's {stored_w}x{stored_h}{upright}",
        )
    if im.mode not in ("P", "L", "1", "I") and not im.mode.startswith("I;16"):
        raise DecodeError(
            schema.ErrorKind.LABEL,
            f"label mode {im.mode} is not a class-index image (expected palette P or grayscale L)",
        )
    try:
        with im:
            im.load()
            if transpose is not None:
                im = im.transpose(transpose)
            values = np.asarray(im)
    except DecodeError:
        raise
    except Exception as e:  # see decode_image
        raise DecodeError(schema.ErrorKind.LABEL, f"label: {_failure('PNG', e, 'decoding')}") from None
    wide = values.astype(np.int64, copy=False)
    bad = ((wide >= cfg.num_classes) & (wide != 255)) | (wide < 0)
    if bad.any():
        shown = ", ".join(str(v) for v in np.unique(wide[bad])[:8])
        raise DecodeError(
            schema.ErrorKind.LABEL,
            f"label has {int(bad.sum())} pixels with values outside 0..{cfg.num_classes - 1} and 255 (void): {shown}",
        )
    label = np.array(values, dtype=np.uint8, order="C", copy=True)  # own, writable memory
    assert label.shape == (height, width), (label.shape, (height, width))
    return label


def _opt_bytes(value: object) -> bytes | None:
    return None if schema.is_missing(value) else bytes(value)  # type: ignore[arg-type]


def _empty_image() -> np.ndarray:
    return np.zeros((0, 0, 3), dtype=np.uint8)


def _empty_label() -> np.ndarray:
    return np.zeros((0, 0), dtype=np.uint8)


def _label_for(
    decoded: DecodedImage, data: bytes | None, source: str | None, cfg: DecodeConfig
) -> tuple[np.ndarray, str | None]:
    """(label, None) when usable, else (empty label, why)."""
    if data is not None:
        try:
            return decode_label(data, decoded, cfg), None
        except DecodeError as e:
            return _empty_label(), e.message
    if source:  # a label was listed for this image but its bytes didn't arrive (missing object)
        return _empty_label(), f"label listed but not readable: {source}"
    return _empty_label(), None


def decode_batch(batch: dict[str, np.ndarray], cfg: DecodeConfig) -> dict[str, np.ndarray]:
    """Ray Data map_batches UDF (batch_format="numpy").

    In:  ID, SOURCE, LABEL_SOURCE, STATUS, ERROR, IMAGE_BYTES (bytes), LABEL_BYTES (bytes | None), optional
         LABEL_PROBLEM (a reason from the read stage is kept and the label not decoded), any others (passed
         through). A float NaN in an optional column counts as None (Ray's form of an all-null column).
    Out: the same minus the byte columns, plus IMAGE uint8 (H, W, 3) per row (empty (0, 0, 3) if not ok),
         LABEL uint8 (H, W) per row (empty (0, 0) when there is no usable label), HEIGHT, WIDTH int32 (the
         decoded size; the header size for too_large/truncated rows; 0 when unknown), LABEL_PROBLEM (str | None),
         decode_s float64 seconds. One output row per input row, same order.
    """
    num_rows = len(batch[schema.ID])
    nothing = [None] * num_rows
    statuses = [schema.text_or_none(v) for v in batch[schema.STATUS]]
    errors = [schema.text_or_none(v) for v in batch.get(schema.ERROR, nothing)]
    image_bytes = batch[schema.IMAGE_BYTES]
    label_bytes = batch.get(schema.LABEL_BYTES, nothing)
    label_sources = [schema.text_or_none(v) for v in batch.get(schema.LABEL_SOURCE, nothing)]
    # The read stage may already know the label is unusable (object missing): keep its reason.
    problems = [schema.text_or_none(v) for v in batch.get(schema.LABEL_PROBLEM, nothing)]

    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    heights = np.zeros(num_rows, dtype=np.int32)
    widths = np.zeros(num_rows, dtype=np.int32)
    seconds = np.zeros(num_rows, dtype=np.float64)

    for i in range(num_rows):
        start = time.perf_counter()
        image, label, problem = _empty_image(), _empty_label(), problems[i]
        if statuses[i] == schema.OK:
            data = image_bytes[i]
            try:
                decoded = decode_image(_opt_bytes(data), cfg)
            except DecodeError as e:
                statuses[i], errors[i] = e.kind, e.message
                if e.size is not None:
                    widths[i], heights[i] = e.size
                logger.debug("%s: %s: %s", batch[schema.ID][i], e.kind, e.message)
            else:
                image = decoded.image
                heights[i], widths[i] = image.shape[:2]
                if not problem:  # a reason given upstream wins; there are no label bytes to decode then
                    label, problem = _label_for(decoded, _opt_bytes(label_bytes[i]), label_sources[i], cfg)
        images.append(image)
        labels.append(label)
        problems[i] = problem
        seconds[i] = time.perf_counter() - start

    out = {k: v for k, v in batch.items() if k not in (schema.IMAGE_BYTES, schema.LABEL_BYTES)}
    if schema.LABEL_SOURCE in batch:
        out[schema.LABEL_SOURCE] = schema.object_column(label_sources)
    out[schema.STATUS] = schema.object_column(statuses)
    out[schema.ERROR] = schema.object_column(errors)
    out[schema.IMAGE] = schema.object_column(images)
    out[schema.LABEL] = schema.object_column(labels)
    out[schema.HEIGHT] = heights
    out[schema.WIDTH] = widths
    out[schema.LABEL_PROBLEM] = schema.object_column(problems)
    out["decode_s"] = seconds
    return out
