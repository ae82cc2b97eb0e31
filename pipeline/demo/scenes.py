"""Demo world, first step: generated labelled scenes in the VOC layout (``deeplab make-scenes``), before shard/train.

No dataset can be downloaded here, so the project draws its own. A scene is a textured, shaded background (two
regions with a wavy horizon, low-frequency colour variation, grain, a few background-coloured clutter patches) with
several objects painted in depth order (so they occlude each other). Each object class fixes a shape kind, a colour
family (hue/saturation/value centres, with per-instance spread wide enough that neighbouring families overlap) and a
texture kind; instances vary size, pose, colour and texture frequency. Thin structures (poles, rings with spokes),
soft anti-aliased edges, cast shadows, mild defocus, sensor noise and JPEG compression make a stride-8 network
coarse at boundaries while colour edges still carry what the dense CRF uses. Labels follow VOC: class index per
pixel and 255 (void) in a thin band (2 or 4 px) around every object boundary.

Everything is a pure function of the seed (numpy ``default_rng`` and Pillow only), so the same seed gives the same
bytes. ``simulate_scores`` turns a label map into DeepLab-like coarse class probabilities for CRF tests/benchmarks.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.schema import class_names, voc_palette
from pipeline.storage import StorageConfig

__all__ = [
    "VOID",
    "class_names",
    "scene_class_names",
    "make_scene",
    "simulate_scores",
    "encode_label_png",
    "encode_jpeg",
    "scene_seed",
    "write_voc_dataset",
    "make_scenes_main",
    "shipped_model_classes",
]

log = logging.getLogger(__name__)

VOID = 255


# Shape kinds in class order: the thin ones come early so even a 3-6 class world has thin structures.
_SHAPES = ("blob", "pole", "rect", "ring", "ellipse", "polygon")
_TEXTURES = ("stripes", "smooth", "spots", "grain", "checker")


# ---------------------------------------------------------------------------------------------------------------
# small numpy image ops (no scipy here)


def _box_blur(arr: np.ndarray, radius: int) -> np.ndarray:
    """Separable box mean over (2r+1)^2 on the first two axes, edge-padded. Float32 in, float32 out."""
    if radius <= 0:
        return arr.astype(np.float32, copy=True)
    k = 2 * radius + 1
    out = arr.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float64)
        n = out.shape[axis]
        hi = np.take(c, np.arange(k, k + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        out = ((hi - lo) / k).astype(np.float32)
    return out


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise, roughly unit std: a coarse random grid resized bicubically to (H, W)."""
    gh = max(2, round(cells * height / max(height, width)) + 1)
    gw = max(2, round(cells * width / max(height, width)) + 1)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(
        colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), np.float32
    )


def _rotate(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xx - cx, yy - cy
    return c * dx + s * dy, -s * dx + c * dy


# ---------------------------------------------------------------------------------------------------------------
# scene parts


@dataclass(frozen=True)
class _ClassStyle:
    shape: str
    texture: str
    hue: float  # centre of the colour family, [0, 1)
    sat: float
    val: float


def _class_style(cls: int, num_classes: int) -> _ClassStyle:
    """Fixed per class (independent of the scene seed): what makes a class recognisable across scenes."""
    k = cls - 1
    # Hue centres spread over the circle; the per-instance spread (0.07) is wide enough that neighbouring
    # families overlap when there are more than ~7 classes, and always overlap the background's range.
    hue = (0.04 + k * 0.618034) % 1.0
    return _ClassStyle(
        shape=_SHAPES[k % len(_SHAPES)],
        texture=_TEXTURES[(3 * k + 1) % len(_TEXTURES)],
        hue=hue,
        sat=0.45 + 0.35 * ((k * 0.377) % 1.0),
        val=0.45 + 0.4 * ((k * 0.713 + 0.3) % 1.0),
    )


def scene_class_names(num_classes: int) -> list[str]:
    """Names that say what each class draws: ``background``, then the shape kind of each class (``blob``, ``pole``,
    ``rect``, ``ring``, ``ellipse``, ``polygon``). From class 7 on the shapes repeat in another colour family and
    texture, named with the repeat number (``blob_2``, ``pole_2``, ...). A class's name depends only on its index."""
    class_names(num_classes)  # validates num_classes
    names = ["background"]
    for cls in range(1, num_classes):
        shape = _class_style(cls, num_classes).shape
        repeat = (cls - 1) // len(_SHAPES) + 1
        names.append(shape if repeat == 1 else f"{shape}_{repeat}")
    return names


def _texture(kind: str, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: float) -> np.ndarray:
    """Pattern in [0, 1] (H, W)."""
    angle = rng.uniform(0, math.pi)
    period = size * rng.uniform(0.05, 0.12)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    if kind == "spots":
        return (np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period) > 0.35).astype(np.float32)
    if kind == "checker":
        return ((np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period)) > 0).astype(np.float32)
    if kind == "grain":
        return np.clip(0.5 + 0.5 * _box_blur(rng.standard_normal(xx.shape).astype(np.float32), 1) * 2, 0, 1)
    return np.zeros_like(xx)


def _shape_mask(
    kind: str, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, height: int, width: int
) -> np.ndarray:
    """Boolean (H, W) mask of one instance."""
    size = min(height, width)
    cx = rng.uniform(0.1, 0.9) * width
    cy = rng.uniform(0.15, 0.9) * height
    angle = rng.uniform(0, math.pi)
    a = size * rng.uniform(0.12, 0.3)
    b = a * rng.uniform(0.5, 1.0)
    u, v = _rotate(xx, yy, cx, cy, angle)
    if kind == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "rect":
        return (np.abs(u) <= a) & (np.abs(v) <= b * 0.8)
    if kind == "polygon":
        n = int(rng.integers(3, 7))
        mask = np.ones(xx.shape, bool)
        for i in range(n):  # convex: intersection of half-planes tangent to a circle of radius a
            t = angle + 2 * math.pi * i / n
            mask &= (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t) <= a * 0.85
        return mask
    if kind == "blob":
        theta = np.arctan2(yy - cy, xx - cx)
        r = np.hypot(xx - cx, yy - cy)
        radius = a * np.ones_like(theta)
        for harmonic in (2, 3, 5):
            radius += a * rng.uniform(0.05, 0.22) * np.sin(harmonic * theta + rng.uniform(0, 2 * math.pi))
        return r <= radius
    if kind == "pole":  # a thin rod (3-7 px) with a head: a sign, a lamp, a flag
        half_w = rng.uniform(1.5, 3.5)
        length = size * rng.uniform(0.35, 0.7)
        angle = rng.uniform(-0.35, 0.35)  # mostly upright
        u, v = _rotate(xx, yy, cx, cy, angle)
        rod = (np.abs(u) <= half_w) & (v >= -length / 2) & (v <= length / 2)
        hr = size * rng.uniform(0.06, 0.12)
        head = (u**2 + (v + length / 2) ** 2) <= hr**2
        if rng.uniform() < 0.5:
            head = (np.abs(u - hr) <= hr) & (np.abs(v + length / 2 + hr * 0.3) <= hr * 0.6)
        return rod | head
    if kind == "ring":  # a wheel: a thin ring with a hub and a few thin spokes, background shows through
        r = np.hypot(xx - cx, yy - cy)
        thick = rng.uniform(3.0, 7.0)
        ring = (r <= a) & (r >= a - thick)
        hub = r <= max(2.5, a * 0.15)
        spokes = np.zeros(xx.shape, bool)
        for i in range(int(rng.integers(2, 5))):
            t = angle + math.pi * i / 3
            d = np.abs(-(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t))
            spokes |= (d <= 1.5) & (r <= a)
        return ring | hub | spokes
    raise AssertionError(f"unknown shape {kind}")


def _background(
    rng: np.random.Generator, height: int, width: int, xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, float]:
    """Float (H, W, 3) in [0, 1]: two regions (sky/ground or wall/floor) with shading, mottling and grain."""
    size = min(height, width)
    horizon = rng.uniform(0.3, 0.65) * height
    wiggle = (
        size
        * rng.uniform(0.0, 0.06)
        * np.sin(2 * math.pi * xx / (width * rng.uniform(0.3, 1.0)) + rng.uniform(0, 6))
    )
    upper = yy < horizon + wiggle
    top = _hsv(rng.uniform(), rng.uniform(0.05, 0.45), rng.uniform(0.55, 0.95))
    bottom = _hsv(rng.uniform(), rng.uniform(0.15, 0.6), rng.uniform(0.3, 0.75))
    img = np.where(upper[..., None], top, bottom).astype(np.float32)
    img = _box_blur(img, 2)  # a soft horizon
    # Shading: a linear light gradient, then low-frequency mottling per channel (colour varies, not just value).
    gx, gy = rng.normal(size=2) * 0.25
    shade = 1.0 + gx * (xx / width - 0.5) + gy * (yy / height - 0.5)
    img *= shade[..., None]
    for ch in range(3):
        img[..., ch] += 0.06 * _smooth_noise(rng, height, width, cells=int(rng.integers(3, 8)))
    img += 0.04 * _smooth_noise(rng, height, width, cells=int(rng.integers(10, 24)))[..., None]
    img += 0.025 * rng.standard_normal((height, width, 1)).astype(
        np.float32
    )  # grain (texture for the CRF too)
    return img, horizon


def make_scene(height: int, width: int, *, seed: int, num_classes: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """One generated scene: RGB uint8 (H, W, 3) and label uint8 (H, W) in [0, num_classes) plus 255 (void band).

    Deterministic for ``seed`` (same seed, same arrays). Class 0 is background.
    """
    if height < 16 or width < 16:
        raise ValueError(f"scene size must be at least 16x16, got {width}x{height}")
    names = class_names(num_classes)  # validates num_classes
    del names
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx += 0.5
    yy += 0.5
    size = min(height, width)
    img, _ = _background(rng, height, width, xx, yy)
    label = np.zeros((height, width), np.uint8)

    # Background clutter: patches with object-like colours that are still background (overlapping distributions).
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = size * rng.uniform(0.04, 0.12)
        patch = _box_blur(
            (((xx - cx) / r) ** 2 + ((yy - cy) / (r * rng.uniform(0.4, 1))) ** 2 <= 1).astype(np.float32), 2
        )
        colour = _hsv(rng.uniform(), rng.uniform(0.2, 0.7), rng.uniform(0.3, 0.9))
        img = img * (1 - 0.7 * patch[..., None]) + colour * 0.7 * patch[..., None]

    light = rng.normal(size=2)
    light /= np.linalg.norm(light) + 1e-6
    num_objects = int(rng.integers(2, 6))
    for _ in range(num_objects):
        cls = int(rng.integers(1, num_classes))
        style = _class_style(cls, num_classes)
        mask = _shape_mask(style.shape, rng, xx, yy, height, width)
        if mask.sum() < 12:
            continue
        m = mask.astype(np.float32)
        # Cast shadow: the mask shifted away from the light, blurred, darkening what is already painted.
        dx, dy = (-light * size * rng.uniform(0.02, 0.05)).round().astype(int)
        shadow = _box_blur(np.roll(np.roll(m, dy, axis=0), dx, axis=1), 3)
        img *= 1 - rng.uniform(0.15, 0.35) * shadow[..., None]
        # Instance colour from the class family, two tones mixed by the class texture, shaded by the light.
        hue = style.hue + rng.normal(0, 0.07)
        c1 = _hsv(hue, style.sat + rng.normal(0, 0.12), style.val + rng.normal(0, 0.12))
        c2 = _hsv(
            hue + rng.normal(0, 0.05), style.sat + rng.normal(0, 0.1), style.val * rng.uniform(0.45, 0.8)
        )
        t = _texture(style.texture, rng, xx, yy, size)[..., None] * rng.uniform(0.5, 1.0)
        colour = c1 * (1 - t) + c2 * t
        ys, xs = np.nonzero(mask)
        span = max(float(np.ptp(xs)) + float(np.ptp(ys)), 1.0)
        shade = 1.0 + 0.35 * ((xx - xs.mean()) * light[0] + (yy - ys.mean()) * light[1]) / span
        colour = colour * shade[..., None]
        alpha = _box_blur(m, 1)[..., None]  # soft (anti-aliased) edge: ~3 px colour ramp across the outline
        img = img * (1 - alpha) + colour * alpha
        label[mask] = cls

    # VOC-like void band: every pixel within r (Chebyshev) of a pixel of another class, r = 1 or 2 -> 2 or 4 px.
    r = int(rng.integers(1, 3))
    lab = label.astype(np.int16)
    padded = np.pad(lab, r, mode="edge")
    band = np.zeros(label.shape, bool)
    for oy in range(-r, r + 1):
        for ox in range(-r, r + 1):
            band |= padded[r + oy : r + oy + height, r + ox : r + ox + width] != lab
    label[band] = VOID

    img = 0.6 * img + 0.4 * _box_blur(img, 1)  # mild defocus
    img += rng.normal(0, 0.012, img.shape).astype(np.float32)  # sensor noise
    rgb = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb), label


# ---------------------------------------------------------------------------------------------------------------
# DeepLab-like scores


def _fill_void(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Replace void (and out-of-range) pixels by the nearest valid class, growing 8-connected fronts."""
    out = label.astype(np.int64)
    void = (out < 0) | (out >= num_classes)
    if void.all():
        return np.zeros_like(out)
    shifts = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]
    while void.any():
        grown = False
        for dy, dx in shifts:
            src = np.roll(np.roll(out, dy, axis=0), dx, axis=1)
            src_valid = ~np.roll(np.roll(void, dy, axis=0), dx, axis=1)
            # np.roll wraps around: forbid taking values across the image border
            if dy > 0:
                src_valid[:dy] = False
            elif dy < 0:
                src_valid[dy:] = False
            if dx > 0:
                src_valid[:, :dx] = False
            elif dx < 0:
                src_valid[:, dx:] = False
            take = void & src_valid
            if take.any():
                out[take] = src[take]
                void &= ~take
                grown = True
        assert grown, "void fill made no progress"
    return out


def _resize_f(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(
        Image.fromarray(arr.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    )


def simulate_scores(
    label: np.ndarray, num_classes: int, *, seed: int, stride: int = 8, noise: float = 0.8, peak: float = 7.0
) -> np.ndarray:
    """DeepLab-like class probabilities float32 (C, H, W) for a label map (uint8 (H, W), 255 = void).

    One-hot of the label (void -> nearest class), block-averaged at ``stride``, smoothed (a receptive field),
    plus spatially correlated noise at the coarse resolution (a DCNN's errors come in blobs), scaled by ``peak``
    into logits, bilinearly upsampled and softmaxed: most pixels confident, boundaries blurred over ~stride px.
    """
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {label.shape}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    height, width = label.shape
    filled = _fill_void(label, num_classes)
    h, w = -(-height // stride), -(-width // stride)
    padded = np.pad(filled, ((0, h * stride - height), (0, w * stride - width)), mode="edge")
    onehot = np.zeros((num_classes, h * stride, w * stride), np.float32)
    np.put_along_axis(onehot, padded[None], 1.0, axis=0)
    low = onehot.reshape(num_classes, h, stride, w, stride).mean(axis=(2, 4))  # (C, h, w)
    low = _box_blur(low.transpose(1, 2, 0), 1).transpose(2, 0, 1) if min(h, w) > 2 else low
    rng = np.random.default_rng(seed)
    logits_low = peak * low + noise * rng.standard_normal(low.shape).astype(np.float32)
    # Upsample like DeepLab (interpolate the coarse scores), then crop to the image.
    logits = np.stack([_resize_f(c, h * stride, w * stride) for c in logits_low])[:, :height, :width]
    logits -= logits.max(axis=0, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=0, keepdims=True)
    return np.ascontiguousarray(probs.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# encoding and the VOC layout


def encode_label_png(label: np.ndarray) -> bytes:
    """Palette PNG (VOC palette, index = class, 255 = void); deterministic bytes."""
    im = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(
        buf, format="JPEG", quality=quality, optimize=False
    )
    return buf.getvalue()


def scene_seed(seed: int, index: int) -> int:
    """Per-image seed derived from the dataset seed (independent streams, stable across numpy versions)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def write_voc_dataset(
    output: str,
    *,
    count: int,
    size: tuple[int, int] = (160, 120),
    num_classes: int = 21,
    seed: int = 0,
    val_fraction: float = 0.2,
    storage_cfg: StorageConfig | None = None,
    jpeg_quality: int = 90,
    shape_names: bool = True,
) -> dict:
    """Write ``count`` scenes as a VOC layout under ``output`` (local dir or s3:// prefix). ``size`` is (W, H).

    Files: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``, ``ImageSets/Segmentation/{train,val}.txt``,
    and ``dataset.json`` (num_classes, class_names; not VOC, read by ``deeplab shard`` and training).
    Same arguments, same bytes. Returns ``{"train": [ids], "val": [ids], "num_classes", "class_names", ...}``.
    ``shape_names`` (default): name the classes after what they draw (``scene_class_names``: background, blob,
    pole, ...); False: ``schema.class_names`` (VOC's names at 21 classes, else class_1 ...). Shards and training
    take the names from ``dataset.json``, so they end up in the trained checkpoint and in every report.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    width, height = size
    names = scene_class_names(num_classes) if shape_names else class_names(num_classes)
    cfg = storage_cfg or StorageConfig.from_env()
    ids = [f"scene_{i:06d}" for i in range(count)]
    num_val = round(count * val_fraction)
    if val_fraction > 0 and count > 1:
        num_val = min(max(num_val, 1), count - 1)
    order = np.random.default_rng([seed, 7]).permutation(count)
    val_ids = sorted(ids[i] for i in order[:num_val])
    train_ids = sorted(ids[i] for i in order[num_val:])
    for i, image_id in enumerate(ids):
        rgb, label = make_scene(height, width, seed=scene_seed(seed, i), num_classes=num_classes)
        storage.write_bytes(
            storage.join(output, "JPEGImages", f"{image_id}.jpg"), encode_jpeg(rgb, jpeg_quality), cfg
        )
        storage.write_bytes(
            storage.join(output, "SegmentationClass", f"{image_id}.png"), encode_label_png(label), cfg
        )
        if (i + 1) % 100 == 0:
            log.info("wrote %d/%d scenes to %s", i + 1, count, output)
    for split, split_ids in (("train", train_ids), ("val", val_ids)):
        text = "".join(f"{x}\n" for x in split_ids).encode()
        storage.write_bytes(storage.join(output, "ImageSets", "Segmentation", f"{split}.txt"), text, cfg)
    # Not part of VOC: lets `deeplab shard` and training know the class list without scanning every label.
    meta = {
        "num_classes": num_classes,
        "class_names": names,
        "size": [width, height],
        "seed": seed,
        "count": count,
    }
    storage.write_bytes(storage.join(output, "dataset.json"), json.dumps(meta, sort_keys=True).encode(), cfg)
    log.info("wrote %d scenes (%d train, %d val) to %s", count, len(train_ids), len(val_ids), output)
    return {**meta, "output": output, "train": train_ids, "val": val_ids}


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size must be WxH like 160x120, got {text!r}") from e
    return w, h


def shipped_model_classes() -> int:
    """The number of classes of the checkpoint shipped in pipeline/assets (the demo's and a newcomer's model)."""
    from pipeline.model.weights import DEMO_CHECKPOINT, describe_checkpoint

    return int(describe_checkpoint(str(DEMO_CHECKPOINT))["num_classes"])


def make_scenes_main(argv: list[str] | None = None) -> int:
    """``deeplab make-scenes --output DIR|s3://... --count N --size WxH --num-classes K --seed S``.

    K defaults to the shipped model's classes (6); pass 21 for VOC's."""
    p = argparse.ArgumentParser(
        prog="deeplab make-scenes", description="Generate a VOC-layout dataset of scenes."
    )
    p.add_argument("--output", required=True, help="local directory or s3://bucket/prefix")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=_parse_size, default=(160, 120), help="WxH (default 160x120)")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes drawn, background included (default: the shipped model's, so `deeplab segment` with it "
        "can label every scene)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument(
        "--class-names",
        choices=("generic", "shapes"),
        default="shapes",
        help="names in dataset.json: 'shapes' = what each class draws (background, blob, pole, rect, ...; "
        "default); 'generic' = VOC's names at 21 classes, else class_1 ...",
    )
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = StorageConfig.from_env(endpoint_url=args.endpoint_url)
    summary = write_voc_dataset(
        args.output,
        count=args.count,
        size=args.size,
        num_classes=args.num_classes or shipped_model_classes(),
        seed=args.seed,
        val_fraction=args.val_fraction,
        storage_cfg=cfg,
        jpeg_quality=args.jpeg_quality,
        shape_names=args.class_names == "shapes",
    )
    print(
        f"wrote {args.count} scenes ({len(summary['train'])} train, {len(summary['val'])} val) to {args.output}"
    )
    return 0
