"""Figures of the segment report (``pipeline/metrics/report.py``): matplotlib charts on the Agg canvas and overlay strips.

Charts are built inside ``report_page.plain_text_figures`` (class names and ids are shown as given, never parsed
as math text). Overlays are composed with PIL, not matplotlib: image / ground truth / no CRF / CRF side by side,
each panel at most ``OVERLAY_SIDE_PX`` (small images are enlarged with nearest-neighbour so pixels stay visible);
the image id goes into the page's caption, not into the PNG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pipeline import schema
from pipeline.metrics.page import figure_png

__all__ = [
    "OVERLAY_SIDE_PX",
    "voc_palette",
    "class_iou_figure",
    "confusion_figure",
    "trimap_figure",
    "per_image_figure",
    "overlay_strip",
    "overlay_panels",
]

OVERLAY_SIDE_PX = 150
_GAP_PX = 4


@dataclass(frozen=True, eq=False)
class OverlayExample:
    """One image to show: uint8 RGB ``image`` (H, W, 3) or None when unreadable, uint8 (H, W) masks."""

    image_id: str
    kind: str  # "best" | "worst"
    image: np.ndarray | None
    gt: np.ndarray
    raw: np.ndarray
    crf: np.ndarray | None
    mean_iou_raw: float | None
    mean_iou_crf: float | None


def voc_palette() -> np.ndarray:
    """uint8 (256, 3): the PASCAL VOC colour map (index 255 = void, light beige)."""
    return np.array(schema.voc_palette(), dtype=np.uint8).reshape(256, 3)


def _pct(v: float | None) -> float:
    return float("nan") if v is None else 100.0 * v


def class_iou_figure(metrics: dict) -> bytes:
    """Horizontal bars, one row per class in the per-class table's order (class 0 on top)."""
    names = metrics["class_names"]
    y = np.arange(len(names))
    fig = Figure(figsize=(5.2, 0.26 * len(names) + 1.1))
    ax = fig.add_subplot()
    series = [("no CRF", metrics["raw"])] + ([("CRF", metrics["crf"])] if metrics["crf"] else [])
    height = 0.8 / len(series)
    for k, (label, m) in enumerate(series):
        ax.barh(
            y + (k - (len(series) - 1) / 2) * height,
            [_pct(v) for v in m["per_class_iou"]],
            height,
            label=label,
        )
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("IoU (%)")
    ax.set_xlim(0, 100)
    ax.set_title("Per-class IoU (absent classes have no bar)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return figure_png(fig)


def confusion_figure(metrics: dict) -> bytes:
    which = "crf" if metrics["crf"] else "raw"
    conf = np.asarray(metrics[which]["confusion"], dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)  # row-normalised: recall per class
    names = metrics["class_names"]
    n = len(names)
    side = max(4.5, 0.32 * n + 1.8)
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(np.arange(n), names, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(n), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"Confusion matrix ({'CRF' if which == 'crf' else 'no CRF'}), % of each row", fontsize=10)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(
                        j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=5.5,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return figure_png(fig)


def trimap_figure(metrics: dict) -> bytes:
    t = metrics["trimap"]
    fig = Figure(figsize=(8.4, 3.3))
    for k, key in enumerate(("mean_iou", "pixel_accuracy")):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot(t["widths"], [_pct(v) for v in t["raw"][key]], "o-", ms=3, label="no CRF")
        if t["crf"]:
            ax.plot(t["widths"], [_pct(v) for v in t["crf"][key]], "s-", ms=3, label="CRF")
        ax.set_xlabel("trimap width (pixels)")
        ax.set_ylabel(("mean IoU" if key == "mean_iou" else "pixel accuracy") + " (%)")
        ax.set_title(
            f"{'Mean IoU' if key == 'mean_iou' else 'Pixel accuracy'} in the band ({t['band_source']})",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure_png(fig)


def per_image_figure(metrics: dict) -> bytes | None:
    p = metrics["per_image"]
    if not p["mean_iou_raw"]:
        return None
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.add_subplot()
    edges = np.asarray(p["mean_iou_raw"]["histogram"]["edges"]) * 100
    centers, w = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    series = [("no CRF", p["mean_iou_raw"])] + ([("CRF", p["mean_iou_crf"])] if p["mean_iou_crf"] else [])
    for k, (label, d) in enumerate(series):
        ax.bar(
            centers + (k - (len(series) - 1) / 2) * w * 0.4, d["histogram"]["counts"], w * 0.4, label=label
        )
    ax.set_xlabel("per-image mean IoU (%)")
    ax.set_ylabel("images")
    ax.set_title("Per-image mean IoU", fontsize=10)
    ax.legend(fontsize=8)
    return figure_png(fig)


def _fit(a: np.ndarray, resample: int) -> np.ndarray:
    """Scale so the longer side is OVERLAY_SIDE_PX (down, or up by an integer factor for tiny images)."""
    h, w = a.shape[:2]
    scale = OVERLAY_SIDE_PX / max(h, w)
    if scale > 1:
        scale = float(int(scale))  # whole pixels when enlarging: a mask's cells stay square
        resample = Image.Resampling.NEAREST
    if scale == 1:
        return a
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(a).resize(size, resample))


def overlay_panels(ex: OverlayExample) -> list[str]:
    """Titles of the strip's panels, left to right."""
    return (
        (["image"] if ex.image is not None else [])
        + ["ground truth", "no CRF"]
        + (["CRF"] if ex.crf is not None else [])
    )


def overlay_strip(ex: OverlayExample, palette: np.ndarray) -> bytes:
    """One PNG: image / ground truth / no CRF / CRF (masks blended over the image when it is readable)."""
    image = _fit(ex.image, Image.Resampling.BILINEAR) if ex.image is not None else None

    def colour(mask: np.ndarray) -> np.ndarray:
        rgb = palette[_fit(mask, Image.Resampling.NEAREST)]
        if image is None or image.shape[:2] != rgb.shape[:2]:
            return rgb
        return (0.45 * image + 0.55 * rgb).astype(np.uint8)  # mask over the image, the image still readable

    panels: Sequence[np.ndarray] = ([image] if image is not None else []) + [colour(ex.gt), colour(ex.raw)]
    if ex.crf is not None:
        panels = [*panels, colour(ex.crf)]
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + _GAP_PX * (len(panels) - 1)
    strip = np.full((h, w, 3), 255, np.uint8)
    x = 0
    for p in panels:
        strip[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + _GAP_PX
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
