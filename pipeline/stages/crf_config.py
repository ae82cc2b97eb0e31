"""The dense CRF's settings: ``CRFConfig`` (the paper's names and per-variant defaults) and the guard rails that
keep every value pydensecrf could crash on out of reach (zero / NaN / tiny sigmas, huge weights)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "NORMALIZATIONS", "UNARY_CLIP", "CRFConfig", "crf_config_for"]


# Same clipping as pydensecrf.utils.unary_from_softmax (clip=1e-5): -log(clip(p, 1e-5, 1)).
UNARY_CLIP = 1e-5

# libDenseCRF normalisation modes by name. "after" is what the authors' libDenseCRF does (per-pixel
# normalisation after filtering); "symmetric" is pydensecrf's own default.
NORMALIZATIONS = ("after", "symmetric", "before", "none")

# Where mean field runs: pydensecrf (the C++ library), numba (stages/crf_numba.py, the same model compiled here),
# torch (stages/crf_torch.py, any device).
BACKENDS = ("pydensecrf", "numba", "torch")

# Guard rails measured on pydensecrf2 1.1 (a process per case): sigma 0 or NaN segfaults; a bilateral rgb sigma
# of 1e-6 (features ~2.6e8) aborts with heap corruption, 1e-4 (features ~2.6e6) still runs. Features are
# coordinate / sigma, so we bound the largest feature, not the sigma alone (a big image makes big features).
_MIN_SIGMA = 1e-2
_MAX_FEATURE = 1e6
# float32 messages overflow to inf (then NaN) around 1e38; real weights are 1..10.
_MAX_WEIGHT = 1e4
_MAX_ITERATIONS = 1000
# Energy of padding labels: exp(-1e4) is exactly 0 in float32, so a dummy label carries no mass and the result
# equals the unpadded pruned CRF; it only makes the label count a multiple of 4.
_DUMMY_ENERGY = 1e4
_MAX_LABELS = 256  # labels are returned as uint8
# Adaptive mean field counts label changes from the 3rd iteration on: the first two move 70-10000 pixels of a
# 500x375 image on every one measured (never settled), so counting them would be wasted argmaxes.
_FIRST_COMPARED_ITERATION = 3


@dataclass(frozen=True)
class CRFConfig:
    """Dense CRF parameters (names as in the DeepLab code; weights are Potts compatibilities).

    bi_w, bi_xy_std, bi_rgb_std: bilateral kernel weight w1, spatial std s_a (pixels), colour std s_b (0..255).
    pos_w, pos_xy_std: Gaussian (smoothness) kernel weight w2 and spatial std s_g (pixels).
    iterations: mean-field iterations (paper: 10).
    normalization: kernel normalisation, one of NORMALIZATIONS; "after" (default) = official libDenseCRF
        per-pixel normalisation after filtering, "symmetric" = pydensecrf's default D^-1/2 K D^-1/2.
    prune_threshold: labels whose probability is below this at every pixel are dropped before inference;
        0 disables pruning. Default 0.2, measured on 12 DeepLab-like 500x375 21-class score maps (bench/crf.py):
        absent classes still peak at 0.11-0.16 where simulated boundaries blur, so 1e-3..0.05 keep 18-21 labels
        (1.3x); 0.1 keeps 3-12 (2.3x, 99.9985 % agreement with the full CRF), 0.2 keeps 3-7 (3.0x, 99.9975 %).
        A label that never reaches 0.2 is essentially never the CRF's argmax under Potts compatibility.
    prune_confident_prob, prune_argmax_frac: a label that reaches ``prune_threshold`` but never
        ``prune_confident_prob`` is dropped too when it is the raw argmax of at most ``prune_argmax_frac`` of the
        pixels (a faint label on a sliver, which the CRF would smooth away; at most that many pixels depend on
        it). Defaults 0.5 and 5e-4 (~94 pixels of 500x375): 5.3 -> 3.8 labels kept on the demo model's photos,
        99.994 % of pixels equal to the full CRF (docs/performance.md). ``prune_confident_prob: 0`` turns it off.
    pad_labels_to_multiple: pad the kept label set with inert dummy labels to a multiple of this (1 = no pad);
        pydensecrf and torch backends (numba pads to an even count itself).
    adaptive: stop an image's mean field before ``iterations`` once its labels have settled (pydensecrf, numba):
        after ``converge_patience`` consecutive iterations in each of which at most ``converge_changed_frac`` of
        the pixels changed label (argmax), capped at ``iterations``. False = the paper's fixed schedule, exactly
        ``iterations`` (bit for bit the stage before adaptive inference). Measured agreement with the fixed
        schedule and the cost saved: docs/performance.md ("CRF cost"), ``bench/crf.py``.
    converge_changed_frac: label changes per iteration, as a fraction of the image's pixels (0..0.01), that count
        as settled. 1e-4 is ~19 pixels of a 500x375 image. 0 = settled only when no label changed.
    converge_patience: consecutive settled iterations (1..iterations) before inference stops.
    backend: one of BACKENDS. "numba" (default): pipeline.stages.crf_numba, libDenseCRF's model and lattice
        compiled with numba, marginals within float rounding of pydensecrf's at 1.5-2x less CPU per image
        (docs/performance.md); an image whose lattice keys do not fit its packed fields runs pydensecrf.
        "pydensecrf": the C++ library itself. "torch" (pipeline.stages.crf_torch): the same model in PyTorch ops,
        any device (agreement with pydensecrf in docs/crf-backends.md).
    device: "cpu" (default) or "cuda": where the torch backend runs. "cuda" runs the CRF in the DCNN actor on its
        GPU (no CRF actors) and needs backend "torch"; that actor fails at start when torch sees no CUDA device.
    """

    bi_w: float = 4.0
    bi_xy_std: float = 121.0
    bi_rgb_std: float = 5.0
    pos_w: float = 3.0
    pos_xy_std: float = 3.0
    iterations: int = 10
    normalization: str = "after"
    prune_threshold: float = 0.2
    prune_confident_prob: float = 0.5
    prune_argmax_frac: float = 5e-4
    pad_labels_to_multiple: int = 4
    adaptive: bool = True
    converge_changed_frac: float = 1e-4
    converge_patience: int = 2
    backend: str = "numba"
    device: str = "cpu"

    def __post_init__(self) -> None:
        _validate_config(self)


def _validate_config(cfg: CRFConfig) -> None:
    """Every CRFConfig field in range (also re-run by refine: a frozen dataclass can still be forced)."""
    for name in ("bi_w", "pos_w"):
        _check_number(name, getattr(cfg, name), low=0.0, high=_MAX_WEIGHT, low_inclusive=False)
    for name in ("bi_xy_std", "bi_rgb_std", "pos_xy_std"):
        _check_number(name, getattr(cfg, name), low=_MIN_SIGMA, high=math.inf)
    if isinstance(cfg.iterations, bool) or not isinstance(cfg.iterations, int | np.integer):
        raise ValueError(f"iterations: expected an int, got {type(cfg.iterations).__name__}")
    if not 1 <= cfg.iterations <= _MAX_ITERATIONS:
        raise ValueError(f"iterations: expected 1..{_MAX_ITERATIONS}, got {cfg.iterations}")
    if cfg.normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {cfg.normalization!r}")
    _check_number("prune_threshold", cfg.prune_threshold, low=0.0, high=1.0, high_inclusive=False)
    _check_number("prune_confident_prob", cfg.prune_confident_prob, low=0.0, high=1.0)
    _check_number("prune_argmax_frac", cfg.prune_argmax_frac, low=0.0, high=0.01)
    m = cfg.pad_labels_to_multiple
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or not 1 <= m <= 64:
        raise ValueError(f"pad_labels_to_multiple: expected an int in 1..64, got {m!r}")
    _validate_adaptive(cfg)
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {cfg.backend!r}")
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {cfg.device!r}")
    # Whether CUDA is there is checked where the CRF runs (the DCNN actor), not here: the driver may have no GPU.
    if cfg.device == "cuda" and cfg.backend != "torch":
        raise ValueError(f"device: 'cuda' needs backend 'torch', got backend {cfg.backend!r}")


def _validate_adaptive(cfg: CRFConfig) -> None:
    if not isinstance(cfg.adaptive, bool | np.bool_):
        raise ValueError(f"adaptive: expected a bool, got {type(cfg.adaptive).__name__} {cfg.adaptive!r}")
    _check_number("converge_changed_frac", cfg.converge_changed_frac, low=0.0, high=0.01)
    k = cfg.converge_patience
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= _MAX_ITERATIONS:
        raise ValueError(f"converge_patience: expected an int in 1..{_MAX_ITERATIONS}, got {k!r}")


def _check_number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok_low = v >= low if low_inclusive else v > low
    ok_high = v <= high if high_inclusive else v < high
    if not (math.isfinite(v) and ok_low and ok_high):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{name}: expected a finite number in {lo}{low:g}, {high:g}{hi}, got {value!r}")


# Cross-validated bilateral parameters (reference section 3); pos_w = pos_xy_std = 3 everywhere.
_VARIANT_BILATERAL: dict[str, tuple[float, float, float]] = {
    "deeplab": (5.0, 50.0, 10.0),
    "deeplab-msc": (3.0, 95.0, 3.0),
    "deeplab-largefov": (4.0, 121.0, 5.0),
    "deeplab-msc-largefov": (4.0, 83.0, 5.0),  # one secondary source
    # Not published. Fallback (our choice): the DeepLab-LargeFOV values. 7x7 and 4x4 (dilation 8) have the same
    # 224-pixel receptive field as LargeFOV and the same single-scale stride-8 output, so their score maps are
    # about as coarse and need about as much boundary recovery. Override per run if cross-validated values exist.
    "deeplab-7x7": (4.0, 121.0, 5.0),
    "deeplab-4x4": (4.0, 121.0, 5.0),
}


def _canonical_variant(variant: str) -> str:
    key = variant.strip().lower().replace("_", "-")
    if not key.startswith("deeplab"):
        key = f"deeplab-{key}"
    return key


def crf_config_for(variant: str, **overrides: Any) -> CRFConfig:
    """The paper's CRF parameters for a model variant, with keyword overrides (any CRFConfig field).

    Variants: DeepLab, DeepLab-MSc, DeepLab-LargeFOV, DeepLab-MSc-LargeFOV, DeepLab-7x7, DeepLab-4x4
    (case-insensitive, "_" or "-", "deeplab-" prefix optional). 7x7 and 4x4 use the documented fallback.
    """
    if not isinstance(variant, str):
        raise ValueError(f"variant: expected a str, got {type(variant).__name__}")
    key = _canonical_variant(variant)
    if key not in _VARIANT_BILATERAL:
        raise ValueError(f"variant: expected one of {sorted(_VARIANT_BILATERAL)}, got {variant!r}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(CRFConfig)}
    if unknown:
        raise ValueError(
            f"overrides: expected CRFConfig fields {[f.name for f in dataclasses.fields(CRFConfig)]}, "
            f"got unknown {sorted(unknown)}"
        )
    bi_w, bi_xy_std, bi_rgb_std = _VARIANT_BILATERAL[key]
    params: dict[str, Any] = {"bi_w": bi_w, "bi_xy_std": bi_xy_std, "bi_rgb_std": bi_rgb_std}
    params.update(pos_w=3.0, pos_xy_std=3.0, iterations=10)
    params.update(overrides)
    return CRFConfig(**params)
