"""Hostile inputs for tests (decode unit tests and the pipeline/fault tests): broken, odd and malicious image and
label files, built in code with Pillow/numpy, each with the outcome the pipeline must produce.

- `HOSTILE_IMAGES`: `HostileImage(name, data, expected)`; `name` is a file name with extension (upload it as is).
  Stems are unique across all three lists, so image ids (key without extension) never collide.
- `HOSTILE_KEYS`: valid images whose *names* are hostile (spaces, unicode, `../`); same tuple type.
- `HOSTILE_LABELS`: `HostileLabel(name, image_name, image, label, expected)`; upload the image as `image_name`
  and the label as `<name>.png` under the label prefix (image stem == name).
- `Expected.status` is the row's final status: "ok" or a `schema.ErrorKind` value (`label_error` for label cases).
  `shape` is the decoded (H, W) (upright), `message` a case-insensitive substring of the error, `pixels` known RGB
  values of the decoded image (within `tolerance`), `label` the decoded label for usable labels.
- Usable labels hold classes 0..3 and 255 only, so they are valid for any model with num_classes >= 4; the
  out-of-range label holds 200 (and 21), invalid for any num_classes <= 21. Image pixel limits assume the default
  `DecodeConfig.max_pixels` (40 Mpx).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.schema import OK, ErrorKind

__all__ = [
    "Expected",
    "HostileImage",
    "HostileLabel",
    "HOSTILE_IMAGES",
    "HOSTILE_KEYS",
    "HOSTILE_LABELS",
    "EXIF_ORIENTED",
    "exif_display",
    "quadrants",
]

Pixel = tuple[tuple[int, int], tuple[int, int, int]]  # ((y, x), (r, g, b))


@dataclass(frozen=True, eq=False)
class Expected:
    status: str
    shape: tuple[int, int] | None = None
    message: str | None = None
    pixels: tuple[Pixel, ...] = ()
    tolerance: int = 0
    label: np.ndarray | None = None


class HostileImage(NamedTuple):
    name: str
    data: bytes
    expected: Expected


class HostileLabel(NamedTuple):
    name: str
    image_name: str
    image: bytes
    label: bytes
    expected: Expected


RED, GREEN, BLUE, YELLOW, BLACK, WHITE = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 0, 0),
    (255,) * 3,
)


# ---------------------------------------------------------------------------------------------------- builders
def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(width: int, height: int, idat: bytes, extra_chunks: bytes = b"") -> bytes:
    """A grayscale 8-bit PNG with a header claiming width x height and whatever IDAT we give it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra_chunks
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF segment's size: a small real JPEG whose header claims width x height."""
    out = bytearray(data)
    pos = 2
    while pos + 4 <= len(out) and out[pos] == 0xFF:
        marker = out[pos + 1]
        length = int.from_bytes(out[pos + 2 : pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            out[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            return bytes(out)
        pos += 2 + length
    raise ValueError("no SOF marker found")


def quadrants(height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3): red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    image = np.zeros((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    image[:h2, :w2], image[:h2, w2:], image[h2:, :w2], image[h2:, w2:] = RED, GREEN, BLUE, YELLOW
    return image


def exif_display(stored: np.ndarray, orientation: int) -> np.ndarray:
    """How a viewer shows `stored` (H, W, ...) with EXIF `orientation` (numpy only, independent of Pillow)."""
    swap = (1, 0, *range(2, stored.ndim))
    ops: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirror horizontal
        3: lambda a: a[::-1, ::-1],  # rotate 180
        4: lambda a: a[::-1],  # mirror vertical
        5: lambda a: a.transpose(swap),  # mirror across the main diagonal
        6: lambda a: np.rot90(a, k=-1),  # rotate 90 clockwise
        7: lambda a: a.transpose(swap)[::-1, ::-1],  # mirror across the anti-diagonal
        8: lambda a: np.rot90(a, k=1),  # rotate 90 counter-clockwise
    }
    return np.ascontiguousarray(ops[orientation](stored))


def _corners(image: np.ndarray) -> tuple[Pixel, ...]:
    h, w = image.shape[:2]
    return tuple(
        ((y, x), tuple(int(v) for v in image[y, x]))
        for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1))
    )


def _jpeg_with_orientation(stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    # 4:4:4 and high quality: flat colour blocks survive with small error at the corners.
    return _save(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


_SMALL = quadrants(24, 32)


# ---------------------------------------------------------------------------------------------------- images
def pixel_bomb_png() -> HostileImage:
    idat = zlib.compress(b"\x00" * 30001)  # one row; the header claims 30000 of them
    return HostileImage(
        "bomb_30000x30000_png.png",
        _raw_png(30000, 30000, idat),
        Expected(ErrorKind.TOO_LARGE, message="900 Mpx"),
    )


def pixel_bomb_gif() -> HostileImage:
    data = bytearray(_save(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 30000, 30000)  # logical screen size
    return HostileImage("bomb_30000x30000_gif.gif", bytes(data), Expected(ErrorKind.TOO_LARGE, message="Mpx"))


def over_limit_jpeg() -> HostileImage:
    data = _patch_jpeg_size(_save(Image.new("RGB", (16, 16)), "JPEG"), 12000, 12000)
    message = "12000x12000 = 144 Mpx over the limit of 40 Mpx"
    return HostileImage("claims_12000x12000.jpg", data, Expected(ErrorKind.TOO_LARGE, message=message))


def over_limit_png() -> HostileImage:
    data = _raw_png(8000, 6000, zlib.compress(b"\x00" * 8001))
    return HostileImage(
        "claims_8000x6000.png", data, Expected(ErrorKind.TOO_LARGE, message="8000x6000 = 48 Mpx")
    )


def ztxt_bomb_png() -> HostileImage:
    text = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (8 << 20), 9))  # 8 MiB of text in ~8 KiB
    data = _raw_png(4, 4, zlib.compress(b"\x00\x00\x00\x00\x00" * 4), extra_chunks=text)
    return HostileImage("ztxt_bomb.png", data, Expected(ErrorKind.DECODE, message="too large"))


def _truncate_idat(png: bytes) -> bytes:
    """Cut a PNG in the middle of its first IDAT chunk's data."""
    start = png.index(b"IDAT") + 4
    length = int.from_bytes(png[start - 8 : start - 4], "big")
    return png[: start + length // 2]


def truncated_png() -> HostileImage:
    data = _save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 80, 3), np.uint8)), "PNG")
    return HostileImage(
        "truncated_png.png", _truncate_idat(data), Expected(ErrorKind.DECODE, message="truncated PNG")
    )


def truncated_jpeg() -> HostileImage:
    data = _save(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 80, 3), np.uint8)), "JPEG")
    return HostileImage(
        "truncated_jpg.jpg", data[: len(data) // 2], Expected(ErrorKind.DECODE, message="truncated JPEG")
    )


def truncated_jpeg_header() -> HostileImage:
    data = _save(Image.new("RGB", (64, 80)), "JPEG")[:100]
    return HostileImage("truncated_header_jpg.jpg", data, Expected(ErrorKind.DECODE, message="truncated"))


def corrupt_png_stream() -> HostileImage:
    idat = bytearray(zlib.compress(bytes(5 * 4)))
    idat[5:9] = b"\xff\xff\xff\xff"
    return HostileImage(
        "corrupt_zlib.png", _raw_png(4, 4, bytes(idat)), Expected(ErrorKind.DECODE, message="PNG")
    )


def zero_bytes() -> HostileImage:
    return HostileImage("zero_bytes.jpg", b"", Expected(ErrorKind.DECODE, message="0 bytes"))


def html_named_jpg() -> HostileImage:
    data = b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>denied</body></html>\n"
    return HostileImage("html_page.jpg", data, Expected(ErrorKind.DECODE, message="HTML"))


def svg_named_png() -> HostileImage:
    data = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    return HostileImage("vector.png", data, Expected(ErrorKind.DECODE, message="SVG"))


def eps_file() -> HostileImage:
    # Pillow's EPS plugin would run Ghostscript: the decoder must not even try.
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    return HostileImage("postscript.eps", data, Expected(ErrorKind.DECODE, message="not a supported image"))


def random_bytes() -> HostileImage:
    data = np.random.default_rng(3).integers(0, 256, 4096, np.uint8).tobytes()
    return HostileImage("noise.png", data, Expected(ErrorKind.DECODE, message="not a supported image"))


def one_by_one() -> HostileImage:
    data = _save(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")
    return HostileImage("one_by_one.png", data, Expected(OK, (1, 1), pixels=(((0, 0), (10, 20, 30)),)))


def wide_10000x10() -> HostileImage:
    data = _save(Image.new("L", (10000, 10), 77), "PNG")
    return HostileImage(
        "wide_10000x10.png", data, Expected(OK, (10, 10000), pixels=(((9, 9999), (77, 77, 77)),))
    )


def tall_10x10000() -> HostileImage:
    data = _save(Image.new("RGB", (10, 10000), (1, 2, 3)), "PNG")
    return HostileImage(
        "tall_10x10000.png", data, Expected(OK, (10000, 10), pixels=(((9999, 9), (1, 2, 3)),))
    )


def gray16_png() -> HostileImage:
    values = np.array([[0, 65535, 32896, 257]], np.uint16)  # -> 0, 255, 128, 1
    image = Image.fromarray(values)
    assert image.mode == "I;16", image.mode
    pixels = (((0, 0), BLACK), ((0, 1), WHITE), ((0, 2), (128,) * 3), ((0, 3), (1,) * 3))
    return HostileImage("gray16.png", _save(image, "PNG"), Expected(OK, (1, 4), pixels=pixels))


def cmyk_jpeg() -> HostileImage:
    data = _save(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG", quality=95)
    return HostileImage("cmyk.jpg", data, Expected(OK, (12, 16), pixels=(((5, 5), RED),), tolerance=12))


def la_png() -> HostileImage:
    image = np.zeros((4, 6, 2), np.uint8)
    image[..., 0] = 200
    image[:, :3, 1] = 255  # left half opaque, right half transparent (composited on black)
    data = _save(Image.merge("LA", _planes(image)), "PNG")
    return HostileImage(
        "gray_alpha.png", data, Expected(OK, (4, 6), pixels=(((0, 0), (200,) * 3), ((0, 5), BLACK)))
    )


def _planes(array: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(np.ascontiguousarray(array[..., c])) for c in range(array.shape[2])]


def palette_transparency_png() -> HostileImage:
    image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8))
    image.putpalette([255, 0, 0, 0, 255, 0])  # index 0 red, 1 green
    data = _save(image, "PNG", transparency=0)  # index 0 fully transparent
    return HostileImage(
        "palette_transparent.png", data, Expected(OK, (2, 2), pixels=(((0, 0), BLACK), ((0, 1), GREEN)))
    )


def palette_png() -> HostileImage:
    image = Image.fromarray(np.array([[0, 1, 2]], np.uint8))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pixels = (((0, 0), RED), ((0, 1), GREEN), ((0, 2), BLUE))
    return HostileImage("palette.png", _save(image, "PNG"), Expected(OK, (1, 3), pixels=pixels))


def rgba_png() -> HostileImage:
    image = np.zeros((3, 3, 4), np.uint8)
    image[...] = (255, 0, 0, 128)  # half-transparent red -> (128, 0, 0) on black
    image[0, 0] = (0, 255, 0, 255)
    data = _save(Image.merge("RGBA", _planes(image)), "PNG")
    return HostileImage(
        "rgba.png", data, Expected(OK, (3, 3), pixels=(((0, 0), GREEN), ((2, 2), (128, 0, 0))))
    )


def gray_png() -> HostileImage:
    data = _save(Image.fromarray(np.full((5, 7), 42, np.uint8)), "PNG")
    return HostileImage("gray.png", data, Expected(OK, (5, 7), pixels=(((4, 6), (42,) * 3),)))


def bilevel_png() -> HostileImage:
    checker = (np.indices((4, 4)).sum(axis=0) % 2).astype(bool)
    image = Image.fromarray(checker)
    assert image.mode == "1", image.mode
    pixels = (((0, 0), BLACK), ((0, 1), WHITE))
    return HostileImage("bilevel.png", _save(image, "PNG"), Expected(OK, (4, 4), pixels=pixels))


def animated_gif() -> HostileImage:
    frames = [Image.new("RGB", (8, 6), color) for color in (RED, GREEN, BLUE)]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return HostileImage("animated_gif.gif", data, Expected(OK, (6, 8), pixels=(((3, 3), RED),)))


def animated_png() -> HostileImage:
    frames = [Image.new("RGB", (8, 6), color) for color in (BLUE, RED)]
    data = _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    return HostileImage("animated_png.png", data, Expected(OK, (6, 8), pixels=(((3, 3), BLUE),)))


def bmp_image() -> HostileImage:
    data = _save(Image.fromarray(_SMALL), "BMP")
    return HostileImage("quadrants_bmp.bmp", data, Expected(OK, (24, 32), pixels=_corners(_SMALL)))


def tiff_image() -> HostileImage:
    data = _save(Image.fromarray(_SMALL), "TIFF", compression="tiff_deflate")
    return HostileImage("quadrants_tiff.tiff", data, Expected(OK, (24, 32), pixels=_corners(_SMALL)))


def exif_oriented(orientation: int) -> HostileImage:
    display = exif_display(_SMALL, orientation)
    expected = Expected(OK, display.shape[:2], pixels=_corners(display), tolerance=40)
    return HostileImage(
        f"exif_orientation_{orientation}.jpg", _jpeg_with_orientation(_SMALL, orientation), expected
    )


EXIF_ORIENTED = [exif_oriented(o) for o in range(1, 9)]

HOSTILE_IMAGES: list[HostileImage] = [
    pixel_bomb_png(),
    pixel_bomb_gif(),
    over_limit_jpeg(),
    over_limit_png(),
    ztxt_bomb_png(),
    truncated_png(),
    truncated_jpeg(),
    truncated_jpeg_header(),
    corrupt_png_stream(),
    zero_bytes(),
    html_named_jpg(),
    svg_named_png(),
    eps_file(),
    random_bytes(),
    one_by_one(),
    wide_10000x10(),
    tall_10x10000(),
    gray16_png(),
    cmyk_jpeg(),
    la_png(),
    palette_transparency_png(),
    palette_png(),
    rgba_png(),
    gray_png(),
    bilevel_png(),
    animated_gif(),
    animated_png(),
    bmp_image(),
    tiff_image(),
    *EXIF_ORIENTED[1:],  # orientations 2..8
]


def _key_case(name: str) -> HostileImage:
    return HostileImage(
        name, _save(Image.fromarray(_SMALL), "PNG"), Expected(OK, (24, 32), pixels=_corners(_SMALL))
    )


HOSTILE_KEYS: list[HostileImage] = [
    _key_case("name with spaces.png"),
    _key_case("ünïcødé-画像.png"),
    _key_case("../escape.png"),
    _key_case("nested/../../escape_more.png"),
]


# ---------------------------------------------------------------------------------------------------- labels
def _label_array(height: int, width: int) -> np.ndarray:
    """Classes 0..3 in bands, a void (255) border: a VOC-like label."""
    label = (np.arange(width)[None, :] * 4 // width).repeat(height, axis=0).astype(np.uint8)
    label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = 255
    return label


def _label_png(label: np.ndarray, mode: str = "P") -> bytes:
    image = Image.fromarray(label)
    if mode == "P":
        image.putpalette([v for i in range(256) for v in (i * 40 % 256, i * 90 % 256, i * 10 % 256)])
    return _save(image, "PNG")


_LABEL_IMAGE = _save(Image.fromarray(_SMALL), "PNG")
_LABEL = _label_array(24, 32)


def _label_case(name: str, label: bytes, expected: Expected, image: bytes = _LABEL_IMAGE, ext: str = "png"):
    return HostileLabel(name, f"{name}.{ext}", image, label, expected)


def _label_error(message: str) -> Expected:
    return Expected(ErrorKind.LABEL, (24, 32), message=message)


def _label_exif(name: str, orientation: int, label: np.ndarray, expected_label: np.ndarray) -> HostileLabel:
    display = exif_display(_SMALL, orientation)
    expected = Expected(OK, display.shape[:2], label=expected_label)
    return _label_case(name, _label_png(label), expected, _jpeg_with_orientation(_SMALL, orientation), "jpg")


def _rgb_label() -> bytes:
    return _save(Image.fromarray(np.zeros((24, 32, 3), np.uint8)), "PNG")


_STORED_LABEL = np.random.default_rng(4).choice(np.array([0, 1, 2, 3, 255], np.uint8), (24, 32))

HOSTILE_LABELS: list[HostileLabel] = [
    _label_case("label_ok", _label_png(_LABEL), Expected(OK, (24, 32), label=_LABEL)),
    _label_case("label_ok_gray", _label_png(_LABEL, mode="L"), Expected(OK, (24, 32), label=_LABEL)),
    _label_case(
        "label_out_of_range",
        _label_png(np.where(_LABEL == 3, 200, np.where(_LABEL == 2, 21, _LABEL)).astype(np.uint8)),
        _label_error("values outside 0.."),
    ),
    _label_case(
        "label_wrong_size", _label_png(_label_array(20, 30)), _label_error("label size 30x20 differs")
    ),
    _label_case("label_transposed_size", _label_png(_label_array(32, 24)), _label_error("differs")),
    _label_case("label_not_png", _save(Image.fromarray(_LABEL), "JPEG"), _label_error("not a PNG (JPEG)")),
    _label_case(
        "label_html", b"<html><body>404</body></html>", _label_error("not a PNG: not an image (HTML?)")
    ),
    _label_case("label_truncated", _truncate_idat(_label_png(_LABEL)), _label_error("truncated")),
    _label_case("label_empty", b"", _label_error("0 bytes")),
    _label_case("label_rgb", _rgb_label(), _label_error("mode RGB")),
    _label_case("label_bomb", _raw_png(30000, 30000, zlib.compress(b"\x00" * 30001)), _label_error("Mpx")),
    # EXIF-rotated images: a label in stored orientation (VOC) gets the image's transpose; one already upright is
    # used as is.
    _label_exif("label_exif6_stored", 6, _STORED_LABEL, exif_display(_STORED_LABEL, 6)),
    _label_exif("label_exif6_upright", 6, exif_display(_STORED_LABEL, 6), exif_display(_STORED_LABEL, 6)),
    _label_exif("label_exif3_stored", 3, _STORED_LABEL, exif_display(_STORED_LABEL, 3)),
]
