"""CRF backend "torch" (used by crf.refine, and in the DCNN actor when crf.device is cuda): pydensecrf's dense CRF in
plain PyTorch ops, on any torch device.

Same model as pydensecrf (libDenseCRF 2013, as the CRF stage calls it): Potts compatibility, a Gaussian kernel on
(x/pos_xy_std, y/pos_xy_std) and a bilateral kernel on (x/bi_xy_std, y/bi_xy_std, rgb/bi_rgb_std), each filtered on
its own permutohedral lattice [Adams et al. 2010], and mean-field inference Q <- softmax(-U + sum_k w_k K_k Q).

The lattice follows libDenseCRF's ``Permutohedral`` in every detail that changes results: the elevation's scale
factors (1/sqrt((i+1)(i+2)) * sqrt(2/3)(d+1)) in float32 and in its order of operations, rounding to the nearest
0-coloured point with ties to even (its SSE path), the rank tie-breaking, the barycentric wrap-around, the blur
along each of the d+1 axes with weights 1, 0.5, 0.5 (a missing neighbour counts 0), the slice's alpha
1/(1+2^-d), and the normalisation modes of ``DenseKernel`` (``after`` divides the filtered values by the filtered
ones image, ``symmetric`` scales by its inverse square root before and after). Torch replaces the hash table:
each vertex key is packed into one int64, a sort and ``torch.unique_consecutive(return_inverse=True)`` number the
vertices and ``searchsorted`` finds the blur neighbours. A lattice is built once per image and kernel and reused by every
mean-field iteration; a batch of images shares one lattice per kernel with the image index in every key, so each
image still gets exactly its own CRF. Where results differ from pydensecrf (float rounding order, exp):
docs/crf-backends.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from pipeline.stages.crf_config import CRFConfig

__all__ = [
    "DenseKernel",
    "PermutohedralLattice",
    "check_crf_device",
    "crf_features",
    "dense_crf",
    "mean_field",
    "refine_probs",
    "refine_probs_batch",
    "run_dense_crf_torch",
]

# crf.refine pads the kept labels with this energy (its _DUMMY_ENERGY): exp(-1e4) is 0 in float32, so such a label's
# marginal is exactly 0 at every iteration and filtering it gives exactly 0. Those rows are skipped here.
_INERT_ENERGY = 1e4
# Packed vertex keys must fit an int64 (63 bits); beyond that the features are far outside any real image.
_MAX_KEY_SPACE = 2**62
# Lattice coordinates are rounded float32 features times ~(d+1): bounded so they convert to int64 exactly
# (crf.refine already bounds features at 1e6, where pydensecrf's heap corrupts).
_MAX_FEATURE = 1e6


def check_crf_device(device: str) -> torch.device:
    """The torch device for ``crf.device``; "cuda" without a usable CUDA device raises one clear line."""
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"crf.device: expected 'cpu' or 'cuda', got {device!r}")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise RuntimeError(
            f"crf.device is 'cuda' but torch {torch.__version__} ({build}) sees no CUDA device: "
            "run on a GPU node or set crf.device: cpu"
        )
    return torch.device("cuda", torch.cuda.current_device())


class PermutohedralLattice:
    """libDenseCRF's permutohedral lattice for N points with d features; ``compute`` = splat, blur, slice.

    features: float32 (N, d) on the device the filter runs on; ``groups`` (int64 (N,) in 0..num_groups-1, e.g. the
    image of each pixel of a batch) keeps groups apart: their vertices never meet. Splat, blur and slice are each one
    ``embedding_bag`` (a weighted sum of gathered rows: one kernel, deterministic forward) over index tables built
    here once: row 0 of the vertex values is a zero "no vertex" row, vertex m is row m + 1.
    """

    def __init__(self, features: Tensor, groups: Tensor | None = None, num_groups: int = 1) -> None:
        if features.ndim != 2 or features.dtype != torch.float32:
            raise ValueError(
                f"features: expected float32 (N, d), got {features.dtype} {tuple(features.shape)}"
            )
        n, d = features.shape
        self.num_points, self.dim = n, d
        if n == 0 or not bool(torch.isfinite(features).all()) or float(features.abs().max()) > _MAX_FEATURE:
            raise ValueError(
                f"features: expected N >= 1 finite values within +-{_MAX_FEATURE:g}, got N = {n}"
            )
        dev = features.device
        rem0, rank, bary = _simplex(features)  # (d+1, N), (d+1, N), (N, d+1)
        packed, strides = _packed_keys(rem0, rank, groups, num_groups)  # (N, d+1) int64
        # The hash table: one stable sort of the keys numbers the vertices (torch.unique's inverse) and, in the same
        # pass, orders the splat's entries by vertex and, within a vertex, by point.
        sorted_keys, order = torch.sort(packed.reshape(-1), stable=True)  # (N*(d+1),)
        keys, sorted_inverse, counts = torch.unique_consecutive(
            sorted_keys, return_inverse=True, return_counts=True
        )
        inverse = torch.empty_like(sorted_inverse)
        inverse[order] = sorted_inverse  # vertex of each (point, remainder) entry
        self.num_vertices = m = int(keys.numel())
        # Slice: point i sums alpha * barycentric * value over its d+1 vertices (alpha = 1/(1+2^-d), libDenseCRF's).
        alpha = np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d))
        self.slice_index = inverse.reshape(n, d + 1) + 1  # (N, d+1) rows of the vertex values
        self.slice_weight = bary * torch.tensor(alpha, device=dev)  # (N, d+1)
        # Splat: vertex m sums barycentric * value over the points touching it, in point order.
        self.splat_index = order // (d + 1)  # (N*(d+1),) point of each entry
        self.splat_weight = bary.reshape(-1)[order]
        # M+1 bags: an empty bag 0 (sums to 0) then vertex m's entries, so the splat comes out as vertex values.
        self.splat_offsets = torch.cat((counts.new_zeros(2), counts.cumsum(0)[:-1]))  # (M+1,)
        # Blur along axis j: new[m] = v[m] + 0.5 v[n1] + 0.5 v[n2] (row 0 for a missing neighbour, and row 0 -> 0).
        self.blur_index = self._blur_index(keys, strides)  # (d+1, M+1, 3)
        self.blur_weight = torch.tensor([1.0, 0.5, 0.5], device=dev).expand(m + 1, 3).contiguous()

    def _blur_index(self, keys: Tensor, strides: Tensor) -> Tensor:
        """(d+1, M+1, 3) rows [m, n1, n2]: for axis j, n1 = key - 1 on every coordinate but j (+ d) and n2 its mirror."""
        d, m, total = self.dim, self.num_vertices, int(strides.sum())
        out = torch.zeros((d + 1, m + 1, 3), dtype=torch.int64, device=keys.device)
        out[:, 1:, 0] = torch.arange(1, m + 1, device=keys.device)
        for j in range(d + 1):
            delta = -total + ((d + 1) * int(strides[j]) if j < d else 0)  # packed n1 = key + delta
            for side, target in ((1, keys + delta), (2, keys - delta)):
                pos = torch.searchsorted(keys, target).clamp_(max=m - 1)
                out[j, 1:, side] = torch.where(keys[pos] == target, pos + 1, 0)
        return out

    def compute(self, values: Tensor) -> Tensor:
        """Filter float32 (N, C) values -> (N, C): splat onto the vertices, blur along axes 0..d, slice back."""
        grid = F.embedding_bag(
            self.splat_index, values, self.splat_offsets, mode="sum", per_sample_weights=self.splat_weight
        )  # (M+1, C)
        for j in range(self.dim + 1):
            grid = F.embedding_bag(self.blur_index[j], grid, mode="sum", per_sample_weights=self.blur_weight)
        return F.embedding_bag(self.slice_index, grid, mode="sum", per_sample_weights=self.slice_weight)


def _simplex(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Elevate (N, d) features onto the hyperplane and find the enclosing simplex, float32 as libDenseCRF's SSE path.

    Works coordinate-major, one contiguous (N,) vector per coordinate, in the C++'s order of operations. Returns
    rem0 (d+1, N) int64 (the nearest 0-coloured vertex), rank (d+1, N) int64, barycentric (N, d+1) float32.
    """
    n, d = features.shape
    dev = features.device
    f = features.T.contiguous()  # (d, N)
    inv_std = np.float32(math.sqrt(2.0 / 3.0) * (d + 1))  # a float in libDenseCRF
    scale = [np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
    elevated = [torch.empty(0)] * (d + 1)
    sm = torch.zeros(n, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):  # elevated[j] = sum_{k>=j} cf_k - j cf_{j-1}, summed from the top like the C++
        cf = f[j - 1] * torch.tensor(scale[j - 1], device=dev)
        elevated[j] = sm - float(j) * cf
        sm = sm + cf
    elevated[0] = sm
    el = torch.stack(elevated)  # (d+1, N)

    down = torch.tensor(np.float32(1.0) / np.float32(d + 1), device=dev)
    v = torch.round(el * down)  # ties to even, as _mm_cvtps_epi32 under the default rounding mode
    rem0 = v * float(d + 1)
    total = v.sum(dim=0).to(torch.int64)  # small integers: exact in any order

    # libDenseCRF: for i < j, diff_i < diff_j ranks i up, otherwise j (ties go to the later coordinate).
    diff = el - rem0
    rank = torch.zeros((d + 1, n), dtype=torch.int64, device=dev)
    for i in range(d):
        for j in range(i + 1, d + 1):
            up = diff[i] < diff[j]
            rank[i] += up
            rank[j] += ~up
    rank += total
    # If the point isn't on the plane (total != 0), wrap the rank and move the vertex with it.
    wrap = (rank < 0).to(torch.int64) - (rank >= d + 1).to(torch.int64)
    rank += (d + 1) * wrap
    rem0 = rem0.to(torch.int64) + (d + 1) * wrap

    weight = (el - rem0.to(torch.float32)) * down  # (d+1, N)
    bary = torch.zeros((d + 2, n), dtype=torch.float32, device=dev)
    bary.scatter_add_(0, d - rank, weight)  # each slot gets at most one + and one - term: order-free
    bary.scatter_add_(0, d - rank + 1, -weight)
    bary[0] += 1.0 + bary[d + 1]  # wrap around
    return rem0, rank, bary[: d + 1].T.contiguous()


def _packed_keys(
    rem0: Tensor, rank: Tensor, groups: Tensor | None = None, num_groups: int = 1
) -> tuple[Tensor, Tensor]:
    """int64 (N, d+1) keys of the d+1 simplex vertices of each point, and the strides (d,) of the packing.

    Vertex r of a point has coordinates rem0_i + canonical[r][rank_i] (libDenseCRF's canonical simplex: r, or
    r - (d+1) when rank_i > d - r) for the first d coordinates (the last is implied); they are packed mixed-radix
    with a margin, so a blur neighbour (every coordinate -1 or +1, one +-d) is the key plus a constant and never
    aliases another vertex. The group is the top digit: neighbours never cross into another group.
    """
    d = rank.shape[0] - 1
    lo, hi = rem0[:d].amin(dim=1), rem0[:d].amax(dim=1)  # (d,)
    low = lo - 3 * (d + 1)  # canonical offsets reach -d, neighbours one d + 1 further
    radix = (hi - lo + 6 * (d + 1)).tolist()
    space = math.prod(radix)
    if space * num_groups >= _MAX_KEY_SPACE:
        raise ValueError(
            f"crf features: expected a lattice key space below 2^62, got {space:.3g} (sigmas far too small for "
            "the image size)"
        )
    strides = [1]
    for size in radix[:-1]:
        strides.append(strides[-1] * size)
    stride = torch.tensor(strides, dtype=torch.int64, device=rank.device)
    base = ((rem0[:d] - low[:, None]) * stride[:, None]).sum(dim=0)  # (N,)
    total = int(stride.sum())
    keys = torch.empty((rank.shape[1], d + 1), dtype=torch.int64, device=rank.device)
    for r in range(d + 1):
        wrapped = ((rank[:d] > d - r) * stride[:, None]).sum(dim=0)  # coordinates that take r - (d+1)
        keys[:, r] = base + r * total - (d + 1) * wrapped
    if groups is not None:
        keys += groups[:, None] * space
    return keys, stride


def crf_features(image: Tensor, cfg: CRFConfig) -> tuple[Tensor, Tensor]:
    """uint8 (H, W, 3) image -> Gaussian features float32 (H*W, 2) and bilateral features (H*W, 5), as pydensecrf.

    pydensecrf divides in float32: x / sx with x and sx floats.
    """
    height, width = image.shape[:2]
    dev = image.device
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=dev),
        torch.arange(width, dtype=torch.float32, device=dev),
        indexing="ij",
    )
    xy = torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=1)  # (N, 2)

    def div(a: Tensor, sigma: float) -> Tensor:
        return a / torch.tensor(np.float32(sigma), device=dev)

    rgb = image.reshape(-1, 3).to(torch.float32)
    gaussian = div(xy, cfg.pos_xy_std)
    bilateral = torch.cat((div(xy, cfg.bi_xy_std), div(rgb, cfg.bi_rgb_std)), dim=1)
    return gaussian, bilateral


class DenseKernel:
    """One pairwise term: a lattice and libDenseCRF's DenseKernel normalisation around it."""

    def __init__(self, lattice: PermutohedralLattice, weight: float, normalization: str) -> None:
        self.lattice = lattice
        self.weight = float(np.float32(weight))
        self.normalization = normalization
        ones = torch.ones((lattice.num_points, 1), dtype=torch.float32, device=lattice.slice_weight.device)
        raw = self.lattice.compute(ones)[:, 0].to(torch.float64)  # (N,)
        # libDenseCRF computes the norm in double from the float filter output and stores it as float.
        if normalization == "symmetric":
            self.norm = (1.0 / torch.sqrt(raw + 1e-20)).to(torch.float32)[:, None]
        else:
            self.norm = (1.0 / (raw + 1e-20)).to(torch.float32)[:, None]

    def apply(self, q: Tensor) -> Tensor:
        """K q for marginals q (N, C), normalised like DenseKernel::filter (not transposed)."""
        mode = self.normalization
        x = q * self.norm if mode in ("symmetric", "before") else q
        out = self.lattice.compute(x)
        return out * self.norm if mode in ("symmetric", "after") else out


def mean_field(unary: Tensor, kernels: Sequence[DenseKernel], iterations: int) -> Tensor:
    """libDenseCRF's inference: Q = softmax(-U), then Q <- softmax(-U + sum_k w_k K_k Q). unary (N, C) -> Q (N, C)."""
    neg_unary = -unary
    q = torch.softmax(neg_unary, dim=1)
    for _ in range(iterations):
        energy = neg_unary
        for kernel in kernels:  # Potts: the message is -w K Q, subtracted
            energy = energy - (-kernel.weight) * kernel.apply(q)
        q = torch.softmax(energy, dim=1)
    return q


def run_dense_crf_torch(
    image: np.ndarray, unary: np.ndarray, cfg: CRFConfig, *, device: str | torch.device | None = None
) -> np.ndarray:
    """crf._run_dense_crf with the torch backend: image uint8 (H, W, 3), unary float32 (M, H*W) -> Q (M, H*W).

    Inputs are validated by crf.refine. ``device`` defaults to ``cfg.device``. Labels whose energy is
    ``_INERT_ENERGY`` or more at every pixel (refine's padding) get Q = 0 without being filtered.
    """
    dev = check_crf_device(cfg.device) if device is None else torch.device(device)
    num_rows, num_points = unary.shape
    live = np.flatnonzero(unary.min(axis=1) < _INERT_ENERGY)
    q = np.zeros((num_rows, num_points), dtype=np.float32)
    if live.size == 0:
        return q
    with torch.inference_mode():
        img = torch.from_numpy(np.ascontiguousarray(image)).to(dev)
        u = torch.from_numpy(np.ascontiguousarray(unary[live].T)).to(dev)  # (N, C)
        q_live = dense_crf([img], u, cfg)
        q[live] = q_live.T.cpu().numpy()
    return q


def dense_crf(images: Sequence[Tensor], unary: Tensor, cfg: CRFConfig) -> Tensor:
    """Dense CRF of a batch on one device: images uint8 (H_i, W_i, 3), unary float32 (sum H_i*W_i, C) with the
    images' pixels one after the other -> marginals (sum H_i*W_i, C).

    One lattice per kernel for the whole batch (the image index is part of each vertex key, so images never
    interact: each image gets exactly its own CRF), built once and reused by every iteration.
    """
    feats = [crf_features(image, cfg) for image in images]
    groups, num_groups = None, len(images)
    if num_groups > 1:
        sizes = torch.tensor([f[0].shape[0] for f in feats], device=unary.device)
        groups = torch.repeat_interleave(torch.arange(num_groups, device=unary.device), sizes)
    gaussian = torch.cat([f[0] for f in feats])
    bilateral = torch.cat([f[1] for f in feats])
    kernels = [  # pydensecrf order: Gaussian, then bilateral
        DenseKernel(PermutohedralLattice(gaussian, groups, num_groups), cfg.pos_w, cfg.normalization),
        DenseKernel(PermutohedralLattice(bilateral, groups, num_groups), cfg.bi_w, cfg.normalization),
    ]
    return mean_field(unary, kernels, int(cfg.iterations))


def refine_probs(image: np.ndarray | Tensor, probs: Tensor, cfg: CRFConfig) -> np.ndarray:
    """crf.refine with the torch backend, on the device ``probs`` is on (the DCNN actor's GPU): no copy to the host.

    image: uint8 (H, W, 3) RGB; probs: float (C, H, W) softmax. Returns labels uint8 (H, W) on the host.
    """
    return refine_probs_batch([image], [probs], cfg)[0]


@torch.inference_mode()
def refine_probs_batch(
    images: Sequence[np.ndarray | Tensor], probs: Sequence[Tensor], cfg: CRFConfig
) -> list[np.ndarray]:
    """refine_probs for several images in one mean field (fewer, larger kernels on a GPU); same labels per image.

    Pruning as crf.refine, per image (``cfg.prune_*``: labels below ``prune_threshold`` everywhere, and faint
    labels that are almost never the raw argmax, are dropped from its CRF; no padding, which only helps
    pydensecrf's SSE). The batch runs the union of the kept labels; a label
    an image dropped gets an inert energy there (zero mass from the start, as if absent). Raises ValueError for
    non-finite probabilities or a size mismatch (the whole batch: the caller retries rows one by one).
    """
    num_labels = probs[0].shape[0]
    dev = probs[0].device
    imgs, flat, kept = [], [], []
    for image, prob in zip(images, probs, strict=True):
        c, height, width = prob.shape
        # A private copy: Ray's zero-copy batches are read-only, which torch.from_numpy warns about.
        img = image if isinstance(image, Tensor) else torch.from_numpy(np.array(image, copy=True))
        img = img.to(dev)
        if c != num_labels or img.dtype != torch.uint8 or tuple(img.shape) != (height, width, 3):
            raise ValueError(
                f"image/probs: expected uint8 {(height, width, 3)} and {num_labels} labels, "
                f"got {img.dtype} {tuple(img.shape)} and {c}"
            )
        p = prob.reshape(num_labels, -1).to(torch.float32)  # (C, N_i)
        if not bool(torch.isfinite(p).all()):
            raise ValueError("probs: expected finite values, got NaN/inf (non-finite DCNN logits)")
        imgs.append(img)
        flat.append(p)
        kept.append(_kept(p, cfg))  # (C,) bool
    union = torch.nonzero(torch.stack(kept).any(dim=0)).flatten()  # (K,)
    if union.numel() == 1:  # every image kept just this label: mean field can only return it
        labels = [union.expand(p.shape[1]) for p in flat]
    else:
        # -log(clip(p, 1e-5, 1)): pydensecrf.utils.unary_from_softmax, as crf.unary_from_probs.
        unary = [-torch.log(p[union].clamp(1e-5, 1.0)).T for p in flat]  # (N_i, K) each
        for u, keep in zip(unary, kept, strict=True):
            u[:, ~keep[union]] = _INERT_ENERGY
        q = dense_crf(imgs, torch.cat(unary).contiguous(), cfg)  # (sum N_i, K)
        labels = list(union[q.argmax(dim=1)].split([p.shape[1] for p in flat]))
    return [
        lab.to(torch.uint8).reshape(prob.shape[1:]).cpu().numpy()
        for lab, prob in zip(labels, probs, strict=True)
    ]


def _kept(p: Tensor, cfg: CRFConfig) -> Tensor:
    """crf._kept_labels on the device, as a (C,) mask: labels that reach ``prune_threshold`` somewhere, less the faint
    ones (never ``prune_confident_prob``) that are the raw argmax of at most ``prune_argmax_frac`` of the pixels."""
    num_labels, num_pixels = p.shape
    peak = p.amax(dim=1)  # (C,)
    mask = torch.zeros(num_labels, dtype=torch.bool, device=p.device)
    if cfg.prune_threshold <= 0:
        return ~mask
    keep = torch.nonzero(peak >= cfg.prune_threshold).flatten()  # (K,)
    if keep.numel() == 0:  # not for a softmax (some label reaches 1/C); keep the best one anyway
        keep = peak.argmax().reshape(1)
    faint = peak[keep] < cfg.prune_confident_prob
    if keep.numel() > 2 and bool(faint.any()):  # two labels already run at the lowest cost
        area = torch.bincount(
            p[keep].argmax(dim=0), minlength=keep.numel()
        )  # raw argmax pixels per kept label
        drop = faint & (area <= cfg.prune_argmax_frac * num_pixels)
        if bool(drop.all()):
            drop[peak[keep].argmax()] = False
        keep = keep[~drop]
    mask[keep] = True
    return mask
