"""Tests for pipeline/stages/dcnn.py: preprocessing, canonical padding, batch independence, DeepLabPredictor on a batch,
and its GPU behaviour with the GPU faked: device choice, pixel budget, out of memory, persistent device errors."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import schema
from pipeline.model.deeplab import build_model, upsample_logits
from pipeline.model.inference import logits_size, padded_size, predict_logits, predict_probs, preprocess
from pipeline.model.weights import VOC_CLASSES, save_checkpoint
from pipeline.stages import dcnn, devices
from pipeline.stages.dcnn import DCNNConfig, DeepLabPredictor
from pipeline.stages.devices import DeviceFault, resolve_device

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
            raise ValueError("bad pixel (simulated)")  # an image error, not a device error
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
    with pytest.raises(ValueError, match="max_batch_pixels must be >= 1 or None, got 0"):
        DCNNConfig(model_uri="m.pt", max_batch_pixels=0)


# --- GPU behaviour, with the GPU faked --------------------------------------------------------------------------


def test_device_follows_rays_gpu_assignment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def untouchable():
        raise AssertionError("a CPU-plan actor must not query CUDA")

    # A CPU-plan actor (no GPU ids) on a GPU node: CPU, and the GPUs hidden from this process before any CUDA call.
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", untouchable)
    assert resolve_device("auto") == torch.device("cpu")
    assert dcnn.os.environ["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(ValueError, match="Ray assigned this actor no GPU"):
        resolve_device("cuda")

    # Given a GPU: CUDA, or a start-up failure that names the cause.
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: [3])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match=r"Ray assigned GPUs \[3\] .* is a CPU-only build"):
        resolve_device("auto")
    monkeypatch.setattr(torch.version, "cuda", "12.8")

    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "init", no_driver)
    with pytest.raises(RuntimeError, match="CUDA 12.8.*sees no CUDA device.*Found no NVIDIA driver"):
        resolve_device("auto")

    # Outside Ray (driver, tests): auto = what torch sees.
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: None)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="dcnn.device is 'cuda'.*Found no NVIDIA driver"):
        resolve_device("cuda")


def test_ray_gpu_ids_is_none_outside_an_actor():
    assert devices._ray_gpu_ids() is None  # no Ray in this process, or a driver: not an actor's assignment


def test_gpu_actor_without_cuda_fails_at_start(checkpoint, monkeypatch):
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CPU-only build"):
        DeepLabPredictor(DCNNConfig(model_uri=checkpoint))


def test_bf16_rejected_on_a_gpu_without_it(checkpoint, monkeypatch):
    monkeypatch.setattr(dcnn, "resolve_device", lambda requested: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match="bf16 but Tesla T4 has no native bfloat16 .*7.5"):
        DeepLabPredictor(DCNNConfig(model_uri=checkpoint, autocast="bf16"))


def test_tf32_off_unless_allowed():
    conv = torch.backends.cudnn.conv
    before = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    try:
        dcnn._set_tf32(False)
        assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("ieee", "ieee")
        dcnn._set_tf32(True)
        assert conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


def test_timers_wait_for_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    devices._sync(torch.device("cpu"))
    assert calls == []
    devices._sync(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_warm_up_catches_a_broken_device(checkpoint, monkeypatch):
    from pipeline.model.deeplab import DeepLab

    def broken(self, x):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(DeepLab, "forward", broken)
    with pytest.raises(RuntimeError, match="warm-up forward on cpu failed.*no kernel image"):
        DeepLabPredictor(DCNNConfig(model_uri=checkpoint))


def test_batches_follow_a_pixel_budget():
    images = [make_image(500, 375, 0)] * 5 + [make_image(3001, 4001, 0)] * 2  # 513x513 and 3001x4001 padded
    groups = list(
        dcnn._groups(images, crop_size=513, min_input_size=None, batch_size=4, max_batch_pixels=3 * 513 * 513)
    )
    assert [(size, len(idx)) for size, idx in groups] == [
        ((513, 513), 3),
        ((513, 513), 2),
        ((3001, 4001), 1),  # larger than the budget: alone
        ((3001, 4001), 1),
    ]


def _fake_oom_forward(real_forward, max_pixels: int, calls: list):
    def forward(x):
        # Retries must run after the except block: while it is active its traceback pins the failed tensors.
        assert sys.exc_info() == (None, None, None), "retried inside an except block"
        calls.append(x.shape[0])
        if x.shape[0] * x.shape[2] * x.shape[3] > max_pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.70 GiB (simulated)")
        return real_forward(x)

    return forward


def test_out_of_memory_retries_smaller_and_rows_end_ok(checkpoint):
    pred = DeepLabPredictor(
        DCNNConfig(model_uri=checkpoint, batch_size=4, max_batch_pixels=None, min_input_size=1)
    )
    images = [make_image(33, 33, i) for i in range(4)]
    expected = predict_probs(pred.model, images, min_input_size=1)
    calls: list[int] = []
    pred.model.forward = _fake_oom_forward(pred.model.forward, 1 * 33 * 33, calls)
    out = pred(batch_of(images, ["ok"] * 4))
    assert list(out[schema.STATUS]) == ["ok"] * 4
    assert calls == [4, 2, 1, 1, 2, 1, 1]  # 4 -> 2 + 2 -> 1 + 1 each
    for row, probs in enumerate(expected):
        assert (out[schema.RAW_MASK][row] == probs.argmax(axis=0)).mean() > 0.999
    assert pred.max_batch_pixels == 33 * 33  # the actor keeps the budget that fitted
    calls.clear()
    assert list(pred(batch_of(images, ["ok"] * 4))[schema.STATUS]) == ["ok"] * 4
    assert calls == [1, 1, 1, 1]

    # One image that alone does not fit is that image's error; the others carry on.
    big = make_image(60, 60, 9)
    out = pred(batch_of([images[0], big], ["ok", "ok"]))
    assert list(out[schema.STATUS]) == ["ok", schema.ErrorKind.DCNN]
    assert out[schema.ERROR][1].startswith("out of memory for one 60x60 image (padded to 65x65) on cpu")
    # Out of memory is the device's state, not the image's: a re-run retries the row.
    assert list(out[schema.RETRYABLE]) == [False, True]


def _faulting_forward(message: str):
    def forward(x):
        raise RuntimeError(message)

    return forward


def test_persistent_device_error_restarts_instead_of_error_rows(checkpoint, monkeypatch, tmp_path):
    pred = DeepLabPredictor(DCNNConfig(model_uri=checkpoint, min_input_size=1))
    images = [make_image(24, 24, i) for i in range(2)]
    pred.model.forward = _faulting_forward("CUDA error: an illegal memory access was encountered")
    # Outside Ray: raised, no rows.
    with pytest.raises(DeviceFault, match="illegal memory access"):
        pred(batch_of(images, ["ok", "ok"]))

    # In a Ray actor: the process exits (Ray restarts the actor and retries the block), bounded per batch.
    exits: list[int] = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(dcnn, "_exit_process", fake_exit)
    monkeypatch.setattr(dcnn.tempfile, "gettempdir", lambda: str(tmp_path))
    pred.in_ray_actor = True
    batch = batch_of(images, ["ok", "ok"])
    for _ in range(dcnn.MAX_FAULT_RESTARTS - 1):
        with pytest.raises(Exited):
            pred(batch)
    assert exits == [1] * (dcnn.MAX_FAULT_RESTARTS - 1)
    with pytest.raises(DeviceFault):  # the same batch on a third fresh actor: a poison input, fail the job
        pred(batch)
    assert len(exits) == dcnn.MAX_FAULT_RESTARTS - 1

    # cuDNN failures count too, and so does an error that surfaces at the copy to the host (CUDA is async).
    pred.model.forward = _faulting_forward("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
    with pytest.raises(Exited):
        pred(batch_of(images[:1], ["ok"]))
    del pred.model.forward
    monkeypatch.setattr(
        pred,
        "_postprocess",
        lambda *a: (_ for _ in ()).throw(torch.AcceleratorError("CUDA error: unspecified launch failure")),
    )
    with pytest.raises(Exited):
        pred(batch_of(images[1:], ["ok"]))


def test_nonfinite_fp16_logits_redone_in_fp32(checkpoint):
    ref = DeepLabPredictor(DCNNConfig(model_uri=checkpoint, min_input_size=1))
    pred = DeepLabPredictor(DCNNConfig(model_uri=checkpoint, min_input_size=1, autocast="fp16"))
    images = [make_image(24, 24, i) for i in range(3)]
    real_forward = pred.model.forward
    autocast_calls = []

    def overflowing(x):
        out = real_forward(x)
        autocast_calls.append(torch.is_autocast_enabled("cpu"))
        if torch.is_autocast_enabled("cpu"):
            out = out.clone()
            out[min(1, out.shape[0] - 1), 0, 0, 0] = float("inf")  # image 1 of the batch overflows
        return out

    pred.model.forward = overflowing
    out = pred(batch_of(images, ["ok"] * 3))
    want = ref(batch_of(images, ["ok"] * 3))
    assert list(out[schema.STATUS]) == ["ok"] * 3
    assert autocast_calls == [True, False]  # one fp16 batch, then image 1 alone in float32
    assert np.isfinite(out[schema.LOGITS][1].astype(np.float32)).all()
    np.testing.assert_array_equal(out[schema.LOGITS][1], want[schema.LOGITS][1])  # exactly the float32 result
    assert (out[schema.RAW_MASK][1] == want[schema.RAW_MASK][1]).all()


class FaultOncePredictor(DeepLabPredictor):
    """The first actor to score a batch hits a persistent CUDA error; every later actor works."""

    def __init__(self, cfg: DCNNConfig, marker: str) -> None:
        self.marker = Path(marker)
        super().__init__(cfg)

    def _run(self, images, size, *, autocast=None):
        if not self.marker.exists() and size[0] > 33:  # not in the warm-up
            import os

            self.marker.write_text(str(os.getpid()))
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return super()._run(images, size, autocast=autocast)

    def __call__(self, batch):
        import os

        out = super().__call__(batch)
        out["pid"] = np.full(len(out[schema.ID]), os.getpid())
        return out


def test_device_fault_retries_the_block_on_a_fresh_actor(ray_local, checkpoint, tmp_path):
    """Real Ray Data: the faulting actor exits, Ray restarts it, the block is retried, every row ends ok once."""
    from ray import cloudpickle
    from ray.data import ActorPoolStrategy

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    marker = tmp_path / "faulted"
    rows = [
        {schema.ID: f"img{i}", schema.STATUS: "ok", schema.ERROR: None, schema.IMAGE: make_image(40, 40, i)}
        for i in range(6)
    ]
    ds = ray_local.data.from_items(rows, override_num_blocks=2).map_batches(
        FaultOncePredictor,
        fn_constructor_kwargs={
            "cfg": DCNNConfig(model_uri=checkpoint, min_input_size=1),
            "marker": str(marker),
        },
        batch_size=3,
        compute=ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    t0 = time.monotonic()
    try:
        out = ds.take_all()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert sorted(r[schema.ID] for r in out) == [f"img{i}" for i in range(6)]  # no row lost, none twice
    assert all(r[schema.STATUS] == "ok" for r in out), [r[schema.ERROR] for r in out]
    faulted_pid = int(marker.read_text())
    assert faulted_pid not in {int(r["pid"]) for r in out}  # nothing from the faulted process was kept
    assert time.monotonic() - t0 < 120


def _gpu_check():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_2(capsys):
    assert not torch.cuda.is_available()  # this machine: the CPU build of torch
    assert _gpu_check().main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no usable CUDA device (torch ")
    assert "CPU-only build" in lines[0]


def test_gpu_check_agreement_counts_pixels_and_failed_rows():
    gpu_check = _gpu_check()
    mask = np.zeros((4, 5), np.uint8)
    other = mask.copy()
    other[0, :2] = 3  # 2 of 20 pixels differ
    logits = np.zeros((2, 3, 3), np.float16)
    logits[0, 0, 0] = 10.0
    shifted = logits.copy()
    shifted[1, 2, 2] = 0.5
    ref = {schema.RAW_MASK: [mask, mask], schema.LOGITS: [logits, logits], schema.STATUS: ["ok", "ok"]}
    out = {
        schema.RAW_MASK: [other, np.zeros((0, 0), np.uint8)],
        schema.LOGITS: [shifted, np.zeros((0, 0, 0), np.float16)],
        schema.STATUS: ["ok", schema.ErrorKind.DCNN],
    }
    agree, rel, bad = gpu_check.compare(ref, out)
    assert agree == pytest.approx(18 / 40)  # a row without a mask counts as all pixels wrong
    assert rel == pytest.approx(0.05) and bad == 1
