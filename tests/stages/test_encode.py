"""Encode stage: output schema, PNG round trip, hand-checked confusion counts, label_error rows, pass-through."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.stages.decode import DecodeConfig, decode_batch
from pipeline.stages.encode import VOC_PALETTE, EncodeConfig, encode_batch, mask_to_png, to_table
from tests.hostile import HOSTILE_IMAGES, HOSTILE_KEYS, HOSTILE_LABELS

CFG = EncodeConfig(num_classes=3, model_variant="DeepLab-LargeFOV", model_digest="sha256:abc")

# Hand-checked scoring example, C = 3: 5 non-void pixels.
GT = np.array([[0, 1, 255], [1, 1, 2]], np.uint8)
RAW = np.array([[0, 1, 1], [2, 1, 2]], np.uint8)  # gt->pred: 0->0, 1->1, 1->2, 1->1, 2->2 (void skipped)
CRF = np.array([[0, 1, 0], [1, 1, 2]], np.uint8)  # gt->pred: 0->0, 1->1, 1->1, 1->1, 2->2
RAW_CONFUSION = [1, 0, 0, 0, 2, 1, 0, 0, 1]  # rows = gt, cols = pred
CRF_CONFUSION = [1, 0, 0, 0, 3, 0, 0, 0, 1]


def _objects(values: list) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def _batch(with_crf: bool = True) -> dict[str, np.ndarray]:
    """4 rows: labelled ok, ok with a label problem, ok without label, and a decode error (no masks)."""
    empty = np.zeros((0, 0), np.uint8)
    batch = {
        schema.ID: _objects(["a", "b", "c", "d"]),
        schema.SOURCE: _objects(["s3://x/a.jpg", "s3://x/b.jpg", "s3://x/c.jpg", "s3://x/d.jpg"]),
        schema.LABEL_SOURCE: _objects(["s3://x/a.png", "s3://x/b.png", None, None]),
        schema.STATUS: _objects([schema.OK, schema.OK, schema.OK, schema.ErrorKind.DECODE]),
        schema.ERROR: _objects([None, None, None, "truncated JPEG"]),
        schema.HEIGHT: np.array([2, 2, 2, 0], np.int32),
        schema.WIDTH: np.array([3, 3, 3, 0], np.int32),
        schema.IMAGE: _objects([np.zeros((2, 3, 3), np.uint8)] * 3 + [np.zeros((0, 0, 3), np.uint8)]),
        schema.LABEL: _objects([GT, empty, empty, empty]),
        schema.LABEL_PROBLEM: _objects([None, "label size 4x4 differs from the image's 3x2", None, None]),
        schema.RAW_MASK: _objects([RAW, RAW, RAW, empty]),
        "decode_s": np.array([0.5, 0.25, 0.125, 0.0]),
        "dcnn_s": np.array([1.0, 1.0, 1.0, np.nan]),
        "dcnn_node": _objects(["node1", "node1", "node2", None]),
    }
    if with_crf:
        batch[schema.MASK] = _objects([CRF, CRF, CRF, empty])
        batch["crf_s"] = np.array([2.0, 2.0, 2.0, np.nan])
        batch["crf_node"] = _objects(["node3"] * 3 + [None])
    else:
        batch[schema.LOGITS] = _objects([np.zeros((3, 1, 1), np.float16)] * 4)
    return batch


def _decode_png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "P"
    return np.asarray(image)


def test_output_builds_the_output_schema_table() -> None:
    columns = encode_batch(_batch(), CFG)
    assert list(columns) == schema.OUTPUT_SCHEMA.names
    table = to_table(columns)
    assert table.schema.equals(schema.OUTPUT_SCHEMA) and table.num_rows == 4
    assert table.column(schema.ID).to_pylist() == ["a", "b", "c", "d"]
    assert table.column("num_classes").to_pylist() == [3] * 4
    assert table.column("model_digest").to_pylist() == ["sha256:abc"] * 4
    assert table.column("model_variant").to_pylist() == ["DeepLab-LargeFOV"] * 4


def test_labelled_row_masks_and_confusion() -> None:
    out = encode_batch(_batch(), CFG)
    assert out[schema.STATUS][0] == schema.OK and out[schema.ERROR][0] is None
    assert np.array_equal(_decode_png(out["raw_mask_png"][0]), RAW)
    assert np.array_equal(_decode_png(out["mask_png"][0]), CRF)
    assert out["confusion_raw"][0] == RAW_CONFUSION
    assert out["confusion_crf"][0] == CRF_CONFUSION
    assert (out[schema.HEIGHT][0], out[schema.WIDTH][0]) == (2, 3)


def test_label_problem_becomes_label_error_with_masks() -> None:
    out = encode_batch(_batch(), CFG)
    assert out[schema.STATUS][1] == schema.ErrorKind.LABEL
    assert out[schema.ERROR][1] == "label size 4x4 differs from the image's 3x2"
    assert np.array_equal(_decode_png(out["mask_png"][1]), CRF)
    assert np.array_equal(_decode_png(out["raw_mask_png"][1]), RAW)
    assert out["confusion_raw"][1] is None and out["confusion_crf"][1] is None


def test_unlabelled_row_has_masks_and_no_confusion() -> None:
    out = encode_batch(_batch(), CFG)
    assert out[schema.STATUS][2] == schema.OK
    assert (
        out["mask_png"][2] is not None and out["confusion_raw"][2] is None and out["confusion_crf"][2] is None
    )


def test_failed_row_passes_through_without_masks() -> None:
    out = encode_batch(_batch(), CFG)
    assert out[schema.STATUS][3] == schema.ErrorKind.DECODE and out[schema.ERROR][3] == "truncated JPEG"
    assert out["mask_png"][3] is None and out["raw_mask_png"][3] is None
    assert out[schema.HEIGHT][3] is None and out[schema.WIDTH][3] is None  # size 0 = unknown -> null
    assert out["encode_s"][3] is None


def test_timings_and_nodes() -> None:
    out = encode_batch(_batch(), CFG)
    assert out["decode_s"] == [0.5, 0.25, 0.125, 0.0]
    assert out["dcnn_s"] == [1.0, 1.0, 1.0, None]  # NaN -> null
    assert out["crf_s"] == [2.0, 2.0, 2.0, None]
    assert all(isinstance(s, float) and s >= 0 for s in out["encode_s"][:3])
    assert out["dcnn_node"] == ["node1", "node1", "node2", None] and out["crf_node"] == ["node3"] * 3 + [None]


def test_crf_off_uses_the_raw_mask_and_drops_logits() -> None:
    columns = encode_batch(_batch(with_crf=False), CFG)
    table = to_table(columns)
    assert table.schema.equals(schema.OUTPUT_SCHEMA) and schema.LOGITS not in table.column_names
    assert columns["mask_png"][0] == columns["raw_mask_png"][0]
    assert np.array_equal(_decode_png(columns["mask_png"][0]), RAW)
    assert columns["confusion_raw"][0] == RAW_CONFUSION and columns["confusion_crf"][0] is None
    assert columns["crf_s"] == [None] * 4 and columns["crf_node"] == [None] * 4


def test_stacked_mask_columns_are_accepted() -> None:
    batch = _batch()
    ok = [0, 1, 2]
    batch = {k: (v[ok] if len(v) == 4 else v) for k, v in batch.items()}
    batch[schema.RAW_MASK] = np.stack([RAW] * 3)  # (N, H, W), as Ray hands a fixed-shape tensor column
    batch[schema.MASK] = np.stack([CRF] * 3)
    out = encode_batch(batch, CFG)
    assert out["confusion_raw"][0] == RAW_CONFUSION and out["confusion_crf"][0] == CRF_CONFUSION
    assert np.array_equal(_decode_png(out["mask_png"][2]), CRF)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.zeros((3, 2), np.uint8), "shape (3, 2) != image shape (2, 3)"),
        (np.full((2, 3), 3, np.uint8), "values must be in 0..2"),
        (np.zeros((2, 3), np.float32), "integer class indices"),
        (None, "non-empty (H, W) array"),
    ],
)
def test_malformed_mask_becomes_encode_error(mask, message: str) -> None:
    batch = _batch(with_crf=False)
    batch[schema.RAW_MASK][0] = mask
    out = encode_batch(batch, CFG)
    assert out[schema.STATUS][0] == schema.ErrorKind.ENCODE and message in out[schema.ERROR][0]
    assert out["mask_png"][0] is None and out["raw_mask_png"][0] is None and out["confusion_raw"][0] is None
    assert out[schema.STATUS][2] == schema.OK  # the other rows are unaffected


def test_label_unusable_for_scoring_becomes_label_error() -> None:
    batch = _batch()
    batch[schema.LABEL][0] = np.full((2, 3), 7, np.uint8)  # >= num_classes and not void, missed upstream
    out = encode_batch(batch, CFG)
    assert out[schema.STATUS][0] == schema.ErrorKind.LABEL and "label unusable" in out[schema.ERROR][0]
    assert out["mask_png"][0] is not None and out["confusion_raw"][0] is None


def test_all_null_columns_from_ray_count_as_none() -> None:
    batch = _batch()
    batch[schema.LABEL_PROBLEM] = np.full(4, np.nan, np.float32)  # Ray's form of an all-null column
    batch["crf_node"] = np.full(4, np.nan, np.float32)
    out = encode_batch(batch, CFG)
    assert out[schema.STATUS][:3] == [schema.OK] * 3 and out["confusion_raw"][0] == RAW_CONFUSION
    assert out["crf_node"] == [None] * 4


def test_missing_raw_mask_column_is_a_wiring_error() -> None:
    batch = _batch()
    del batch[schema.RAW_MASK]
    with pytest.raises(ValueError, match="raw_mask"):
        encode_batch(batch, CFG)


def test_mask_png_is_voc_palette_with_class_indices() -> None:
    mask = np.arange(21, dtype=np.uint8).reshape(3, 7)
    image = Image.open(io.BytesIO(mask_to_png(mask, 21)))
    assert image.mode == "P" and np.array_equal(np.asarray(image), mask)
    palette = image.getpalette()
    assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0] and palette[15 * 3 : 16 * 3] == [192, 128, 128]
    assert palette == VOC_PALETTE[: 21 * 3]
    with pytest.raises(ValueError, match="num_classes"):
        mask_to_png(mask, 20)


def test_parquet_round_trip(tmp_path) -> None:
    table = to_table(encode_batch(_batch(), CFG))
    pq.write_table(table, tmp_path / "part.parquet")
    back = pq.read_table(tmp_path / "part.parquet")
    assert back.schema.equals(schema.OUTPUT_SCHEMA, check_metadata=False) and back.equals(table)
    confusion = np.array(back.column("confusion_raw")[0].as_py()).reshape(3, 3)
    assert confusion.sum() == 5 and np.trace(confusion) == 4


def test_hostile_inputs_end_as_the_expected_rows() -> None:
    """decode -> fake DCNN -> encode over every hostile image and label: one row each, the expected status."""
    images = [c.data for c in HOSTILE_IMAGES + HOSTILE_KEYS] + [c.image for c in HOSTILE_LABELS]
    labels = [None] * (len(HOSTILE_IMAGES) + len(HOSTILE_KEYS)) + [c.label for c in HOSTILE_LABELS]
    expected = [c.expected for c in HOSTILE_IMAGES + HOSTILE_KEYS + HOSTILE_LABELS]
    n = len(images)
    batch = {
        schema.ID: _objects([f"id{i}" for i in range(n)]),
        schema.SOURCE: _objects([f"s3://x/{i}" for i in range(n)]),
        schema.LABEL_SOURCE: _objects(
            [None if label is None else f"s3://x/{i}.png" for i, label in enumerate(labels)]
        ),
        schema.STATUS: _objects([schema.OK] * n),
        schema.ERROR: _objects([None] * n),
        schema.IMAGE_BYTES: _objects(images),
        schema.LABEL_BYTES: _objects(labels),
    }
    decoded = decode_batch(batch, DecodeConfig())
    # Fake DCNN: a deterministic class map from the red channel (classes 0..3 < num_classes = 21).
    decoded[schema.RAW_MASK] = _objects(
        [(image[..., 0] // 64).astype(np.uint8) for image in decoded[schema.IMAGE]]
    )
    cfg = EncodeConfig(num_classes=21, model_variant="DeepLab-LargeFOV", model_digest="sha256:0")
    table = to_table(encode_batch(decoded, cfg))
    assert table.num_rows == n and table.column(schema.ID).to_pylist() == list(batch[schema.ID])
    rows = table.to_pylist()
    for row, exp in zip(rows, expected, strict=True):
        assert row[schema.STATUS] == exp.status, (row[schema.ID], row[schema.ERROR])
        if exp.status in (schema.OK, schema.ErrorKind.LABEL):
            mask = _decode_png(row["mask_png"])
            assert mask.shape == exp.shape and (row[schema.HEIGHT], row[schema.WIDTH]) == exp.shape
        else:
            assert row["mask_png"] is None and exp.message.lower() in row[schema.ERROR].lower()
        if exp.label is not None:  # usable label: counts cover exactly its non-void pixels
            assert sum(row["confusion_raw"]) == int((exp.label != 255).sum())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0, "model_variant": "v", "model_digest": "d"},
        {"num_classes": 256, "model_variant": "v", "model_digest": "d"},
        {"num_classes": 21, "model_variant": "", "model_digest": "d"},
        {"num_classes": 21, "model_variant": "v", "model_digest": None},
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EncodeConfig(**kwargs)


def test_to_table_rejects_wrong_types() -> None:
    columns = encode_batch(_batch(), CFG)
    columns[schema.HEIGHT] = ["tall"] * 4
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        to_table(columns)
