"""Report stage (end of the flow): ``metrics.json``, ``report.md`` and a self-contained ``report.html`` from the sums.

``build_metrics`` turns a ``MetricsAccumulator`` into the machine-readable document (values are fractions in
[0, 1]; the human reports show percentages like the paper). ``write_report`` renders the figures with matplotlib's
Agg canvas (no pyplot, no global backend switch), writes them under ``report/figures/`` for the Markdown and
embeds them as base64 PNG in the HTML, which therefore opens offline (no external CSS, JS or images).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from pipeline import schema, storage
from pipeline.metrics import BAND_SOURCES, ImageScore, MetricsAccumulator, summarize

__all__ = [
    "METRICS_SCHEMA_VERSION",
    "MEAN_IOU_PROTOCOL",
    "OverlayExample",
    "build_metrics",
    "voc_palette",
    "render_figures",
    "render_markdown",
    "render_html",
    "write_report",
]

log = logging.getLogger(__name__)

METRICS_SCHEMA_VERSION = 1
MEAN_IOU_PROTOCOL = (
    "One confusion matrix summed over all pixels of all images (ground truth 255 skipped); "
    "IoU_c = TP / (TP + FP + FN); mean IoU = mean over classes present in the ground truth or the prediction. "
    "Classes absent from both have IoU null and are left out of the mean (on VOC val every class is present, so "
    "this is the VOC mean over all 21 classes)."
)
BAND_RULES = {
    "void": "band(w) = dilate(gt == 255, square of side 2w+1) AND gt != 255 (paper Fig. 5)",
    "edges": "band(w) = dilate(label edges, square of side 2w-1) AND gt != 255; label edges = non-void pixels "
    "with a 4-neighbour of another non-void class (labels without a void band)",
}
_HIST_BINS = 10
_OVERLAY_MAX_SIDE = 320


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


# -- metrics.json -----------------------------------------------------------------------------------------------------
def _model_metrics(conf: np.ndarray) -> dict:
    out = summarize(conf)
    out["confusion"] = conf.astype(np.int64).tolist()
    return out


def _trimap_curves(confs: np.ndarray) -> dict:
    per_width = [summarize(c) for c in confs]
    return {
        "mean_iou": [s["mean_iou"] for s in per_width],
        "pixel_accuracy": [s["pixel_accuracy"] for s in per_width],
        "num_pixels": [s["num_pixels"] for s in per_width],
    }


def _distribution(values: list[float]) -> dict | None:
    if not values:
        return None
    v = np.sort(np.asarray(values, dtype=np.float64))  # sorted: the float sums don't depend on merge order
    counts, edges = np.histogram(v, bins=_HIST_BINS, range=(0.0, 1.0))
    q = np.percentile(v, [10, 25, 50, 75, 90])
    return {
        "count": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v[0]),
        "p10": float(q[0]),
        "p25": float(q[1]),
        "median": float(q[2]),
        "p75": float(q[3]),
        "p90": float(q[4]),
        "max": float(v[-1]),
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def _score_row(s: ImageScore) -> dict:
    return {
        "image_id": s.image_id,
        "mean_iou_raw": s.mean_iou_raw,
        "mean_iou_crf": s.mean_iou_crf,
        "pixel_accuracy_raw": s.pixel_accuracy_raw,
        "pixel_accuracy_crf": s.pixel_accuracy_crf,
        "num_pixels": s.num_pixels,
    }


def build_metrics(
    acc: MetricsAccumulator,
    *,
    class_names: Sequence[str],
    band_source: str = "auto",
    worst_k: int = 8,
    output_uri: str | None = None,
    model_variants: Sequence[str] = (),
) -> dict:
    """The ``metrics.json`` document (JSON-ready, no NaN): see the module docstring and ``MEAN_IOU_PROTOCOL``."""
    if len(class_names) != acc.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names, expected {acc.num_classes}")
    source = acc.band_source(band_source)
    ranked = acc.sorted_images()
    scored = [s for s in ranked if s.mean_iou is not None]
    worst = scored[:worst_k]
    best = list(reversed(scored[worst_k:][-worst_k:])) if worst_k else []
    return {
        "schema_version": METRICS_SCHEMA_VERSION,
        "output_uri": output_uri,
        "model_variants": list(model_variants),
        "num_classes": acc.num_classes,
        "class_names": list(class_names),
        "num_images": acc.num_images,
        "num_crf_images": acc.num_crf_images,
        "num_errors": acc.num_errors,
        "errors_by_status": dict(sorted(acc.errors_by_status.items())),
        "num_unlabelled": acc.num_unlabelled,
        "num_eval_errors": acc.num_eval_errors,
        "num_confusion_mismatches": acc.num_confusion_mismatches,
        "error_samples": list(acc.error_samples),
        "mean_iou_protocol": MEAN_IOU_PROTOCOL,
        "raw": _model_metrics(acc.confusion["raw"]),
        "crf": _model_metrics(acc.confusion["crf"]) if acc.has_crf else None,
        "trimap": {
            "band_source": source,
            "band_source_requested": band_source,
            "band_rule": BAND_RULES[source],
            "num_images_with_void": acc.num_images_with_void,
            "widths": list(acc.widths),
            "raw": _trimap_curves(acc.trimap[source]["raw"]),
            "crf": _trimap_curves(acc.trimap[source]["crf"]) if acc.has_crf else None,
        },
        "per_image": {
            "ranked_by": "crf" if acc.has_crf else "raw",
            "mean_iou_raw": _distribution([s.mean_iou_raw for s in ranked if s.mean_iou_raw is not None]),
            "mean_iou_crf": _distribution([s.mean_iou_crf for s in ranked if s.mean_iou_crf is not None]),
            "worst": [_score_row(s) for s in worst],
            "best": [_score_row(s) for s in best],
        },
    }


# -- figures ----------------------------------------------------------------------------------------------------------
def voc_palette() -> np.ndarray:
    """uint8 (256, 3): the PASCAL VOC colour map (index 255 = void, light beige)."""
    return np.array(schema.voc_palette(), dtype=np.uint8).reshape(256, 3)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, works headless
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _pct(v: float | None) -> float:
    return float("nan") if v is None else 100.0 * v


def _class_iou_figure(metrics: dict) -> bytes:
    names = metrics["class_names"]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 4))
    ax = fig.add_subplot()
    series = [("no CRF", metrics["raw"])] + ([("CRF", metrics["crf"])] if metrics["crf"] else [])
    width = 0.8 / len(series)
    for k, (label, m) in enumerate(series):
        ax.bar(
            x + (k - (len(series) - 1) / 2) * width, [_pct(v) for v in m["per_class_iou"]], width, label=label
        )
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class IoU (absent classes have no bar)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _confusion_figure(metrics: dict) -> bytes:
    which = "crf" if metrics["crf"] else "raw"
    conf = np.asarray(metrics[which]["confusion"], dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)  # row-normalised: recall per class
    names = metrics["class_names"]
    n = len(names)
    side = max(5.0, 0.4 * n + 2)
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(np.arange(n), names, rotation=90)
    ax.set_yticks(np.arange(n), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"Confusion matrix ({'CRF' if which == 'crf' else 'no CRF'}), rows normalised")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{100 * norm[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def _trimap_figure(metrics: dict) -> bytes:
    t = metrics["trimap"]
    fig = Figure(figsize=(10, 4))
    for k, key in enumerate(("mean_iou", "pixel_accuracy")):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot(t["widths"], [_pct(v) for v in t["raw"][key]], "o-", ms=3, label="no CRF")
        if t["crf"]:
            ax.plot(t["widths"], [_pct(v) for v in t["crf"][key]], "s-", ms=3, label="CRF")
        ax.set_xlabel("trimap width (pixels)")
        ax.set_ylabel(("mean IoU" if key == "mean_iou" else "pixel accuracy") + " (%)")
        ax.set_title(
            f"{'Mean IoU' if key == 'mean_iou' else 'Pixel accuracy'} in the band ({t['band_source']})"
        )
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def _per_image_figure(metrics: dict) -> bytes | None:
    p = metrics["per_image"]
    if not p["mean_iou_raw"]:
        return None
    fig = Figure(figsize=(6, 3.5))
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
    ax.set_title("Per-image mean IoU")
    ax.legend()
    return _png(fig)


def _shrink(a: np.ndarray, resample: int) -> np.ndarray:
    h, w = a.shape[:2]
    scale = _OVERLAY_MAX_SIDE / max(h, w)
    if scale >= 1:
        return a
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(a).resize(size, resample))


def _overlay_figure(ex: OverlayExample, palette: np.ndarray) -> bytes:
    image = _shrink(ex.image, Image.Resampling.BILINEAR) if ex.image is not None else None

    def colour(mask: np.ndarray) -> np.ndarray:
        rgb = palette[_shrink(mask, Image.Resampling.NEAREST)]
        if image is None:
            return rgb
        return (0.45 * image + 0.55 * rgb).astype(np.uint8)  # mask over the image, the image still readable

    panels = [("image", image)] if image is not None else []
    panels += [("no CRF", colour(ex.raw))]
    if ex.crf is not None:
        panels += [("CRF", colour(ex.crf))]
    panels += [("ground truth", colour(ex.gt))]
    h, w = panels[-1][1].shape[:2]
    fig = Figure(figsize=(2.6 * len(panels) * max(w / h, 0.5), 2.9))
    for k, (title, arr) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(arr, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    miou = ", ".join(
        f"{name} mIoU {_pct(v):.1f}%"
        for name, v in (("no CRF", ex.mean_iou_raw), ("CRF", ex.mean_iou_crf))
        if v is not None
    )
    fig.suptitle(f"{ex.kind}: {ex.image_id} ({miou})", fontsize=9)
    return _png(fig)


def render_figures(metrics: dict, examples: Sequence[OverlayExample] = ()) -> dict[str, bytes]:
    """name -> PNG bytes: class_iou, confusion, trimap, per_image (if any image), overlay_<kind>_<k>."""
    figs = {
        "class_iou": _class_iou_figure(metrics),
        "confusion": _confusion_figure(metrics),
        "trimap": _trimap_figure(metrics),
    }
    per_image = _per_image_figure(metrics)
    if per_image is not None:
        figs["per_image"] = per_image
    palette = voc_palette()
    counts: dict[str, int] = {}
    for ex in examples:
        k = counts.get(ex.kind, 0)
        counts[ex.kind] = k + 1
        figs[f"overlay_{ex.kind}_{k}"] = _overlay_figure(ex, palette)
    return figs


# -- tables -----------------------------------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _tables(metrics: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for both renderers, so the Markdown and the HTML can't disagree."""
    raw, crf = metrics["raw"], metrics["crf"] or {}
    model = ", ".join(metrics["model_variants"]) or "model"
    tables = [
        (
            "Mean IoU (%), paper Table 1 style",
            ["model", "no CRF", "CRF"],
            [[model, _fmt(raw["mean_iou"]), _fmt(crf.get("mean_iou"))]],
        ),
        (
            "All metrics (%)",
            ["metric", "no CRF", "CRF"],
            [
                [name, _fmt(raw[key]), _fmt(crf.get(key))]
                for name, key in (
                    ("mean IoU", "mean_iou"),
                    ("pixel accuracy", "pixel_accuracy"),
                    ("mean class accuracy", "mean_accuracy"),
                    ("frequency-weighted IoU", "fw_iou"),
                )
            ],
        ),
        (
            "Per-class IoU (%), '-' = absent from ground truth and prediction",
            ["class", "no CRF", "CRF"],
            [
                [f"{i} {name}", _fmt(raw["per_class_iou"][i]), _fmt(crf["per_class_iou"][i] if crf else None)]
                for i, name in enumerate(metrics["class_names"])
            ],
        ),
    ]
    t = metrics["trimap"]
    shown = [i for i, w in enumerate(t["widths"]) if w in (1, 2, 3, 5, 10, 20, 30, 40)] or list(
        range(len(t["widths"]))
    )
    tables.append(
        (
            f"Trimap: mean IoU (%) in the band around {'the void band' if t['band_source'] == 'void' else 'label edges'}",
            ["width", "no CRF", "CRF", "band pixels"],
            [
                [
                    str(t["widths"][i]),
                    _fmt(t["raw"]["mean_iou"][i]),
                    _fmt(t["crf"]["mean_iou"][i] if t["crf"] else None),
                    str(t["raw"]["num_pixels"][i]),
                ]
                for i in shown
            ],
        )
    )
    p = metrics["per_image"]
    dist_rows = []
    for name, key in (("no CRF", "mean_iou_raw"), ("CRF", "mean_iou_crf")):
        d = p[key]
        if d:
            dist_rows.append(
                [name, str(d["count"])] + [_fmt(d[k]) for k in ("mean", "min", "p10", "median", "p90", "max")]
            )
    tables.append(
        (
            "Per-image mean IoU (%)",
            ["model", "images", "mean", "min", "p10", "median", "p90", "max"],
            dist_rows,
        )
    )
    tables.append(
        (
            f"Worst images (by {'CRF' if p['ranked_by'] == 'crf' else 'no-CRF'} mean IoU)",
            ["image_id", "no CRF", "CRF"],
            [[r["image_id"], _fmt(r["mean_iou_raw"]), _fmt(r["mean_iou_crf"])] for r in p["worst"]],
        )
    )
    counts = [
        ["evaluated images", str(metrics["num_images"])],
        ["images with a CRF mask", str(metrics["num_crf_images"])],
        ["error rows (status != ok, excluded)", str(metrics["num_errors"])],
        *[[f"  {k}", str(v)] for k, v in metrics["errors_by_status"].items()],
        ["ok rows without ground truth", str(metrics["num_unlabelled"])],
        ["ok rows not evaluable here", str(metrics["num_eval_errors"])],
        ["stored confusion != recomputed", str(metrics["num_confusion_mismatches"])],
    ]
    tables.append(("Rows", ["", "count"], counts))
    return tables


_FIGURE_TITLES = {
    "class_iou": "Per-class IoU",
    "confusion": "Confusion matrix",
    "trimap": "Trimap: accuracy near boundaries",
    "per_image": "Per-image mean IoU distribution",
}


def _figure_title(name: str) -> str:
    if name.startswith("overlay_"):
        _, kind, k = name.split("_", 2)
        return f"{kind.capitalize()} image {int(k) + 1}"
    return _FIGURE_TITLES.get(name, name)


def _notes(metrics: dict) -> list[str]:
    t = metrics["trimap"]
    return [
        f"Mean IoU protocol: {metrics['mean_iou_protocol']}",
        f"Trimap band source: {t['band_source']} (requested: {t['band_source_requested']}; "
        f"{t['num_images_with_void']} of {metrics['num_images']} labelled images have void pixels). {t['band_rule']}.",
    ]


def render_markdown(metrics: dict, figure_names: Sequence[str]) -> str:
    """report.md: tables plus figures referenced as ``figures/<name>.png`` (written beside it)."""
    out = ["# Segmentation report", "", f"Output: `{metrics['output_uri']}`", ""]
    out += [f"- {n}" for n in _notes(metrics)] + [""]
    for title, header, rows in _tables(metrics):
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows] + [""]
    out += ["## Figures", ""]
    for name in figure_names:
        out += [f"### {_figure_title(name)}", "", f"![{name}](figures/{name}.png)", ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
th{background:#f0f0f0}
img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:0.9em}
"""


def render_html(metrics: dict, figures: dict[str, bytes]) -> str:
    """report.html: self-contained (inline CSS, figures as base64 data URIs, no scripts)."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Segmentation report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Segmentation report</h1>",
        f"<p>Output: <code>{e(str(metrics['output_uri']))}</code></p>",
    ]
    out += [f'<p class="note">{e(n)}</p>' for n in _notes(metrics)]
    for title, header, rows in _tables(metrics):
        out.append(f"<h2>{e(title)}</h2><table>")
        out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        out.append("</table>")
    out.append("<h2>Figures</h2>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        out.append(f"<h3>{e(_figure_title(name))}</h3>")
        out.append(f'<img alt="{e(name)}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out)


def _per_image_csv(per_image: Sequence[ImageScore]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["image_id", "mean_iou_raw", "mean_iou_crf", "pixel_accuracy_raw", "pixel_accuracy_crf", "num_pixels"]
    )
    for s in per_image:
        writer.writerow(
            [
                s.image_id,
                *(
                    "" if v is None else repr(v)
                    for v in (s.mean_iou_raw, s.mean_iou_crf, s.pixel_accuracy_raw, s.pixel_accuracy_crf)
                ),
                s.num_pixels,
            ]
        )
    return buf.getvalue().encode()


def write_report(
    metrics: dict,
    report_uri: str,
    *,
    storage_cfg: storage.StorageConfig,
    examples: Sequence[OverlayExample] = (),
    per_image: Sequence[ImageScore] = (),
) -> dict[str, str]:
    """Write metrics.json, report.md, report.html, figures/*.png and per_image.csv under ``report_uri``.

    Returns name -> URI of what was written.
    """
    if metrics.get("schema_version") != METRICS_SCHEMA_VERSION:
        raise ValueError(
            f"metrics schema_version must be {METRICS_SCHEMA_VERSION}, got {metrics.get('schema_version')}"
        )
    if metrics["trimap"]["band_source"] not in BAND_SOURCES:
        raise ValueError(
            f"trimap band_source must be one of {BAND_SOURCES}, got {metrics['trimap']['band_source']}"
        )
    written: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        uri = storage.join(report_uri, name)
        storage.write_bytes(uri, data, storage_cfg)
        written[name] = uri

    # allow_nan=False: a NaN would make the file invalid JSON for strict parsers; None is the "absent" value.
    put("metrics.json", json.dumps(metrics, indent=1, allow_nan=False).encode())
    figures = render_figures(metrics, examples)
    for name, png in figures.items():
        put(f"figures/{name}.png", png)
    put("report.md", render_markdown(metrics, list(figures)).encode())
    put("report.html", render_html(metrics, figures).encode())
    put("per_image.csv", _per_image_csv(per_image))
    log.info("report written to %s (%d figures)", report_uri, len(figures))
    return written
