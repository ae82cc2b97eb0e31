"""Tests for pipeline/dcnn.py: preprocessing, canonical padding, batch independence, DeepLabPredictor on a batch."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pipeline import schema
from pipeline.dcnn import (
    DCNNConfig,
    DeepLabPredictor,
    logits_size,
    padded_size,
    predict_logits,
    predict_probs,
    preprocess,
)
from pipeline.model import build_model, upsample_logits
from pipeline.weights import VOC_CLASSES, save_checkpoint

torch.set_num_threads(1)

TINY = 1 / 16


def tiny(variant: str = "deeplab-largefov", **kw):
    torch.manual_seed(0)
    return build_model(variant, width=TINY, **kw).eval()


def make_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_preprocess_hand_computed():
    image = np.array([[[10, 20, 30], [255, 0, 128]]], dtype=np.uint8)  # 1x2 RGB
    image.setflags(write=False)
    x = preprocess([image], size=(2, 3))
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    expected = np.zeros((3, 2, 3), dtype=np.float32)
    # channel 0 = B = RGB[2] - 104.008, channel 1 = G - 116.669, channel 2 = R - 122.675; padding stays 0
    expected[:, 0, 0] = [30 - 104.008, 20 - 116.669, 10 - 122.675]
    expected[:, 0, 1] = [128 - 104.008, 0 - 116.669, 255 - 122.675]
    np.testing.assert_allclose(x[0].numpy(), expected, rtol=0, atol=1e-5)
    assert preprocess([image]).shape == (1, 3, 1, 2)  # default size = the largest image


def test_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match=r"expected an RGB uint8 \(H, W, 3\) image, got uint8 \(4, 4\)"):
        preprocess([np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match="float32"):
        preprocess([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="larger than the padded size"):
        preprocess([make_image(10, 10, 0)], size=(8, 10))


def test_padded_size_is_canonical():
    assert padded_size(100, 600, crop_size=513) == (513, 601)
    assert padded_size(513, 514, crop_size=513) == (513, 521)
    assert padded_size(100, 515, crop_size=514) == (514, 522)
    assert padded_size(40, 70, crop_size=513, min_input_size=1) == (41, 73)
    assert padded_size(40, 70, crop_size=514, min_input_size=1) == (42, 74)
    for n in range(1, 80):
        p = padded_size(n, n, crop_size=513, min_input_size=1)[0]
        assert p >= n and p % 8 == 1 and p - n < 8


def test_logits_size_covers_crop():
    assert logits_size(513, 513, offset=0) == (65, 65)
    assert logits_size(514, 514, offset=7) == (66, 66)  # 8 * 65 + 1 = 521 >= 7 + 514
    for n in range(1, 40):
        for offset in (0, 7):
            h = logits_size(n, n, offset=offset)[0]
            assert 8 * (h - 1) + 1 >= offset + n > 8 * (h - 2) + 1


@pytest.mark.parametrize("variant", ["deeplab-largefov", "deeplab", "deeplab-msc"])
def test_mixed_batch_matches_single_images(variant):
    model = tiny(variant, num_classes=4)
    images = [make_image(30, 50, 1), make_image(47, 21, 2), make_image(30, 50, 3), make_image(9, 70, 4)]
    kw = {"min_input_size": 1, "batch_size": 3}
    together = predict_probs(model, images, **kw)
    for image, probs in zip(images, together, strict=True):
        alone = predict_probs(model, [image], **kw)[0]
        assert probs.shape == (4, *image.shape[:2]) and probs.dtype == np.float32
        np.testing.assert_allclose(probs, alone, atol=1e-5)
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_predict_probs_is_the_caffe_pipeline():
    # A 200x300 image: padded to 513x513 (Caffe's crop), forward, x8 interp 65 -> 513, top-left crop, softmax.
    model = tiny("deeplab-largefov", num_classes=3)
    image = make_image(200, 300, 7)
    probs = predict_probs(model, [image])[0]
    x = torch.zeros(1, 3, 513, 513)
    bgr = image[:, :, ::-1].astype(np.float32) - np.array([104.008, 116.669, 122.675], np.float32)
    x[0, :, :200, :300] = torch.from_numpy(bgr.transpose(2, 0, 1).copy())
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (1, 3, 65, 65)
        up = torch.nn.functional.interpolate(logits, size=(513, 513), mode="bilinear", align_corners=True)
        expected = torch.softmax(up[0, :, :200, :300], dim=0).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_large_image_pads_beyond_crop_and_logits_are_cropped():
    model = tiny("deeplab", num_classes=2)
    image = make_image(520, 40, 5)
    logits = predict_logits(model, [image])[0]
    # padded to 522 x 514 -> but only the rows/cols the 7-offset crop needs are kept
    assert tuple(logits.shape) == (2, *logits_size(520, 40, offset=7))
    probs = predict_probs(model, [image])[0]
    assert probs.shape == (2, 520, 40)
    up = upsample_logits(logits, 520, 40, offset=7)
    np.testing.assert_allclose(probs, torch.softmax(up, 0).numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(
        tiny("deeplab-largefov", num_classes=4), str(path), class_names=list("abcd"), provenance={}
    )
    return str(path)


def batch_of(images, statuses, *, as_object=True):
    n = len(images)
    col = np.empty(n, dtype=object)
    for i, im in enumerate(images):
        col[i] = im
    return {
        schema.ID: np.array([f"img{i}" for i in range(n)]),
        schema.SOURCE: np.array([f"s3://b/img{i}.jpg" for i in range(n)]),
        schema.STATUS: np.array(statuses),  # a fixed-width '<U' array, as Ray hands strings over
        schema.ERROR: np.array([None if s == "ok" else "bad" for s in statuses], dtype=object),
        schema.IMAGE: col if as_object else np.stack(images),
    }


def test_predictor_on_a_hand_built_batch(checkpoint):
    cfg = DCNNConfig(
        model_uri=checkpoint, expected_variant="deeplab-largefov", batch_size=2, min_input_size=1
    )
    pred = DeepLabPredictor(cfg)
    assert pred.variant == "deeplab-largefov"
    with open(checkpoint, "rb") as f:
        assert pred.model_digest == hashlib.sha256(f.read()).hexdigest()

    images = [make_image(33, 45, 0), make_image(20, 20, 1), make_image(60, 17, 2), np.zeros((8, 8), np.uint8)]
    for im in images:
        im.setflags(write=False)  # Ray's zero-copy batches are read-only
    batch = batch_of(images, ["ok", "decode_error", "ok", "ok"])
    out = pred(batch)

    assert list(out[schema.STATUS]) == ["ok", "decode_error", "ok", schema.ErrorKind.DCNN]
    assert out[schema.ERROR][1] == "bad" and "RGB uint8" in out[schema.ERROR][3]
    assert out[schema.IMAGE] is batch[schema.IMAGE]  # pass-through for the CRF stage
    expected = predict_probs(pred.model, [images[0], images[2]], min_input_size=1)
    for row, probs in zip((0, 2), expected, strict=True):
        logits = out[schema.LOGITS][row]
        assert logits.dtype == np.float16 and logits.shape == (
            4,
            *logits_size(*images[row].shape[:2], offset=0),
        )
        mask = out[schema.RAW_MASK][row]
        assert mask.dtype == np.uint8 and mask.shape == images[row].shape[:2]
        assert (mask == probs.argmax(axis=0)).mean() > 0.999  # float ties aside
        up = upsample_logits(torch.from_numpy(logits), *images[row].shape[:2], offset=0)
        np.testing.assert_allclose(torch.softmax(up, 0).numpy(), probs, atol=2e-3)  # float16 hand-off
        assert out["dcnn_s"][row] > 0
    for row in (1, 3):
        assert out[schema.LOGITS][row].size == 0 and out[schema.RAW_MASK][row].size == 0
        assert out["dcnn_s"][row] == 0
    assert list(out[schema.UPSAMPLE_OFFSET]) == [0] * 4
    assert list(out["dcnn_node"]) == ["local"] * 4
    assert out[schema.LOGITS].dtype == object and out[schema.RAW_MASK].dtype == object
    assert all(im.flags.writeable is False for im in images)


def test_predictor_raw_mask_ties_take_the_first_class(tmp_path):
    model = tiny("deeplab-largefov", num_classes=4)
    with torch.no_grad():  # every pixel scores (0, 2, 2, 1): classes 1 and 2 tie exactly
        model.classifier.fc8.weight.zero_()
        model.classifier.fc8.bias.copy_(torch.tensor([0.0, 2.0, 2.0, 1.0]))
    path = str(tmp_path / "ties.pt")
    save_checkpoint(model, path, class_names=list("abcd"), provenance={})
    out = DeepLabPredictor(DCNNConfig(model_uri=path, min_input_size=1))(
        batch_of([make_image(30, 41, 0)], ["ok"])
    )
    assert out[schema.RAW_MASK][0].shape == (30, 41)
    assert (out[schema.RAW_MASK][0] == 1).all()  # as numpy's and torch's argmax: the first of equal maxima


def test_predictor_regular_ndarray_column_and_isolated_failure(checkpoint):
    pred = DeepLabPredictor(DCNNConfig(model_uri=checkpoint, batch_size=4, min_input_size=1))
    images = [make_image(24, 24, i) for i in range(3)]
    stacked = batch_of(images, ["ok"] * 3, as_object=False)
    stacked[schema.IMAGE].setflags(write=False)
    out = pred(stacked)
    assert list(out[schema.STATUS]) == ["ok"] * 3
    assert all(m.shape == (24, 24) for m in out[schema.RAW_MASK])

    # a forward failure that hits only one image: the others still get results
    real_forward = pred.model.forward
    poisoned = images[1][0, 0].copy()

    def flaky(x):
        bgr = torch.tensor(poisoned[::-1].astype(np.float32)) - torch.tensor([104.008, 116.669, 122.675])
        if any(torch.allclose(x[i, :, 0, 0], bgr) for i in range(x.shape[0])):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_forward(x)

    pred.model.forward = flaky
    out = pred(batch_of(images, ["ok"] * 3))
    assert list(out[schema.STATUS]) == ["ok", schema.ErrorKind.DCNN, "ok"]
    assert "simulated" in out[schema.ERROR][1]
    assert out[schema.RAW_MASK][0].shape == (24, 24) and out[schema.RAW_MASK][1].size == 0


def test_predictor_rejects_wrong_variant(checkpoint):
    with pytest.raises(ValueError, match="holds variant 'deeplab-largefov', expected 'deeplab-msc'"):
        DeepLabPredictor(DCNNConfig(model_uri=checkpoint, expected_variant="deeplab-msc"))


def test_predictor_loads_from_s3(checkpoint, bucket, storage_cfg):
    from pipeline import storage

    uri = f"{bucket}/m.pt"
    with open(checkpoint, "rb") as f:
        storage.write_bytes(uri, f.read(), storage_cfg)
    pred = DeepLabPredictor(DCNNConfig(model_uri=uri, min_input_size=1), storage_cfg)
    out = pred(batch_of([make_image(16, 16, 0)], ["ok"]))
    assert out[schema.STATUS][0] == "ok" and out[schema.RAW_MASK][0].shape == (16, 16)


def test_config_validation():
    with pytest.raises(ValueError, match="dcnn.device must be auto, cpu or cuda, got 'tpu'"):
        DCNNConfig(model_uri="m.pt", device="tpu")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        DCNNConfig(model_uri="m.pt", batch_size=0)
    with pytest.raises(ValueError, match="autocast"):
        DCNNConfig(model_uri="m.pt", autocast="int8")
    assert len(VOC_CLASSES) == 21
