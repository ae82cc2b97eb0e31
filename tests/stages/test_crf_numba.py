"""The numba mean field (pipeline/stages/crf_numba.py) against pydensecrf, the library it re-implements."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from pydensecrf.utils import unary_from_softmax

from pipeline.demo.scenes import make_scene, simulate_scores
from pipeline.stages import crf_numba
from pipeline.stages.crf import crf_config_for, refine_detailed

NUM_CLASSES = 6
_FLAGS = {
    "after": dcrf.NORMALIZE_AFTER,
    "symmetric": dcrf.NORMALIZE_SYMMETRIC,
    "before": dcrf.NORMALIZE_BEFORE,
    "none": dcrf.NO_NORMALIZATION,
}


def _scene(
    height: int, width: int, seed: int, num_classes: int = NUM_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    image, label = make_scene(height, width, seed=seed, num_classes=num_classes)
    return image, simulate_scores(label, num_classes, seed=seed)


def _library(image: np.ndarray, probs: np.ndarray, normalization: str, iterations: int = 10) -> np.ndarray:
    """pydensecrf with the paper's LargeFOV parameters: Q (C, H*W)."""
    num_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3.0, compat=3.0, normalization=_FLAGS[normalization])
    crf.addPairwiseBilateral(
        sxy=121.0, srgb=5.0, rgbim=image, compat=4.0, normalization=_FLAGS[normalization]
    )
    return np.array(crf.inference(iterations))


def _numba(image: np.ndarray, probs: np.ndarray, normalization: str, iterations: int = 10, settle=None):
    unary = np.ascontiguousarray(unary_from_softmax(probs))
    return crf_numba.mean_field_numba(
        image,
        unary,
        pos=(3.0, 3.0),
        bilateral=(4.0, 121.0, 5.0),
        normalization=normalization,
        iterations=iterations,
        num_active=probs.shape[0],
        settle=settle,
    )


@pytest.mark.parametrize("normalization", ["after", "symmetric", "before"])
@pytest.mark.parametrize("num_labels", [2, 3, 4, 5, 6, 21])
def test_marginals_equal_pydensecrf_within_float_rounding(normalization, num_labels):
    """Every normalisation and label count (blocks of 4 and 2, odd counts padded): Q within 1e-4 of the library's."""
    image, probs = _scene(60, 80, seed=num_labels, num_classes=num_labels)
    expected = _library(image, probs, normalization)
    q, iterations = _numba(image, probs, normalization)
    assert iterations == 10
    assert q.shape == expected.shape
    assert np.abs(q - expected).max() < 1e-4
    assert np.array_equal(q.argmax(axis=0), expected.argmax(axis=0))
    assert np.allclose(q.sum(axis=0), 1.0, atol=1e-5)


def test_no_normalization_keeps_the_labels_of_pydensecrf():
    """Unnormalised messages are large, so rounding moves Q more (~1e-3) but the labels stay the library's."""
    image, probs = _scene(60, 80, seed=7)
    expected = _library(image, probs, "none")
    q, _ = _numba(image, probs, "none")
    assert np.abs(q - expected).max() < 1e-2
    assert np.array_equal(q.argmax(axis=0), expected.argmax(axis=0))


def test_one_iteration_on_a_real_size_photo_like_image():
    """500x375 with noise in every pixel (a bilateral lattice of tens of thousands of vertices): one update equal."""
    rng = np.random.default_rng(1)
    image, probs = _scene(375, 500, seed=11)
    image = np.clip(image.astype(np.int16) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    expected = _library(image, probs, "after", iterations=1)
    q, _ = _numba(image, probs, "after", iterations=1)
    assert np.abs(q - expected).max() < 1e-4


def test_padding_rows_get_zero_and_do_not_change_the_kept_labels():
    image, probs = _scene(48, 64, seed=2, num_classes=3)
    unary = np.full((8, 48 * 64), 1e4, np.float32)
    unary[:3] = unary_from_softmax(probs)
    q, _ = crf_numba.mean_field_numba(
        image, unary, pos=(3.0, 3.0), bilateral=(4.0, 121.0, 5.0), normalization="after",
        iterations=10, num_active=3, settle=None,
    )  # fmt: skip
    assert q.shape == (8, 48 * 64)
    assert not q[3:].any()
    assert np.abs(q[:3] - _library(image, probs, "after")).max() < 1e-4


def test_settled_labels_stop_inference_early():
    """An easy image settles: with a budget of 0 changed pixels and patience 2 it stops before the cap, and its
    labels equal the full schedule's."""
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, 40:] = (200, 40, 40)
    probs = np.full((2, 60, 80), 0.1, np.float32)
    probs[0, :, :40] = probs[1, :, 40:] = 0.9
    full, _ = _numba(image, probs, "after")
    early, iterations = _numba(image, probs, "after", settle=(0.0, 2, 3))
    assert iterations == 4  # iterations 3 and 4 each changed no label
    assert np.array_equal(early.argmax(axis=0), full.argmax(axis=0))


def test_keys_that_do_not_pack_return_none():
    """A colour sigma of 1e-2 puts bilateral features at ~2.6e4: beyond the packed key fields, so no result."""
    image, probs = _scene(20, 30, seed=4)
    unary = np.ascontiguousarray(unary_from_softmax(probs))
    out = crf_numba.mean_field_numba(
        image, unary, pos=(3.0, 3.0), bilateral=(4.0, 121.0, 0.01), normalization="after",
        iterations=2, num_active=probs.shape[0], settle=None,
    )  # fmt: skip
    assert out is None


def test_refine_falls_back_to_pydensecrf_where_keys_do_not_pack():
    image, probs = _scene(20, 30, seed=4)
    cfg = crf_config_for(
        "deeplab-largefov", bi_rgb_std=0.01, prune_threshold=0.0, adaptive=False, pad_labels_to_multiple=1
    )
    assert cfg.backend == "numba"
    numba = refine_detailed(image, probs, cfg, return_probs=True)
    library = refine_detailed(image, probs, dataclasses.replace(cfg, backend="pydensecrf"), return_probs=True)
    assert np.array_equal(numba.probs, library.probs)  # the library's own result, bit for bit


def test_the_gaussian_lattice_is_built_once_per_image_size():
    crf_numba._gaussian_lattice.cache_clear()
    for seed in range(3):
        image, probs = _scene(30, 40, seed=seed)
        _numba(image, probs, "after", iterations=1)
    image, probs = _scene(32, 40, seed=0)
    _numba(image, probs, "after", iterations=1)
    info = crf_numba._gaussian_lattice.cache_info()
    assert (info.hits, info.misses) == (2, 2)


def test_refine_with_the_default_backend_equals_pydensecrf_on_a_scene():
    """The stage as configured by default (numba, pruning, adaptive) vs the same stage on pydensecrf."""
    image, probs = _scene(120, 160, seed=9, num_classes=21)
    cfg = crf_config_for("deeplab-largefov")
    a = refine_detailed(image, probs, cfg, return_probs=True)
    b = refine_detailed(image, probs, dataclasses.replace(cfg, backend="pydensecrf"), return_probs=True)
    assert a.labels_kept == b.labels_kept
    assert a.iterations == b.iterations
    assert np.array_equal(a.labels, b.labels)
    assert np.abs(a.probs - b.probs).max() < 1e-4
