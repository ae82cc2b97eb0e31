"""Decode stage: every hostile image and label gives the right row; config validation; batch contract."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline import schema
from pipeline.stages.decode import DecodeConfig, DecodeError, decode_batch, decode_image, decode_label
from tests.hostile import (
    EXIF_ORIENTED,
    HOSTILE_IMAGES,
    HOSTILE_KEYS,
    HOSTILE_LABELS,
    Expected,
    HostileImage,
    quadrants,
)

CFG = DecodeConfig()


def _batch(
    images: list[bytes | None],
    labels: list[bytes | None] | None = None,
    *,
    statuses: list[str] | None = None,
    label_sources: list[str | None] | None = None,
) -> dict[str, np.ndarray]:
    """A batch shaped like the read stage's output (object arrays, as Ray hands them over)."""
    n = len(images)

    def objects(values: list) -> np.ndarray:
        column = np.empty(n, dtype=object)
        column[:] = values
        return column

    return {
        schema.ID: objects([f"img{i}" for i in range(n)]),
        schema.SOURCE: objects([f"s3://b/img{i}" for i in range(n)]),
        schema.LABEL_SOURCE: objects(
            label_sources or [None if labels is None else f"s3://b/l{i}.png" for i in range(n)]
        ),
        schema.STATUS: objects(statuses or [schema.OK] * n),
        schema.ERROR: objects(
            [None if (statuses or [schema.OK] * n)[i] == schema.OK else "upstream" for i in range(n)]
        ),
        schema.IMAGE_BYTES: objects(images),
        schema.LABEL_BYTES: objects(labels or [None] * n),
    }


def _check_image_row(out: dict, i: int, expected: Expected) -> None:
    status, error, image = out[schema.STATUS][i], out[schema.ERROR][i], out[schema.IMAGE][i]
    assert status == expected.status, (status, error)
    if expected.status != schema.OK:
        assert expected.message is not None and expected.message.lower() in error.lower(), error
        assert image.shape == (0, 0, 3) and image.dtype == np.uint8
        return
    assert error is None
    assert image.dtype == np.uint8 and image.flags.c_contiguous and image.flags.writeable
    assert image.shape == (*expected.shape, 3)
    assert (out[schema.HEIGHT][i], out[schema.WIDTH][i]) == expected.shape
    for (y, x), rgb in expected.pixels:
        diff = np.abs(image[y, x].astype(int) - np.array(rgb)).max()
        assert diff <= expected.tolerance, (y, x, image[y, x].tolist(), rgb)


@pytest.mark.parametrize("case", HOSTILE_IMAGES + HOSTILE_KEYS, ids=lambda c: c.name)
def test_hostile_image(case: HostileImage) -> None:
    out = decode_batch(_batch([case.data]), CFG)
    _check_image_row(out, 0, case.expected)
    assert out[schema.LABEL][0].shape == (0, 0) and out[schema.LABEL_PROBLEM][0] is None
    assert out["decode_s"][0] >= 0


def test_hostile_kinds_cover_the_issue_list() -> None:
    names = " ".join(case.name for case in HOSTILE_IMAGES)
    kinds = [
        "bomb",
        "truncated_png",
        "truncated_jpg",
        "zero_bytes",
        "html",
        "one_by_one",
        "wide_10000x10",
        "gray16",
    ]
    kinds += ["cmyk", "gray_alpha", "palette_transparent", "animated_gif", "gray.png", "rgba", "bilevel"]
    for kind in kinds:
        assert kind in names, kind
    assert {c.name for c in HOSTILE_IMAGES} >= {f"exif_orientation_{o}.jpg" for o in range(2, 9)}
    assert len(HOSTILE_IMAGES) >= 15
    # Unique stems: the read stage derives image ids from keys without extension.
    stems = [c.name.rsplit(".", 1)[0] for c in HOSTILE_IMAGES + HOSTILE_KEYS]
    stems += [c.image_name.rsplit(".", 1)[0] for c in HOSTILE_LABELS]
    assert len(set(stems)) == len(stems)
    assert all(c.image_name.rsplit(".", 1)[0] == c.name for c in HOSTILE_LABELS)


def test_batch_keeps_rows_order_and_passes_failed_rows_through() -> None:
    cases = HOSTILE_IMAGES + HOSTILE_KEYS
    images = [c.data for c in cases] + [None]
    statuses = [schema.OK] * len(cases) + [schema.ErrorKind.READ]
    batch = _batch(images, statuses=statuses)
    batch["extra"] = np.arange(len(images))  # unknown columns pass through untouched
    out = decode_batch(batch, CFG)
    assert list(out[schema.ID]) == list(batch[schema.ID])
    assert np.array_equal(out["extra"], batch["extra"])
    assert schema.IMAGE_BYTES not in out and schema.LABEL_BYTES not in out
    for name in (schema.IMAGE, schema.LABEL, schema.STATUS, schema.ERROR, schema.LABEL_PROBLEM):
        assert out[name].dtype == object and out[name].shape == (len(images),), name
    assert out[schema.HEIGHT].dtype == np.int32 and out[schema.WIDTH].dtype == np.int32
    assert out["decode_s"].shape == (len(images),)
    for i, case in enumerate(cases):
        _check_image_row(out, i, case.expected)
    last = len(cases)
    assert out[schema.STATUS][last] == schema.ErrorKind.READ and out[schema.ERROR][last] == "upstream"
    assert out[schema.IMAGE][last].shape == (0, 0, 3) and out[schema.LABEL][last].shape == (0, 0)


def test_same_shape_images_stay_an_object_column() -> None:
    data = HOSTILE_KEYS[0].data
    out = decode_batch(_batch([data, data]), CFG)
    # Not stacked into (2, H, W, 3): Ray turns an object column of arrays into a variable-shaped tensor column.
    assert out[schema.IMAGE].dtype == object and out[schema.IMAGE][0].shape == (24, 32, 3)
    assert out[schema.IMAGE][0] is not out[schema.IMAGE][1]


def test_too_large_rows_carry_the_header_size() -> None:
    case = next(c for c in HOSTILE_IMAGES if c.name == "claims_12000x12000.jpg")
    out = decode_batch(_batch([case.data]), CFG)
    assert out[schema.STATUS][0] == schema.ErrorKind.TOO_LARGE
    assert (out[schema.HEIGHT][0], out[schema.WIDTH][0]) == (12000, 12000)


def test_pixel_limit_boundary() -> None:
    cfg = DecodeConfig(max_pixels=100)
    at_limit = _png(Image.new("RGB", (10, 10)))
    over = _png(Image.new("RGB", (11, 10)))
    assert decode_image(at_limit, cfg).image.shape == (10, 10, 3)
    with pytest.raises(DecodeError) as err:
        decode_image(over, cfg)
    assert err.value.kind == schema.ErrorKind.TOO_LARGE and "11x10" in err.value.message
    assert err.value.size == (11, 10)


def test_pillow_guard_stays_on_above_our_limit() -> None:
    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    # Our limit raised above Pillow's: a 144 Mpx header is still refused, by Pillow's guard (warning -> error row).
    case = next(c for c in HOSTILE_IMAGES if c.name == "claims_12000x12000.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and the bomb warning must not escape the decoder
        with pytest.raises(DecodeError) as err:
            decode_image(case.data, DecodeConfig(max_pixels=10**9))
    assert err.value.kind == schema.ErrorKind.TOO_LARGE and "decompression-bomb guard" in err.value.message
    assert before == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("case", EXIF_ORIENTED, ids=lambda c: c.name)
def test_exif_transpose_matches_pillow(case: HostileImage) -> None:
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(case.data))).convert("RGB"))
    decoded = decode_image(case.data, CFG)
    assert decoded.orientation == int(case.name.split("_")[-1].split(".")[0])
    assert decoded.stored_size == (32, 24)
    assert np.array_equal(decoded.image, expected)


def test_broken_exif_loses_only_the_orientation() -> None:
    buffer = io.BytesIO()
    # IFD says one entry (the orientation tag) but the entry is cut short.
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00"
    Image.fromarray(quadrants(8, 12)).save(buffer, "JPEG", exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # Pillow's "Corrupt EXIF data" warning is logged, not raised or printed
        decoded = decode_image(buffer.getvalue(), CFG)
    assert decoded.orientation == 1 and decoded.image.shape == (8, 12, 3)


def test_32bit_and_float_grayscale_are_scaled_to_8bit() -> None:
    ints = Image.fromarray(np.array([[0, 65535, 70000, -5, 32896]], np.int32))
    floats = Image.fromarray(np.array([[-3.0, 12.4, 300.0]], np.float32))
    assert (ints.mode, floats.mode) == ("I", "F")
    got_i = decode_image(_save(ints, "TIFF"), CFG).image
    got_f = decode_image(_save(floats, "TIFF"), CFG).image
    assert got_i[0, :, 0].tolist() == [0, 255, 255, 0, 128] and (got_i[..., 0] == got_i[..., 2]).all()
    assert got_f[0, :, 1].tolist() == [0, 12, 255]


@pytest.mark.parametrize("case", HOSTILE_LABELS, ids=lambda c: c.name)
def test_hostile_label(case) -> None:
    out = decode_batch(_batch([case.image], [case.label]), CFG)
    assert out[schema.STATUS][0] == schema.OK, out[schema.ERROR][0]  # a label problem never fails the row
    assert out[schema.IMAGE][0].shape[:2] == case.expected.shape
    label, problem = out[schema.LABEL][0], out[schema.LABEL_PROBLEM][0]
    if case.expected.status == schema.OK:
        assert problem is None
        assert label.dtype == np.uint8 and label.flags.c_contiguous and label.flags.writeable
        assert np.array_equal(label, case.expected.label)
    else:
        assert case.expected.status == schema.ErrorKind.LABEL
        assert case.expected.message.lower() in problem.lower(), problem
        assert label.shape == (0, 0) and label.dtype == np.uint8


def test_label_value_range_follows_num_classes() -> None:
    case = next(c for c in HOSTILE_LABELS if c.name == "label_ok")  # classes 0..3 and 255
    decoded = decode_image(case.image, CFG)
    assert np.array_equal(decode_label(case.label, decoded, DecodeConfig(num_classes=4)), case.expected.label)
    with pytest.raises(DecodeError) as err:
        decode_label(case.label, decoded, DecodeConfig(num_classes=3))
    assert (
        err.value.kind == schema.ErrorKind.LABEL
        and "outside 0..2" in err.value.message
        and ": 3" in err.value.message
    )


def test_missing_and_absent_labels() -> None:
    image = HOSTILE_KEYS[0].data
    batch = _batch([image, image, image], label_sources=["s3://b/missing.png", None, "s3://b/x.png"])
    batch[schema.LABEL_PROBLEM] = np.array([None, None, "cannot read label s3://b/x.png: 403"], dtype=object)
    out = decode_batch(batch, CFG)
    assert list(out[schema.STATUS]) == [schema.OK] * 3
    assert out[schema.LABEL_PROBLEM][0] == "label listed but not readable: s3://b/missing.png"
    assert out[schema.LABEL_PROBLEM][1] is None  # no label expected: no problem
    assert (
        out[schema.LABEL_PROBLEM][2] == "cannot read label s3://b/x.png: 403"
    )  # the read stage's reason is kept
    assert all(out[schema.LABEL][i].shape == (0, 0) for i in range(3))


def test_all_null_columns_from_ray_count_as_none() -> None:
    # Ray hands an all-null Arrow column to the next stage as a float32 NaN array.
    batch = _batch([HOSTILE_KEYS[0].data, HOSTILE_KEYS[0].data])
    nan = np.full(2, np.nan, np.float32)
    batch.update(
        {schema.ERROR: nan, schema.LABEL_BYTES: nan, schema.LABEL_SOURCE: nan, schema.LABEL_PROBLEM: nan}
    )
    out = decode_batch(batch, CFG)
    assert list(out[schema.STATUS]) == [schema.OK] * 2 and list(out[schema.ERROR]) == [None] * 2
    assert list(out[schema.LABEL_PROBLEM]) == [None] * 2 and list(out[schema.LABEL_SOURCE]) == [None] * 2
    assert out[schema.IMAGE][1].shape == (24, 32, 3)


def test_batch_without_label_columns() -> None:
    batch = _batch([HOSTILE_KEYS[0].data])
    del batch[schema.LABEL_BYTES], batch[schema.LABEL_SOURCE]
    out = decode_batch(batch, CFG)
    assert out[schema.STATUS][0] == schema.OK and out[schema.LABEL_PROBLEM][0] is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_pixels": 0},
        {"max_pixels": -5},
        {"max_pixels": 1.5},
        {"max_pixels": True},
        {"num_classes": 0},
        {"num_classes": 256},
        {"num_classes": "21"},
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DecodeConfig(**kwargs)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        CFG.max_pixels = 1  # type: ignore[misc]


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    return _save(image, "PNG")
