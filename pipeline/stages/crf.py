"""CRF stage (after dcnn, before encode): fully connected CRF refinement of upsampled DCNN scores (pydensecrf).

Model (DeepLab v1, reference section 3): unary -log P from the DCNN softmax, Potts pairwise with a bilateral
(appearance) and a Gaussian (smoothness) kernel, mean-field inference.

Speed: the stage drops labels whose probability is below ``prune_threshold`` at every pixel before inference
(with Potts compatibility a label that unlikely everywhere practically never becomes the argmax; see the
shared CRF notes), and labels that pass it but are faint and the raw argmax of a sliver only; pads the kept set
to a multiple of 4 with inert dummy labels (pydensecrf's lattice is fastest on SSE packets of 4), and maps the
labels back. Mean field stops once an image's labels have settled (``adaptive``; ``adaptive: false`` runs the
paper's fixed schedule). Agreement with the full 21-label, 10-iteration CRF is measured in
``tests/stages/test_crf.py`` and ``bench/crf.py``, not assumed (docs/performance.md, "CRF cost").

Safety: pydensecrf segfaults or aborts on zero / NaN / tiny sigmas and silently returns NaN for non-finite
unaries, so everything is validated here, in Python, before the C++ call, and bad input raises ``ValueError``.
pydensecrf holds the GIL for the whole inference, so one CRF runs at a time per process (run the stage in
CPU actors, i.e. processes, for parallelism).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.model.variants import OUTPUT_STRIDE, upsampled_size
from pipeline.schema import (
    ERROR,
    ID,
    IMAGE,
    LOGITS,
    MASK,
    OK,
    RETRYABLE,
    STATUS,
    UPSAMPLE_OFFSET,
    ErrorKind,
    clean_text_columns,
    object_column,
    retryable_flags,
)
from pipeline.stages.crf_config import (
    _DUMMY_ENERGY,
    _FIRST_COMPARED_ITERATION,
    _MAX_FEATURE,
    _MAX_LABELS,
    NORMALIZATIONS,
    UNARY_CLIP,
    CRFConfig,
    _validate_config,
    crf_config_for,
)

__all__ = [
    "NORMALIZATIONS",
    "UNARY_CLIP",
    "CRFConfig",
    "crf_config_for",
    "unary_from_probs",
    "refine",
    "refine_detailed",
    "Refined",
    "CRFRefiner",
]

log = logging.getLogger(__name__)

# pydensecrf holds the GIL; a lock keeps even a threaded caller to one CRF (and one ~125 MB buffer) at a time.
_CRF_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def _as_rgb_uint8(image: Any) -> np.ndarray:
    """Any accepted image -> C-contiguous, writable uint8 (H, W, 3), always a private copy.

    Accepts (H, W), (H, W, 1) grayscale, (H, W, 3) RGB, (H, W, 4) RGBA (alpha dropped), any integer dtype with
    values in 0..255, read-only or strided. Floats are rejected: their scale (0..1 or 0..255) is ambiguous.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image: expected a numpy array, got {type(image).__name__}")
    if image.dtype == np.bool_ or not np.issubdtype(image.dtype, np.integer):
        raise ValueError(
            f"image: expected an integer (uint8) array with values 0..255, got dtype {image.dtype}"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image: expected a non-empty image, got shape {image.shape}")
    if image.dtype != np.uint8:
        lo, hi = int(image.min()), int(image.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"image: expected values in 0..255 for dtype {image.dtype}, got {lo}..{hi}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    # pydensecrf needs a C-contiguous, writable uint8 buffer; always copy so callers' (read-only) arrays are safe.
    return np.array(image, dtype=np.uint8, order="C", copy=True)


def _as_probs(probs: Any, height: int, width: int) -> np.ndarray:
    """Validate (C, H, W) probabilities; returns float32 (C, H, W), C-contiguous (may share memory)."""
    if not isinstance(probs, np.ndarray):
        raise ValueError(f"probs: expected a numpy array, got {type(probs).__name__}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs: expected a floating dtype (float16/32/64), got {probs.dtype}")
    if probs.ndim != 3:
        raise ValueError(f"probs: expected shape (C, H, W), got {probs.shape}")
    if probs.shape[1:] != (height, width):
        raise ValueError(
            f"probs: expected spatial size (H, W) = {(height, width)} matching the image, got {probs.shape[1:]}"
        )
    if not 1 <= probs.shape[0] <= _MAX_LABELS:
        raise ValueError(f"probs: expected 1..{_MAX_LABELS} classes, got {probs.shape[0]}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
        p = np.ascontiguousarray(probs, dtype=np.float32)
    if not np.isfinite(p).all():
        raise ValueError(f"probs: expected finite values, got {int((~np.isfinite(p)).sum())} NaN/inf entries")
    lo, hi = float(p.min()), float(p.max())
    if lo < 0.0 or hi > 1.0 + 1e-3:
        raise ValueError(f"probs: expected probabilities in [0, 1], got values in [{lo:g}, {hi:g}]")
    return p


def _check_features(height: int, width: int, cfg: CRFConfig) -> None:
    """Lattice features are coordinate / sigma; huge ones corrupt pydensecrf's heap (measured), so bound them."""
    extent = float(max(height, width))
    for name, feature in (
        ("pos_xy_std", extent / cfg.pos_xy_std),
        ("bi_xy_std", extent / cfg.bi_xy_std),
        ("bi_rgb_std", 255.0 / cfg.bi_rgb_std),
    ):
        if feature > _MAX_FEATURE:
            raise ValueError(
                f"{name}: expected extent/sigma <= {_MAX_FEATURE:g} for a {height}x{width} image, got {feature:g}"
            )


# ---------------------------------------------------------------------------------------------------------------
# Inference


def unary_from_probs(probs: np.ndarray) -> np.ndarray:
    """-log(clip(p, 1e-5, 1)) as float32 (C, H*W): pydensecrf.utils.unary_from_softmax, C-contiguous."""
    num_labels = probs.shape[0]
    p = np.clip(np.asarray(probs, dtype=np.float32).reshape(num_labels, -1), UNARY_CLIP, 1.0)
    return np.ascontiguousarray(-np.log(p), dtype=np.float32)


def _normalization_flag(name: str) -> int:
    import pydensecrf.densecrf as dcrf

    return {
        "after": dcrf.NORMALIZE_AFTER,
        "symmetric": dcrf.NORMALIZE_SYMMETRIC,
        "before": dcrf.NORMALIZE_BEFORE,
        "none": dcrf.NO_NORMALIZATION,
    }[name]


def _kept_labels(probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    """Indices of the labels the CRF runs on (CRFConfig.prune_*): all labels when prune_threshold is 0."""
    num_labels = probs.shape[0]
    if cfg.prune_threshold <= 0.0:
        return np.arange(num_labels)
    flat = probs.reshape(num_labels, -1)  # (C, H*W)
    peak = flat.max(axis=1)  # (C,)
    keep = np.flatnonzero(peak >= cfg.prune_threshold)
    if keep.size == 0:  # can't happen for a softmax (some label has p >= 1/C); keep the best one anyway
        return np.array([int(peak.argmax())])
    faint = peak[keep] < cfg.prune_confident_prob
    if keep.size > 2 and faint.any():  # two labels already run at the lowest cost (no padding)
        area = np.bincount(flat[keep].argmax(axis=0), minlength=keep.size)  # raw argmax pixels per kept label
        drop = faint & (area <= cfg.prune_argmax_frac * flat.shape[1])
        if drop.all():
            drop[int(peak[keep].argmax())] = False
        keep = keep[~drop]
    return keep


def _adaptive_mean_field(crf: Any, cfg: CRFConfig, num_active: int) -> tuple[np.ndarray, int]:
    """Mean field stepped from Python until the labels settle (CRFConfig.adaptive): (Q (M, H*W), iterations run).

    Each step is exactly one iteration of pydensecrf's ``inference`` (same C++ update). Labels are compared over
    the first ``num_active`` rows only: padding rows are 0 everywhere and never the argmax. An argmax costs
    3-5 ms per 500x375 image (a step 20-35 ms), so after a count above the budget the next comparison is put off
    by the iterations the count needs to fall under it at the fastest decay measured (~3x per iteration).
    """
    q_mat, tmp1, tmp2 = crf.startInference()
    q = np.asarray(q_mat)  # (M, H*W) view of the Eigen matrix, which stepInference updates in place
    budget = cfg.converge_changed_frac * q.shape[1]
    labels, labels_at = None, -1  # last argmax and the iteration it belongs to
    compare_at = _FIRST_COMPARED_ITERATION  # the next iteration whose label changes are counted
    settled = 0
    iteration = 0
    while iteration < cfg.iterations:
        crf.stepInference(q_mat, tmp1, tmp2)
        iteration += 1
        if iteration == cfg.iterations or iteration < compare_at - 1:
            continue  # the last one (nothing to save), or a count not due yet
        q = np.asarray(q_mat)
        new = q[:num_active].argmax(axis=0)  # (H*W,)
        if iteration == compare_at and labels_at == iteration - 1:
            changed = int(np.count_nonzero(new != labels))
            settled = settled + 1 if changed <= budget else 0
            if settled >= cfg.converge_patience:
                break
            wait = 1 if changed <= budget else math.ceil(math.log(changed / max(budget, 0.5)) / math.log(3.0))
            compare_at = iteration + max(1, wait)
        labels, labels_at = new, iteration
    return np.asarray(q_mat), iteration


def _run_dense_crf(
    image: np.ndarray,
    unary: np.ndarray,
    cfg: CRFConfig,
    stats: dict[str, int] | None = None,
    num_active: int | None = None,
) -> np.ndarray:
    """pydensecrf mean field on validated inputs: image uint8 (H, W, 3), unary float32 (M, H*W) -> Q (M, H*W).

    ``stats["iterations"]`` is set to the iterations run; ``num_active``: rows before the padding (default M).
    """
    import pydensecrf.densecrf as dcrf

    height, width = image.shape[:2]
    norm = _normalization_flag(cfg.normalization)
    with _CRF_LOCK:
        crf = dcrf.DenseCRF2D(width, height, unary.shape[0])
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(
            sxy=float(cfg.pos_xy_std), compat=float(cfg.pos_w), kernel=dcrf.DIAG_KERNEL, normalization=norm
        )
        crf.addPairwiseBilateral(
            sxy=float(cfg.bi_xy_std),
            srgb=float(cfg.bi_rgb_std),
            rgbim=image,
            compat=float(cfg.bi_w),
            kernel=dcrf.DIAG_KERNEL,
            normalization=norm,
        )
        if cfg.adaptive:
            q, iterations = _adaptive_mean_field(
                crf, cfg, unary.shape[0] if num_active is None else num_active
            )
        else:
            q, iterations = np.asarray(crf.inference(int(cfg.iterations))), int(cfg.iterations)
    if stats is not None:
        stats["iterations"] = iterations
    return np.asarray(q, dtype=np.float32)


def _run_dense_crf_numba(
    image: np.ndarray, unary: np.ndarray, cfg: CRFConfig, num_active: int
) -> tuple[np.ndarray, int] | None:
    """_run_dense_crf with the numba backend: (Q (M, H*W), iterations run), or None where its lattice keys do not
    fit (features far beyond a real image's), for the caller to run pydensecrf."""
    from pipeline.stages.crf_numba import mean_field_numba

    settle = None
    if cfg.adaptive:
        budget = cfg.converge_changed_frac * unary.shape[1]
        settle = (budget, int(cfg.converge_patience), _FIRST_COMPARED_ITERATION)
    return mean_field_numba(
        image,
        unary,
        pos=(float(cfg.pos_w), float(cfg.pos_xy_std)),
        bilateral=(float(cfg.bi_w), float(cfg.bi_xy_std), float(cfg.bi_rgb_std)),
        normalization=cfg.normalization,
        iterations=int(cfg.iterations),
        num_active=num_active,
        settle=settle,
    )


@dataclass(frozen=True)
class Refined:
    """One image's CRF result (refine_detailed).

    labels: uint8 (H, W). probs: refined marginals float32 (C, H, W), pruned labels 0; None unless asked for.
    iterations: mean-field iterations run (0 when pruning left one label). labels_kept: labels left by pruning.
    """

    labels: np.ndarray
    probs: np.ndarray | None
    iterations: int
    labels_kept: int


def refine(
    image: np.ndarray, probs: np.ndarray, cfg: CRFConfig, *, return_probs: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Dense CRF refinement of one image.

    image: uint8 (H, W, 3) RGB (also (H, W), (H, W, 1), (H, W, 4), other integer dtypes in 0..255; converted).
    probs: float (C, H, W) class probabilities (softmax), finite, in [0, 1].
    Returns labels uint8 (H, W); with return_probs also the refined marginals float32 (C, H, W), where pruned
    labels get probability 0. Raises ValueError for any input pydensecrf can't take safely.
    """
    out = refine_detailed(image, probs, cfg, return_probs=return_probs)
    if not return_probs:
        return out.labels
    assert out.probs is not None
    return out.labels, out.probs


def refine_detailed(
    image: np.ndarray, probs: np.ndarray, cfg: CRFConfig, *, return_probs: bool = False
) -> Refined:
    """refine(), also reporting the iterations run and the labels kept (same inputs and checks)."""
    if not isinstance(cfg, CRFConfig):
        raise ValueError(f"cfg: expected a CRFConfig, got {type(cfg).__name__}")
    _validate_config(cfg)
    rgb = _as_rgb_uint8(image)
    height, width = rgb.shape[:2]
    p = _as_probs(probs, height, width)
    _check_features(height, width, cfg)
    num_labels = p.shape[0]

    keep = _kept_labels(p, cfg)  # (K,)
    num_kept = keep.size
    stats = {"iterations": 0 if num_kept == 1 else int(cfg.iterations)}
    if num_kept == 1:
        # One label left: mean field can only return it (dummies carry no mass), skip the C++ call.
        q_kept = np.ones((1, height * width), dtype=np.float32)
    else:
        # Measured (500x375, 10 iterations): 3 -> 4 labels cuts inference 0.24 -> 0.19 s, 7 -> 8 0.30 -> 0.26 s,
        # 5/6 -> 8 is a wash, but 2 labels (0.16 s) are faster than 4, so two labels are never padded.
        # The numba backend pads to an even count itself.
        multiple = cfg.pad_labels_to_multiple if num_kept > 2 and cfg.backend != "numba" else 1
        num_total = -(-num_kept // multiple) * multiple
        unary = np.full((num_total, height * width), _DUMMY_ENERGY, dtype=np.float32)  # (M, H*W)
        # A per-pixel constant in the unary cancels in mean field, so the kept labels need no renormalisation.
        unary[:num_kept] = unary_from_probs(p if num_kept == num_labels else p[keep])
        if cfg.backend == "torch":
            from pipeline.stages.crf_torch import run_dense_crf_torch

            q = run_dense_crf_torch(rgb, unary, cfg)  # (M, H*W)
        elif cfg.backend == "numba" and (done := _run_dense_crf_numba(rgb, unary, cfg, num_kept)) is not None:
            q, stats["iterations"] = done
        else:
            q = _run_dense_crf(rgb, unary, cfg, stats, num_kept)  # (M, H*W)
        q_kept = q[:num_kept]
        if not np.isfinite(q_kept).all():
            # Inputs are validated, so this means a parameter combination we didn't foresee; fail the row.
            raise ValueError("dense CRF: expected finite marginals, got NaN/inf (check the CRF parameters)")

    labels = keep[q_kept.argmax(axis=0)].astype(np.uint8).reshape(height, width)
    refined = None
    if return_probs:
        refined = np.zeros((num_labels, height * width), dtype=np.float32)
        refined[keep] = q_kept
        refined = refined.reshape(num_labels, height, width)
    return Refined(labels=labels, probs=refined, iterations=stats["iterations"], labels_kept=num_kept)


# ---------------------------------------------------------------------------------------------------------------
# Stage class


def upsample_logits_np(logits: np.ndarray, height: int, width: int, *, offset: int = 0) -> np.ndarray:
    """pipeline.model.deeplab.upsample_logits in numpy: Caffe's bilinear x8 (align_corners, to 8 * (h - 1) + 1)
    then the crop [offset : offset + height, offset : offset + width]; (C, h, w) -> float32 (C, height, width).

    With a factor of exactly 8 an output row y reads input rows y // 8 and y // 8 + 1 with weight (y % 8) / 8, so
    only the crop is computed. Equal to the torch function within float rounding (tests/stages/test_crf.py). Not
    the torch function itself: CRF actors do without torch (~1.6 s of CPU and ~190 MB of RSS per actor) unless the
    torch backend runs.
    """
    _, h, w = logits.shape
    upsampled_size(h, w, height, width, offset)
    x = np.asarray(logits, dtype=np.float32)

    def taps(start: int, count: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.arange(start, start + count)
        lo = pos // OUTPUT_STRIDE
        frac = ((pos % OUTPUT_STRIDE) / np.float32(OUTPUT_STRIDE)).astype(np.float32)
        return lo, np.minimum(lo + 1, size - 1), frac

    y0, y1, fy = taps(offset, height, h)
    x0, x1, fx = taps(offset, width, w)
    rows = x[:, y0, :] * (1 - fy)[:, None] + x[:, y1, :] * fy[:, None]  # (C, height, w)
    return np.ascontiguousarray(rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx, dtype=np.float32)


def _node_id() -> str:
    """Ray node id when running inside an initialised Ray process, else "local" (ray is imported lazily)."""
    ray = sys.modules.get("ray")  # not imported -> can't be initialised; avoids a slow import in plain use
    if ray is None:
        return "local"
    try:
        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except Exception as exc:  # a broken runtime context must not fail the batch
        log.warning("could not read the Ray node id: %s", exc)
    return "local"


def _rows(column: Any, n: int, name: str) -> list[Any]:
    """A batch column as a list of per-row values (object ndarray of arrays, regular ndarray or list)."""
    if column is None:
        raise ValueError(f"batch: expected column {name!r}, got none")
    if len(column) != n:
        raise ValueError(f"batch: expected {n} rows in column {name!r}, got {len(column)}")
    return [column[i] for i in range(n)]


class CRFRefiner:
    """Ray Data stage (map_batches, batch_format="numpy", CPU actors): DCNN logits + image -> CRF mask.

    Input columns: ID, STATUS, ERROR, IMAGE uint8 (H, W, 3), LOGITS float16 (C, h, w) stride 8, UPSAMPLE_OFFSET.
    Output: the input columns minus LOGITS and IMAGE, plus MASK uint8 (H, W) (empty (0, 0) for rows not ok),
    "crf_s" (seconds spent on the row) and "crf_node". A row that fails becomes STATUS "crf_error" with the reason.
    The image and logits are dropped here, not by a later stage: they are ~60 % of a row's bytes and no stage after
    the CRF reads them, so the rows that wait for a whole Parquet part in the object store stay small.
    """

    def __init__(self, cfg: CRFConfig) -> None:
        if not isinstance(cfg, CRFConfig):
            raise ValueError(f"cfg: expected a CRFConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self._node: str | None = None
        if cfg.backend == "numba":
            from pipeline.stages.crf_numba import warm_up

            warm_up()

    def _probs(self, logits: Any, height: int, width: int, offset: int) -> np.ndarray:
        """float16 (C, h, w) stride-8 logits -> float32 (C, H, W) softmax probabilities (Caffe x8 upsampling)."""
        if not isinstance(logits, np.ndarray) or logits.ndim != 3:
            shape = getattr(logits, "shape", None)
            raise ValueError(f"logits: expected a (C, h, w) array, got {type(logits).__name__} shape {shape}")
        up = upsample_logits_np(logits, int(height), int(width), offset=int(offset))  # (C, H, W)
        up -= up.max(axis=0)
        np.exp(up, out=up)
        up /= up.sum(axis=0)
        return up

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._node is None:
            self._node = _node_id()
        n = len(batch[ID])
        statuses = [str(s) for s in _rows(batch[STATUS], n, STATUS)]
        errors = _rows(batch.get(ERROR, np.full(n, None, dtype=object)), n, ERROR)
        masks: list[np.ndarray] = []
        seconds = np.zeros(n, dtype=np.float64)
        images = _rows(batch.get(IMAGE), n, IMAGE)
        logits = _rows(batch.get(LOGITS), n, LOGITS)
        offsets = _rows(batch.get(UPSAMPLE_OFFSET, np.zeros(n, dtype=np.int64)), n, UPSAMPLE_OFFSET)
        retryable = retryable_flags(batch)

        for i in range(n):
            if statuses[i] != OK:
                masks.append(np.zeros((0, 0), dtype=np.uint8))
                continue
            start = time.perf_counter()
            try:
                image = images[i]
                if not isinstance(image, np.ndarray) or image.ndim < 2:
                    raise ValueError(f"image: expected an (H, W, 3) array, got {type(image).__name__}")
                height, width = image.shape[:2]
                probs = self._probs(logits[i], height, width, offsets[i])
                masks.append(refine(image, probs, self.cfg))
            except Exception as exc:  # any failure becomes data: the rest of the batch goes on
                log.warning("CRF failed for %s: %s", batch[ID][i], exc)
                statuses[i] = ErrorKind.CRF
                errors[i] = f"{type(exc).__name__}: {exc}"
                retryable[i] = isinstance(exc, MemoryError)  # the node's memory, not the image: retry it
                masks.append(np.zeros((0, 0), dtype=np.uint8))
            seconds[i] = time.perf_counter() - start

        out = {k: v for k, v in batch.items() if k not in (LOGITS, IMAGE)}
        out[STATUS] = object_column(statuses)
        out[ERROR] = object_column(errors)
        out[RETRYABLE] = retryable
        out[MASK] = object_column(masks)
        out["crf_s"] = seconds
        out["crf_node"] = object_column([self._node] * n)
        return clean_text_columns(out)
