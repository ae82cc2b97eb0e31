"""CRF torch backend (pipeline/stages/crf_torch.py): agreement with direct pydensecrf at the paper's parameters, the lattice,
determinism on the CPU, crf.device checks, and the CRF inside DeepLabPredictor."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from PIL import Image
from pydensecrf.utils import unary_from_softmax

from pipeline import schema as S
from pipeline.demo.scenes import make_scene, simulate_scores
from pipeline.stages.crf import CRFConfig, CRFRefiner, crf_config_for, refine, unary_from_probs
from pipeline.stages.crf_torch import (
    PermutohedralLattice,
    check_crf_device,
    crf_features,
    refine_probs,
    refine_probs_batch,
    run_dense_crf_torch,
)

torch.set_num_threads(1)

PIXEL_BAR = 0.999  # share of pixels with pydensecrf's label
MIOU_BAR = 0.001  # mean IoU within 0.1 points


def _direct_pydensecrf(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    """The textbook pydensecrf call: all labels, unary_from_softmax, the config's normalisation. -> labels (H, W)."""
    norm = {"after": dcrf.NORMALIZE_AFTER, "symmetric": dcrf.NORMALIZE_SYMMETRIC}[cfg.normalization]
    num_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=cfg.pos_w, normalization=norm)
    crf.addPairwiseBilateral(
        sxy=cfg.bi_xy_std, srgb=cfg.bi_rgb_std, rgbim=image, compat=cfg.bi_w, normalization=norm
    )
    return np.array(crf.inference(cfg.iterations)).argmax(axis=0).reshape(height, width)


def _miou(pred: np.ndarray, label: np.ndarray, num_labels: int) -> float:
    valid = label < num_labels
    conf = np.bincount(
        label[valid].astype(np.int64) * num_labels + pred[valid], minlength=num_labels**2
    ).reshape(num_labels, num_labels)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return float((tp[union > 0] / union[union > 0]).mean())


def _assert_agrees(image: np.ndarray, label: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> None:
    """Torch backend (no pruning, as the direct call) vs direct pydensecrf: pixels and mean IoU."""
    expected = _direct_pydensecrf(image, probs, cfg)
    torch_cfg = dataclasses.replace(cfg, backend="torch", prune_threshold=0.0, pad_labels_to_multiple=1)
    got = refine(image, probs, torch_cfg)
    agree = float((got == expected).mean())
    num_labels = probs.shape[0]
    gap = abs(_miou(got, label, num_labels) - _miou(expected, label, num_labels))
    assert agree >= PIXEL_BAR and gap <= MIOU_BAR, (agree, gap)


# --- inputs made in code -----------------------------------------------------------------------------------------


def _natural_image(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like image and its labels: smooth sky/ground gradients, soft-edged shapes with shading, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * (0.45 + 0.1 * np.sin(xx / width * 3 + seed))
    sky = np.stack([0.45 + 0.3 * yy / height, 0.6 + 0.2 * yy / height, 0.9 - 0.1 * xx / width], axis=-1)
    ground = np.stack([0.35 + 0.2 * xx / width, 0.3 + 0.1 * yy / height, 0.15 + 0.05 * xx / width], axis=-1)
    below = (yy > horizon)[..., None]
    img = np.where(below, ground, sky)
    label = np.where(below[..., 0], 1, 0).astype(np.uint8)
    for k in range(6):
        cy, cx = rng.uniform(0.2, 0.9) * height, rng.uniform(0.1, 0.9) * width
        ry, rx = rng.uniform(0.08, 0.2) * height, rng.uniform(0.06, 0.18) * width
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        alpha = np.clip((1.0 - r) * 8.0, 0.0, 1.0)[..., None]  # a 1-2 px soft edge, as a lens gives
        colour = rng.uniform(0.1, 0.95, 3) * (1.0 - 0.35 * (yy - cy)[..., None] / (2 * ry))  # shading
        img = img * (1 - alpha) + colour * alpha
        label[alpha[..., 0] > 0.5] = 2 + k
    img = img + rng.normal(0.0, 0.025, img.shape)  # sensor noise
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), label


def _photo_labels(image: np.ndarray, num_labels: int, seed: int) -> np.ndarray:
    """Pseudo ground truth for a real photo: k-means colour clusters (8), spread over num_labels label ids."""
    rng = np.random.default_rng(seed)
    pixels = image.reshape(-1, 3).astype(np.float32)
    centres = pixels[rng.choice(len(pixels), 8, replace=False)]
    for _ in range(8):
        assign = ((pixels[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        for c in range(8):
            if (assign == c).any():
                centres[c] = pixels[assign == c].mean(0)
    ids = (np.arange(8) * 5) % num_labels
    return ids[assign].astype(np.uint8).reshape(image.shape[:2])


def _grace_hopper(height: int, width: int) -> np.ndarray:
    """A real photo shipped with matplotlib (a project dependency), resized to (height, width)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((width, height), Image.BILINEAR)).copy()


# --- agreement with direct pydensecrf ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_labels", [6, 21])
@pytest.mark.parametrize("variant", ["deeplab", "deeplab-msc", "deeplab-largefov", "deeplab-msc-largefov"])
def test_agrees_with_pydensecrf_on_scenes_at_the_paper_parameters(variant, num_labels):
    image, label = make_scene(120, 160, seed=11, num_classes=num_labels)
    probs = simulate_scores(label, num_labels, seed=11)
    _assert_agrees(image, label, probs, crf_config_for(variant))


@pytest.mark.parametrize("num_labels", [6, 21])
def test_agrees_with_pydensecrf_under_symmetric_normalisation(num_labels):
    image, label = make_scene(120, 160, seed=5, num_classes=num_labels)
    probs = simulate_scores(label, num_labels, seed=5)
    _assert_agrees(image, label, probs, crf_config_for("deeplab-largefov", normalization="symmetric"))


def test_agrees_with_pydensecrf_on_a_natural_looking_image_at_voc_size():
    image, label = _natural_image(375, 500, seed=2)
    probs = simulate_scores(label, 21, seed=2)
    _assert_agrees(image, label, probs, crf_config_for("deeplab-largefov"))


@pytest.mark.parametrize(("num_labels", "variant"), [(6, "deeplab-msc"), (21, "deeplab-largefov")])
def test_agrees_with_pydensecrf_on_a_real_photo(num_labels, variant):
    image = _grace_hopper(240, 210)
    label = _photo_labels(image, num_labels, seed=0)
    probs = simulate_scores(label, num_labels, seed=3)
    _assert_agrees(image, label, probs, crf_config_for(variant))


def test_marginals_match_pydensecrf_closely_in_every_normalisation():
    """Not only the argmax: the marginals themselves agree to float rounding (the lattice is the same)."""
    image, label = make_scene(40, 56, seed=1, num_classes=6)
    probs = simulate_scores(label, 6, seed=1)
    unary = unary_from_probs(probs)
    for name, flag in [
        ("after", dcrf.NORMALIZE_AFTER),
        ("symmetric", dcrf.NORMALIZE_SYMMETRIC),
        ("before", dcrf.NORMALIZE_BEFORE),
        ("none", dcrf.NO_NORMALIZATION),
    ]:
        cfg = crf_config_for("deeplab-largefov", normalization=name, iterations=3)
        crf = dcrf.DenseCRF2D(56, 40, 6)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=cfg.pos_w, normalization=flag)
        crf.addPairwiseBilateral(
            sxy=cfg.bi_xy_std, srgb=cfg.bi_rgb_std, rgbim=image, compat=cfg.bi_w, normalization=flag
        )
        expected = np.array(crf.inference(cfg.iterations))
        np.testing.assert_allclose(run_dense_crf_torch(image, unary, cfg), expected, atol=2e-5, err_msg=name)


def test_pruned_torch_refine_agrees_with_pruned_pydensecrf_refine():
    """The stage's defaults (pruning, padding) on both backends; padding rows are skipped by the torch backend."""
    image, label = make_scene(120, 160, seed=21, num_classes=21)
    probs = simulate_scores(label, 21, seed=21)
    cfg = crf_config_for("deeplab-largefov")
    expected = refine(image, probs, cfg)
    got = refine(image, probs, dataclasses.replace(cfg, backend="torch"))
    assert (got == expected).mean() >= PIXEL_BAR


# --- the lattice ---------------------------------------------------------------------------------------------------


def test_lattice_blur_of_a_constant_is_flat_inside_and_smaller_at_the_border():
    """K 1 (what "after" divides by): equal for interior pixels of a flat image, lower where the kernel leaves it."""
    image = torch.full((30, 40, 3), 100, dtype=torch.uint8)
    gaussian, _ = crf_features(image, crf_config_for("deeplab"))
    lattice = PermutohedralLattice(gaussian)
    ones = lattice.compute(torch.ones(30 * 40, 1))[:, 0].reshape(30, 40)
    interior = ones[10:20, 10:30]
    # Along the lattice the filter is not shift-invariant to the pixel: interior values vary a little.
    assert float(interior.std() / interior.mean()) < 0.05
    assert float(ones[0, 0]) < 0.6 * float(interior.mean())
    assert lattice.num_vertices < 30 * 40 * 3  # neighbouring pixels share vertices


def test_lattice_separates_points_far_apart_in_feature_space():
    """Two clusters 100 sigmas apart: filtering one cluster's values never reaches the other."""
    features = torch.cat((torch.zeros(50, 5), torch.full((50, 5), 100.0))) + torch.rand(100, 5) * 0.1
    lattice = PermutohedralLattice(features)
    values = torch.cat((torch.ones(50, 1), torch.zeros(50, 1)))
    out = lattice.compute(values)[:, 0]
    assert float(out[:50].min()) > 0 and float(out[50:].abs().max()) == 0.0


def test_lattice_rejects_features_beyond_an_int64_key():
    with pytest.raises(ValueError, match="key space"):
        PermutohedralLattice(torch.tensor([[0.0] * 5, [1e5] * 5]))
    with pytest.raises(ValueError, match="finite values within"):
        PermutohedralLattice(torch.tensor([[0.0] * 5, [1e15] * 5]))
    with pytest.raises(ValueError, match="finite values within"):
        PermutohedralLattice(torch.tensor([[0.0, float("nan")]]))


# --- determinism and devices ---------------------------------------------------------------------------------------


def test_deterministic_on_cpu():
    image, label = make_scene(64, 80, seed=4, num_classes=21)
    probs = simulate_scores(label, 21, seed=4)
    cfg = crf_config_for("deeplab-largefov", backend="torch", prune_threshold=0.0)
    unary = unary_from_probs(probs)
    first = run_dense_crf_torch(image, unary, cfg)
    torch.set_num_threads(2)  # another thread split gives the same bits
    try:
        second = run_dense_crf_torch(image, unary, cfg)
    finally:
        torch.set_num_threads(1)
    assert np.array_equal(first, second)


def test_crf_device_cuda_without_cuda_fails_at_construction_in_one_line(monkeypatch, tiny_checkpoint):
    """The DCNN actor that would run the CRF fails at construction; the config itself stays valid on a driver
    without a GPU (a cluster's head), where CUDA is not needed."""
    from pipeline.stages.dcnn import DCNNConfig, DeepLabPredictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    crf_cfg = CRFConfig(backend="torch", device="cuda")
    with pytest.raises(RuntimeError) as err:
        DeepLabPredictor(DCNNConfig(model_uri=tiny_checkpoint), crf_cfg=crf_cfg)
    message = str(err.value)
    assert "\n" not in message and "crf.device is 'cuda'" in message and "sees no CUDA device" in message
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        check_crf_device("cuda")
    assert check_crf_device("cpu") == torch.device("cpu")


def test_crf_device_and_backend_are_checked():
    with pytest.raises(ValueError, match="backend: expected"):
        CRFConfig(backend="opencv")
    with pytest.raises(ValueError, match="device: expected"):
        CRFConfig(backend="torch", device="tpu")
    with pytest.raises(ValueError, match="needs backend 'torch'"):
        CRFConfig(device="cuda")
    assert CRFConfig(backend="torch").device == "cpu"


def test_pruning_on_the_device_keeps_the_labels_crf_refine_keeps():
    """The DCNN actor prunes on the GPU (crf_torch._kept); crf.refine prunes on the host: same labels, on scenes
    and on a photo whose colour-region labels leave faint labels (the prune_confident_prob / argmax-area rule)."""
    from pipeline.stages.crf import _kept_labels
    from pipeline.stages.crf_torch import _kept

    cases = [simulate_scores(make_scene(96, 128, seed=s, num_classes=21)[1], 21, seed=s) for s in (70, 71)]
    cases.append(simulate_scores(_photo_labels(_grace_hopper(240, 210), 21, seed=0), 21, seed=3))
    faint_rule_fired = False
    for probs in cases:
        for cfg in (crf_config_for("deeplab-largefov"), crf_config_for("deeplab", prune_threshold=0.05)):
            expected = _kept_labels(probs, cfg)
            got = torch.nonzero(_kept(torch.from_numpy(probs).reshape(21, -1), cfg)).flatten().numpy()
            assert np.array_equal(got, expected)
            loose = dataclasses.replace(cfg, prune_confident_prob=0.0)
            faint_rule_fired |= len(_kept_labels(probs, loose)) > len(expected)
    assert faint_rule_fired  # the cases exercise the second rule, not only the threshold


def test_refine_probs_on_tensors_equals_refine():
    """The DCNN actor's entry (tensors on its device, no host copy) gives refine's labels, pruning included."""
    image, label = make_scene(72, 96, seed=8, num_classes=21)
    probs = simulate_scores(label, 21, seed=8)
    cfg = crf_config_for("deeplab-largefov", backend="torch")
    expected = refine(image, probs, cfg)
    got = refine_probs(image, torch.from_numpy(probs), cfg)
    assert got.dtype == np.uint8 and (got == expected).mean() >= 0.9999
    with pytest.raises(ValueError, match="finite"):
        refine_probs(image, torch.full((21, 72, 96), float("nan")), cfg)


def test_a_batch_gives_each_image_its_own_crf():
    """Images refined together (one lattice, the image in each vertex key) get the labels they get alone: exactly
    without pruning; with pruning each image's dropped labels are inert in the batch's label union."""
    shapes = [(40, 56), (48, 40), (40, 56)]
    images, probs = [], []
    for i, (h, w) in enumerate(shapes):
        image, label = make_scene(h, w, seed=60 + i, num_classes=21)
        images.append(image)
        probs.append(torch.from_numpy(simulate_scores(label, 21, seed=60 + i)))
    images[2] = images[0].copy()  # the same pixels as image 0: still its own CRF, not merged with it
    for threshold, bar in ((0.0, 1.0), (0.2, 0.9999)):
        cfg = crf_config_for("deeplab-largefov", backend="torch", prune_threshold=threshold)
        together = refine_probs_batch(images, probs, cfg)
        for image, prob, got in zip(images, probs, together, strict=True):
            alone = refine_probs(image, prob, cfg)
            assert got.shape == image.shape[:2] and (got == alone).mean() >= bar, threshold
    assert np.array_equal(together[0], refine_probs(images[0], probs[0], cfg))


# --- the CRF in the DCNN actor -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    from pipeline.model.deeplab import build_model
    from pipeline.model.weights import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    model = build_model("deeplab-largefov", width=1 / 16, num_classes=4).eval()
    save_checkpoint(model, str(path), class_names=list("abcd"), provenance={})
    return str(path)


def test_predictor_with_a_crf_config_emits_the_crf_stages_columns(tiny_checkpoint):
    from pipeline.stages.dcnn import DCNNConfig, DeepLabPredictor

    dcnn_cfg = DCNNConfig(model_uri=tiny_checkpoint, device="cpu", min_input_size=1)
    crf_cfg = crf_config_for("deeplab-largefov", backend="torch")  # the stage's pruning on both paths

    images = np.empty(3, dtype=object)
    for i in range(3):
        images[i] = make_scene(40 + 8 * i, 56, seed=30 + i, num_classes=4)[0]
    batch = {
        S.ID: np.array(["a", "b", "c"], dtype=object),
        S.STATUS: np.array(["ok", "decode_error", "ok"], dtype=object),
        S.ERROR: np.array([None, "bad", None], dtype=object),
        S.IMAGE: images,
    }
    plain = DeepLabPredictor(dcnn_cfg)(dict(batch))
    staged = CRFRefiner(crf_cfg)(plain)  # the separate CRF stage on the same rows
    fused = DeepLabPredictor(dcnn_cfg, crf_cfg=crf_cfg)(dict(batch))

    assert S.LOGITS not in fused and S.IMAGE not in fused
    assert list(fused[S.STATUS]) == list(staged[S.STATUS]) == ["ok", "decode_error", "ok"]
    for i in (0, 2):
        assert np.array_equal(fused[S.MASK][i], staged[S.MASK][i])
        assert fused["crf_s"][i] > 0
    assert fused[S.MASK][1].size == 0 and fused["crf_s"][1] == 0
    assert list(fused["crf_node"]) == ["local"] * 3
    assert np.array_equal(fused[S.RAW_MASK][0], plain[S.RAW_MASK][0])


def test_predictor_crf_failure_fails_only_its_row(tiny_checkpoint, monkeypatch):
    """A sub-batch whose joint CRF fails is redone row by row: only the failing row becomes crf_error."""
    from pipeline.stages import crf_torch
    from pipeline.stages.dcnn import DCNNConfig, DeepLabPredictor

    real = crf_torch.refine_probs_batch

    def fussy(images, probs, cfg):  # rejects a flat grey image, as a real failure would be rejected
        if any((np.asarray(im) == 7).all() for im in images):
            raise ValueError("grey image")
        return real(images, probs, cfg)

    monkeypatch.setattr(crf_torch, "refine_probs_batch", fussy)
    crf_cfg = crf_config_for("deeplab-largefov", backend="torch")
    pred = DeepLabPredictor(
        DCNNConfig(model_uri=tiny_checkpoint, device="cpu", batch_size=4), crf_cfg=crf_cfg
    )
    images = np.empty(3, dtype=object)
    for i in range(3):
        images[i] = make_scene(40, 56, seed=40 + i, num_classes=4)[0]
    images[1] = np.full((40, 56, 3), 7, np.uint8)
    out = pred(
        {S.ID: np.array(["a", "b", "c"], dtype=object), S.STATUS: np.array(["ok"] * 3, dtype=object),
         S.IMAGE: images}
    )  # fmt: skip
    assert list(out[S.STATUS]) == ["ok", S.ErrorKind.CRF, "ok"]
    assert "grey image" in out[S.ERROR][1] and not out[S.RETRYABLE][1]
    assert out[S.MASK][0].shape == (40, 56) and out[S.MASK][1].size == 0 and out[S.MASK][2].shape == (40, 56)


def test_predictor_refuses_a_cuda_crf_on_a_cpu_dcnn(tiny_checkpoint, monkeypatch):
    from pipeline.stages import crf_torch
    from pipeline.stages.dcnn import DCNNConfig, DeepLabPredictor

    monkeypatch.setattr(crf_torch, "check_crf_device", lambda device: torch.device("cuda", 0))  # pretend CUDA
    crf_cfg = CRFConfig(backend="torch", device="cuda")
    with pytest.raises(ValueError, match="crf.device is 'cuda' but this DCNN actor runs on cpu"):
        DeepLabPredictor(DCNNConfig(model_uri=tiny_checkpoint, device="cpu"), crf_cfg=crf_cfg)
