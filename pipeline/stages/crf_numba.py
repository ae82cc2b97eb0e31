"""The dense CRF's mean field compiled with numba: libDenseCRF's model and permutohedral lattice, cheaper per image.

Same model as pydensecrf (Krähenbühl & Koltun's libDenseCRF, which DeepLab v1 uses): Potts compatibilities, a
Gaussian and a bilateral kernel filtered on a permutohedral lattice (Adams et al. 2010) with libDenseCRF's
rounding, barycentric weights, blur and ``alpha``, its four normalisations, and its mean-field update. Marginals
agree with pydensecrf's within float rounding (``tests/stages/test_crf_numba.py``). What it does with less work
(measured in docs/performance.md):

* the Gaussian kernel's lattice depends only on the image size, so it is built once per size and kept;
* lattice vertices are found in a hash table keyed by one packed int64 (a key's coordinates in fixed-width fields);
* an iteration is two passes over the pixels (slice both lattices and take the argmax; normalise and splat into
  both lattices) with the exponential done by numpy between them, and no allocation per pixel;
* labels run in blocks of 4 and 2 (padded to an even count, not to 4).

An image whose lattice keys do not fit the packed fields (features far beyond a real image's: a sigma of ~1e-2
or an image tens of thousands of pixels wide) returns None and the caller runs pydensecrf instead.
"""

from __future__ import annotations

import functools
import math

import numba as nb
import numpy as np

from pipeline.stages.crf_config import NORMALIZATIONS

__all__ = ["mean_field_numba"]

# Multiplicative hashing (Knuth): 0x9E3779B97F4A7C15 as an int64; the table index is the product's high bits.
_GOLDEN = np.int64(-7046029254386353131)
_MAX_FIELD_BITS = 20  # a d=2 key still packs in 40 bits; wider fields only waste range checks


# ---------------------------------------------------------------------------------------------------------------
# The permutohedral lattice


@nb.njit(cache=True, nogil=True, inline="always")
def _slot(key: int, shift: int, mask: int) -> int:
    return ((key * _GOLDEN) >> shift) & mask


@nb.njit(cache=True, nogil=True)
def _lookup(tkeys, tvals, key, shift, mask):  # noqa: ANN001, ANN202 - numba kernels take arrays
    h = _slot(key, shift, mask)
    while True:
        k = tkeys[h]
        if k == key:
            return tvals[h]
        if k < 0:
            return -1
        h = (h + 1) & mask


@nb.njit(cache=True, nogil=True)
def _build_lattice(feat):  # noqa: ANN001, ANN202
    """feat float32 (N, d) -> (ok, offsets int32 (N, d+1), barycentric float32 (N, d+1), nbrs int32 (d+1, M, 2)).

    offsets and nbrs are rows of a value array whose row 0 stays zero (a missing neighbour reads 0); vertex v is
    row v + 1. Follows libDenseCRF's Permutohedral::init step by step (elevation, rounding to the closest
    0-coloured point, ranks, barycentric weights); ok is False when a key does not fit the packed fields.
    """
    n, d = feat.shape
    d1 = d + 1
    bits = min(64 // d, _MAX_FIELD_BITS)
    bias = 1 << (bits - 1)
    limit = bias - 2 * d1 - 2  # room for the vertex (+-d1) and its blur neighbours (+-d1)
    scale = np.empty(d, np.float32)
    inv_std = math.sqrt(2.0 / 3.0) * d1  # expected standard deviation of the filter, p.6 of Adams et al.
    for i in range(d):
        scale[i] = np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std)
    unit = np.zeros(d1, np.int64)  # +1 on coordinate i of a packed key (coordinate d is implied, not stored)
    ones = np.int64(0)
    for i in range(d):
        unit[i] = np.int64(1) << (bits * i)
        ones += unit[i]
    offsets = np.empty((n, d1), np.int32)
    bary = np.empty((n, d1), np.float32)
    logcap = 12
    while (1 << logcap) < n:
        logcap += 1
    cap = 1 << logcap
    tkeys = np.full(cap, -1, np.int64)
    tvals = np.empty(cap, np.int32)
    vkeys = np.empty(n * d1, np.int64)
    m = 0
    # Elevation, rounding and ranks run a chunk of pixels at a time, coordinate by coordinate, so that the loops
    # over pixels vectorise (per pixel, they were ~60 % of the build); the hash inserts go pixel by pixel.
    chunk = 512
    el = np.empty((d1, chunk), np.float32)
    rem = np.empty((d1, chunk), np.float32)
    dif = np.empty((d1, chunk), np.float32)
    rnk = np.empty((d1, chunk), np.int32)
    sm = np.empty(chunk, np.float32)
    tot = np.empty(chunk, np.int32)
    rank = np.empty(d1, np.int32)
    who = np.empty(d1, np.int32)
    b = np.empty(d1 + 1, np.float32)
    down = np.float32(1.0) / np.float32(d1)
    up = np.float32(d1)
    for start in range(0, n, chunk):
        cnt = min(chunk, n - start)
        for k in range(cnt):
            sm[k] = 0.0
            tot[k] = 0
        for j in range(d, 0, -1):
            sc = scale[j - 1]
            fj = np.float32(j)
            for k in range(cnt):
                cf = feat[start + k, j - 1] * sc
                el[j, k] = sm[k] - fj * cf
                sm[k] += cf
        for k in range(cnt):
            el[0, k] = sm[k]
        for i in range(d1):  # the closest 0-coloured lattice point, coordinate by coordinate
            for k in range(cnt):
                e = el[i, k]
                lo = np.floor(down * e) * up
                hi = lo + up
                rd = hi if hi - e < e - lo else lo
                rem[i, k] = rd
                dif[i, k] = e - rd
                tot[k] = np.int32(np.float32(tot[k]) + rd * down)  # libDenseCRF's int += float
            for k in range(cnt):
                rnk[i, k] = 0
        for i in range(d):
            for j in range(i + 1, d1):
                for k in range(cnt):
                    c = np.int32(dif[i, k] < dif[j, k])
                    rnk[i, k] += c
                    rnk[j, k] += 1 - c
        for i in range(d1):  # back onto the plane when the rounded point is off it
            for k in range(cnt):
                r = rnk[i, k] + tot[k]
                if r < 0:
                    r += d1
                    rem[i, k] += d1
                elif r > d:
                    r -= d1
                    rem[i, k] -= d1
                rnk[i, k] = r
        for kk in range(cnt):
            k = start + kk
            for i in range(d1):
                rank[i] = rnk[i, kk]
            for i in range(d1 + 1):
                b[i] = 0.0
            for i in range(d1):
                v = (el[i, kk] - rem[i, kk]) * down
                b[d - rank[i]] += v
                b[d - rank[i] + 1] -= v
            b[0] += np.float32(1.0) + b[d1]
            key = np.int64(0)
            for i in range(d):
                r = int(rem[i, kk])
                if r > limit or r < -limit:
                    return False, offsets, bary, np.zeros((d1, 0, 2), np.int32)
                key += np.int64(r + bias) << (bits * i)
                who[rank[i]] = i
            who[rank[d]] = d
            for r in range(d1):
                bary[k, r] = b[r]
                if r > 0:  # vertex r = rem0 + canonical simplex row r: +1 everywhere, -d1 where rank > d - r
                    key += ones - d1 * unit[who[d1 - r]]
                h = _slot(key, 64 - logcap, cap - 1)
                while True:
                    t = tkeys[h]
                    if t == key:
                        v = tvals[h]
                        break
                    if t < 0:
                        tkeys[h] = key
                        tvals[h] = m
                        vkeys[m] = key
                        v = m
                        m += 1
                        break
                    h = (h + 1) & (cap - 1)
                offsets[k, r] = v + 1
                if 2 * m > cap:  # keep the table at most half full
                    logcap += 1
                    cap = 1 << logcap
                    tkeys = np.full(cap, -1, np.int64)
                    tvals = np.empty(cap, np.int32)
                    for v2 in range(m):
                        h2 = _slot(vkeys[v2], 64 - logcap, cap - 1)
                        while tkeys[h2] >= 0:
                            h2 = (h2 + 1) & (cap - 1)
                        tkeys[h2] = vkeys[v2]
                        tvals[h2] = v2
    nbrs = np.empty((d1, m, 2), np.int32)
    for j in range(d1):  # neighbours along axis j: key - 1 everywhere except + d on j, and the opposite
        step = ones - d1 * unit[j]
        for v in range(m):
            nbrs[j, v, 0] = _lookup(tkeys, tvals, vkeys[v] - step, 64 - logcap, cap - 1) + 1
            nbrs[j, v, 1] = _lookup(tkeys, tvals, vkeys[v] + step, 64 - logcap, cap - 1) + 1
    return True, offsets, bary, nbrs


@nb.njit(cache=True, nogil=True)
def _blur(nbrs, vals, tmp):  # noqa: ANN001, ANN202
    """libDenseCRF's blur: along each axis v += (left + right) / 2. Returns the array holding the result."""
    d1, m, _ = nbrs.shape
    num = vals.shape[1]
    a, c = vals, tmp
    for j in range(d1):
        for i in range(m):
            o1 = nbrs[j, i, 0]
            o2 = nbrs[j, i, 1]
            for lab in range(num):
                c[i + 1, lab] = a[i + 1, lab] + np.float32(0.5) * (a[o1, lab] + a[o2, lab])
        a, c = c, a
    return a


@nb.njit(cache=True, nogil=True)
def _filter_ones(offsets, bary, nbrs):  # noqa: ANN001, ANN202
    """The lattice filter of an all-ones image, alpha included: (N,) float32, what libDenseCRF normalises by."""
    n, d1 = offsets.shape
    m = nbrs.shape[1]
    vals = np.zeros((m + 1, 1), np.float32)
    tmp = np.zeros((m + 1, 1), np.float32)
    for i in range(n):
        for j in range(d1):
            vals[offsets[i, j], 0] += bary[i, j]
    out = _blur(nbrs, vals, tmp)
    alpha = np.float32(1.0 / (1.0 + 2.0 ** -(d1 - 1)))  # libDenseCRF's "magic scaling constant"
    res = np.empty(n, np.float32)
    for i in range(n):
        acc = np.float32(0.0)
        for j in range(d1):
            acc += bary[i, j] * out[offsets[i, j], 0] * alpha
        res[i] = acc
    return res


@nb.njit(cache=True, nogil=True)
def _bilateral_features(image, sxy, srgb):  # noqa: ANN001, ANN202
    """DenseCRF2D::addPairwiseBilateral's features: (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb), float32."""
    height, width, _ = image.shape
    feat = np.empty((height * width, 5), np.float32)
    for y in range(height):
        for x in range(width):
            i = y * width + x
            feat[i, 0] = np.float32(x) / sxy
            feat[i, 1] = np.float32(y) / sxy
            for c in range(3):
                feat[i, 2 + c] = np.float32(image[y, x, c]) / srgb
    return feat


def _gaussian_features(height: int, width: int, sxy: float) -> np.ndarray:
    """DenseCRF2D::addPairwiseGaussian's features (x / sxy, y / sxy), float32 (N, 2)."""
    s = np.float32(sxy)
    ys, xs = np.divmod(np.arange(height * width, dtype=np.int64), width)
    return np.stack([xs.astype(np.float32) / s, ys.astype(np.float32) / s], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Mean field


@nb.njit(cache=True, nogil=True, inline="always")
def _slice4(off, bary, vals, i, c):  # noqa: ANN001, ANN202
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for j in range(off.shape[1]):
        o = off[i, j]
        w = bary[i, j]
        a0 += w * vals[o, c]
        a1 += w * vals[o, c + 1]
        a2 += w * vals[o, c + 2]
        a3 += w * vals[o, c + 3]
    return a0, a1, a2, a3


@nb.njit(cache=True, nogil=True, inline="always")
def _slice2(off, bary, vals, i, c):  # noqa: ANN001, ANN202
    a0 = a1 = np.float32(0.0)
    for j in range(off.shape[1]):
        o = off[i, j]
        w = bary[i, j]
        a0 += w * vals[o, c]
        a1 += w * vals[o, c + 1]
    return a0, a1


@nb.njit(cache=True, nogil=True)
def _energies(unary, e, g_off, g_bary, g_vals, g_post, b_off, b_bary, b_vals, b_post, active, labels):  # noqa: ANN001, ANN202
    """e = messages - unary, minus each pixel's max over the active labels; labels = the argmax. Returns how
    many pixels changed label."""
    n, num = unary.shape
    changed = 0
    four = num - num % 4
    for i in range(n):
        pg = g_post[i]
        pb = b_post[i]
        for c in range(0, four, 4):
            x0, x1, x2, x3 = _slice4(g_off, g_bary, g_vals, i, c)
            y0, y1, y2, y3 = _slice4(b_off, b_bary, b_vals, i, c)
            e[i, c] = pg * x0 + pb * y0 - unary[i, c]
            e[i, c + 1] = pg * x1 + pb * y1 - unary[i, c + 1]
            e[i, c + 2] = pg * x2 + pb * y2 - unary[i, c + 2]
            e[i, c + 3] = pg * x3 + pb * y3 - unary[i, c + 3]
        if four < num:
            x0, x1 = _slice2(g_off, g_bary, g_vals, i, four)
            y0, y1 = _slice2(b_off, b_bary, b_vals, i, four)
            e[i, four] = pg * x0 + pb * y0 - unary[i, four]
            e[i, four + 1] = pg * x1 + pb * y1 - unary[i, four + 1]
        mx = e[i, 0]
        best = 0
        for lab in range(1, active):
            if e[i, lab] > mx:
                mx = e[i, lab]
                best = lab
        if best != labels[i]:
            changed += 1
            labels[i] = best
        for lab in range(num):
            e[i, lab] -= mx
    return changed


@nb.njit(cache=True, nogil=True, inline="always")
def _splat4(off, bary, vals, i, scale, c, q0, q1, q2, q3):  # noqa: ANN001, ANN202
    for j in range(off.shape[1]):
        o = off[i, j]
        w = bary[i, j] * scale
        vals[o, c] += w * q0
        vals[o, c + 1] += w * q1
        vals[o, c + 2] += w * q2
        vals[o, c + 3] += w * q3


@nb.njit(cache=True, nogil=True, inline="always")
def _splat2(off, bary, vals, i, scale, c, q0, q1):  # noqa: ANN001, ANN202
    for j in range(off.shape[1]):
        o = off[i, j]
        w = bary[i, j] * scale
        vals[o, c] += w * q0
        vals[o, c + 1] += w * q1


@nb.njit(cache=True, nogil=True, inline="always")
def _inverse_sum(e, i, active):  # noqa: ANN001, ANN202
    s = np.float32(0.0)
    for lab in range(active):
        s += e[i, lab]
    return np.float32(1.0) / s


@nb.njit(cache=True, nogil=True)
def _normalise_and_splat(e, active, g_off, g_bary, g_pre, g_vals, b_off, b_bary, b_pre, b_vals):  # noqa: ANN001, ANN202
    """Q = exp(energies) e / their sum over the active labels, splatted into both zeroed lattices (a padding
    label's e is exactly 0, so is its Q)."""
    n, num = e.shape
    g_vals[:] = 0.0
    b_vals[:] = 0.0
    four = num - num % 4
    for i in range(n):
        inv = _inverse_sum(e, i, active)
        gp = g_pre[i]
        bp = b_pre[i]
        for c in range(0, four, 4):
            q0, q1, q2, q3 = e[i, c] * inv, e[i, c + 1] * inv, e[i, c + 2] * inv, e[i, c + 3] * inv
            _splat4(g_off, g_bary, g_vals, i, gp, c, q0, q1, q2, q3)
            _splat4(b_off, b_bary, b_vals, i, bp, c, q0, q1, q2, q3)
        if four < num:
            q0, q1 = e[i, four] * inv, e[i, four + 1] * inv
            _splat2(g_off, g_bary, g_vals, i, gp, four, q0, q1)
            _splat2(b_off, b_bary, b_vals, i, bp, four, q0, q1)


@nb.njit(cache=True, nogil=True)
def _start(unary, num, active):  # noqa: ANN001, ANN202
    """unary (M, N) -> (pixel-major unary (N, num) with padding labels at 1e4, exp(-unary - max) (N, num))."""
    n = unary.shape[1]
    u = np.full((n, num), np.float32(1e4), np.float32)
    e = np.zeros((n, num), np.float32)
    for i in range(n):
        mx = -unary[0, i]
        for lab in range(active):
            u[i, lab] = unary[lab, i]
            mx = max(mx, -unary[lab, i])
        for lab in range(active):
            e[i, lab] = np.float32(math.exp(-u[i, lab] - mx))
    return u, e


@nb.njit(cache=True, nogil=True)
def _marginals(e, rows, active):  # noqa: ANN001, ANN202
    """exp(energies) (N, num) -> Q (rows, N): normalised over the active labels, 0 on the others."""
    n = e.shape[0]
    out = np.zeros((rows, n), np.float32)
    for i in range(n):
        inv = _inverse_sum(e, i, active)
        for lab in range(active):
            out[lab, i] = e[i, lab] * inv
    return out


class _Lattice:
    """One kernel's lattice: where each pixel splats (offsets, bary), the blur neighbours, and the filter of 1."""

    __slots__ = ("bary", "nbrs", "offsets", "ones")

    def __init__(self, offsets: np.ndarray, bary: np.ndarray, nbrs: np.ndarray) -> None:
        self.offsets, self.bary, self.nbrs = offsets, bary, nbrs
        self.ones = _filter_ones(offsets, bary, nbrs)  # (N,)

    def scales(self, normalization: str, weight: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel factors before the splat and after the slice (weight and alpha folded in), as
        libDenseCRF's DenseKernel::filter applies its normalisation."""
        d = self.offsets.shape[1] - 1
        post_scale = np.float32(weight / (1.0 + 2.0**-d))
        unit = np.ones_like(self.ones)
        if normalization == "after":
            return unit, post_scale / (self.ones + np.float32(1e-20))
        if normalization == "symmetric":
            norm = np.float32(1.0) / np.sqrt(self.ones + np.float32(1e-20))
            return norm, post_scale * norm
        if normalization == "before":
            return np.float32(1.0) / (self.ones + np.float32(1e-20)), unit * post_scale
        return unit, unit * post_scale  # "none"


def _lattice(feat: np.ndarray) -> _Lattice | None:
    ok, offsets, bary, nbrs = _build_lattice(feat)
    return _Lattice(offsets, bary, nbrs) if ok else None


@functools.lru_cache(maxsize=2)
def _gaussian_lattice(height: int, width: int, sxy: float) -> _Lattice | None:
    """The Gaussian kernel's lattice: positions only, so one per image size and sigma (kept per process)."""
    return _lattice(_gaussian_features(height, width, sxy))


def mean_field_numba(
    image: np.ndarray,
    unary: np.ndarray,
    *,
    pos: tuple[float, float],
    bilateral: tuple[float, float, float],
    normalization: str,
    iterations: int,
    num_active: int,
    settle: tuple[float, int, int] | None,
) -> tuple[np.ndarray, int] | None:
    """Mean field of the dense CRF: image uint8 (H, W, 3), unary float32 (M, H*W) -> (Q (M, H*W), iterations run).

    pos = (w2, s_g) and bilateral = (w1, s_a, s_b) as DenseCRF2D's addPairwiseGaussian / addPairwiseBilateral
    take them; rows from ``num_active`` on are padding and get Q = 0. ``settle`` = (changed-pixel budget,
    patience, first counted iteration) stops once the labels have settled (crf.CRFConfig.adaptive); None runs
    all ``iterations``. Returns None when the image's lattice keys do not fit (run pydensecrf instead).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")
    # The kernels are compiled (and cached) for C-contiguous uint8 images and float32 unaries.
    image = np.ascontiguousarray(image, dtype=np.uint8)
    unary = np.ascontiguousarray(unary, dtype=np.float32)
    height, width = image.shape[:2]
    num_rows, n = unary.shape
    gauss = _gaussian_lattice(height, width, float(pos[1]))
    if gauss is None:
        return None
    bil = _lattice(_bilateral_features(image, np.float32(bilateral[1]), np.float32(bilateral[2])))
    if bil is None:
        return None
    g_pre, g_post = gauss.scales(normalization, pos[0])
    b_pre, b_post = bil.scales(normalization, bilateral[0])
    num = num_active + num_active % 2  # blocks of 4 and 2 labels; an odd count gets one padding label
    u, e = _start(unary, num, num_active)
    labels = np.zeros(n, dtype=np.uint8)
    g_vals, g_tmp = (np.zeros((gauss.nbrs.shape[1] + 1, num), np.float32) for _ in range(2))
    b_vals, b_tmp = (np.zeros((bil.nbrs.shape[1] + 1, num), np.float32) for _ in range(2))
    budget, patience, first = settle if settle is not None else (-1.0, 0, 0)
    settled = 0
    iteration = 0
    while iteration < iterations:
        iteration += 1
        _normalise_and_splat(
            e, num_active, gauss.offsets, gauss.bary, g_pre, g_vals, bil.offsets, bil.bary, b_pre, b_vals
        )
        g = _blur(gauss.nbrs, g_vals, g_tmp)
        b = _blur(bil.nbrs, b_vals, b_tmp)
        changed = _energies(
            u, e, gauss.offsets, gauss.bary, g, g_post, bil.offsets, bil.bary, b, b_post, num_active, labels
        )
        np.exp(e, out=e)
        if settle is not None and iteration >= first:
            settled = settled + 1 if changed <= budget else 0
            if settled >= patience:
                break
    return _marginals(e, num_rows, num_active), iteration


def warm_up() -> None:
    """Compile the kernels, or load them from numba's on-disk cache (~0.2 s), on a tiny image: CRF actors call it
    at start so the first block does not pay ~4 s of compilation."""
    image = np.zeros((4, 4, 3), np.uint8)
    unary = np.ones((3, 16), np.float32)
    mean_field_numba(
        image, unary, pos=(3.0, 3.0), bilateral=(4.0, 121.0, 5.0), normalization="after",
        iterations=1, num_active=3, settle=None,
    )  # fmt: skip
