"""Report stage (end of the flow): ``metrics.json``, ``report.md`` and a self-contained ``report.html`` from the sums.

``build_metrics`` turns a ``MetricsAccumulator`` into the machine-readable document (values are fractions in
[0, 1]; the human reports show percentages like the paper). ``write_report`` renders the figures
(``pipeline/metrics/figures.py``: matplotlib's Agg canvas, no pyplot), writes them under ``report/figures/`` for the
Markdown and embeds them as base64 PNG in the HTML, which therefore opens offline (no external CSS, JS or images).

The page answers first (where the output is, mean IoU no CRF -> CRF, pixel accuracy, images and errors, model,
time and cost per image), then each table beside its figure, a gallery of the worst and best images, and where the
time went (``pipeline/metrics/timing.py``). ``report.md`` has the same sections in the same order. Image ids and
class names are untrusted text: escaped in both (``pipeline/metrics/page.py``), plain text in figures, and
``per_image.csv`` guards them against spreadsheet formula injection.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence

import numpy as np

from pipeline import storage
from pipeline.metrics import figures
from pipeline.metrics import timing as report_time
from pipeline.metrics.confusion import BAND_SOURCES, ImageScore, MetricsAccumulator, summarize
from pipeline.metrics.figures import OverlayExample, voc_palette
from pipeline.metrics.page import (
    Fig,
    Gallery,
    Headline,
    Pair,
    Section,
    Table,
    csv_cell,
    plain_text_figures,
    render_md,
    render_page,
)

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
def render_figures(metrics: dict, examples: Sequence[OverlayExample] = ()) -> dict[str, bytes]:
    """name -> PNG bytes: class_iou, confusion, trimap, per_image (if any image), overlay_<kind>_<k>."""
    with plain_text_figures():
        figs = {
            "class_iou": figures.class_iou_figure(metrics),
            "confusion": figures.confusion_figure(metrics),
            "trimap": figures.trimap_figure(metrics),
        }
        per_image = figures.per_image_figure(metrics)
    if per_image is not None:
        figs["per_image"] = per_image
    palette = voc_palette()
    for name, ex in _named_examples(examples):
        figs[name] = figures.overlay_strip(ex, palette)
    return figs


def _named_examples(examples: Sequence[OverlayExample]) -> list[tuple[str, OverlayExample]]:
    counts: dict[str, int] = {}
    out = []
    for ex in examples:
        k = counts.get(ex.kind, 0)
        counts[ex.kind] = k + 1
        out.append((f"overlay_{ex.kind}_{k}", ex))
    return out


# -- sections: one structure for report.md and report.html, so they can't disagree ---------------------------------
def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _model_tables(metrics: dict) -> list[Table]:
    raw, crf = metrics["raw"], metrics["crf"] or {}
    model = ", ".join(metrics["model_variants"]) or "model"
    metric_rows = [
        [name, _fmt(raw[key]), _fmt(crf.get(key))]
        for name, key in (
            ("mean IoU", "mean_iou"),
            ("pixel accuracy", "pixel_accuracy"),
            ("mean class accuracy", "mean_accuracy"),
            ("frequency-weighted IoU", "fw_iou"),
        )
    ]
    return [
        Table(["model", "no CRF", "CRF"], [[model, _fmt(raw["mean_iou"]), _fmt(crf.get("mean_iou"))]],
              "Mean IoU (%), paper Table 1 style"),
        Table(["metric", "no CRF", "CRF"], metric_rows, "All metrics (%)"),
    ]  # fmt: skip


def _class_table(metrics: dict) -> Table:
    raw, crf = metrics["raw"], metrics["crf"]
    rows = [
        [f"{i} {name}", _fmt(raw["per_class_iou"][i]), _fmt(crf["per_class_iou"][i] if crf else None)]
        for i, name in enumerate(metrics["class_names"])
    ]
    return Table(
        ["class", "no CRF", "CRF"], rows, "Per-class IoU (%), '-' = absent from ground truth and prediction"
    )


def _trimap_table(metrics: dict) -> Table:
    t = metrics["trimap"]
    shown = [i for i, w in enumerate(t["widths"]) if w in (1, 2, 3, 5, 10, 20, 30, 40)] or list(
        range(len(t["widths"]))
    )
    rows = [
        [
            str(t["widths"][i]),
            _fmt(t["raw"]["mean_iou"][i]),
            _fmt(t["crf"]["mean_iou"][i] if t["crf"] else None),
            str(t["raw"]["num_pixels"][i]),
        ]
        for i in shown
    ]
    around = "the void band" if t["band_source"] == "void" else "label edges"
    return Table(["width", "no CRF", "CRF", "band pixels"], rows, f"Mean IoU (%) in the band around {around}")


def _per_image_tables(metrics: dict) -> list[Table]:
    p = metrics["per_image"]
    dist_rows = []
    for name, key in (("no CRF", "mean_iou_raw"), ("CRF", "mean_iou_crf")):
        d = p[key]
        if d:
            dist_rows.append(
                [name, str(d["count"])] + [_fmt(d[k]) for k in ("mean", "min", "p10", "median", "p90", "max")]
            )
    ranked = "CRF" if p["ranked_by"] == "crf" else "no-CRF"
    worst = [[r["image_id"], _fmt(r["mean_iou_raw"]), _fmt(r["mean_iou_crf"])] for r in p["worst"]]
    return [
        Table(["model", "images", "mean", "min", "p10", "median", "p90", "max"], dist_rows,
              "Per-image mean IoU (%)"),
        Table(["image_id", "no CRF", "CRF"], worst, f"Worst images (by {ranked} mean IoU)"),
    ]  # fmt: skip


def _rows_table(metrics: dict) -> Table:
    counts = [
        ["evaluated images", str(metrics["num_images"])],
        ["images with a CRF mask", str(metrics["num_crf_images"])],
        ["error rows (status != ok, excluded)", str(metrics["num_errors"])],
        *[[f"  {k}", str(v)] for k, v in metrics["errors_by_status"].items()],
        ["ok rows without ground truth", str(metrics["num_unlabelled"])],
        ["ok rows not evaluable here", str(metrics["num_eval_errors"])],
        ["stored confusion != recomputed", str(metrics["num_confusion_mismatches"])],
    ]
    return Table(["", "count"], counts)


def _gallery(examples: Sequence[OverlayExample]) -> Gallery | None:
    items = []
    for name, ex in _named_examples(examples):
        k = int(name.rsplit("_", 1)[1]) + 1
        scores = ", ".join(
            f"{label} {_fmt(v)} %"
            for label, v in (("no CRF", ex.mean_iou_raw), ("CRF", ex.mean_iou_crf))
            if v is not None
        )
        panels = " / ".join(figures.overlay_panels(ex))
        items.append((name, f"{ex.kind} {k}: {ex.image_id} (mean IoU {scores}); {panels}"))
    return Gallery(items) if items else None


def _notes(metrics: dict) -> list[str]:
    t = metrics["trimap"]
    return [
        f"Mean IoU protocol: {metrics['mean_iou_protocol']}",
        f"Trimap band source: {t['band_source']} (requested: {t['band_source_requested']}; "
        f"{t['num_images_with_void']} of {metrics['num_images']} labelled images have void pixels). {t['band_rule']}.",
        "per_image.csv: an image id that starts with = + - @, a tab or a carriage return is written with a leading "
        "' so that a spreadsheet shows it as text and never runs it as a formula.",
    ]


def _sections(
    metrics: dict, figure_names: Sequence[str], examples: Sequence[OverlayExample], run: dict | None
) -> list[Section]:
    has = set(figure_names)

    def fig(name: str, max_width_px: int | None = None) -> list:
        return [Fig(name, max_width_px)] if name in has else []

    notes = _notes(metrics)
    gallery = _gallery(examples)
    dist, worst = _per_image_tables(metrics)
    images: list = [gallery] if gallery else ["No overlays: no scored image, or none could be read."]
    sections = [
        Section("classes", "Per-class IoU", [Pair([_class_table(metrics)], fig("class_iou"))]),
        Section("metrics", "All metrics and the confusion matrix",
                [Pair(_model_tables(metrics), fig("confusion", 720))]),
        Section("trimap", "Accuracy near object boundaries (trimap)",
                [Pair([_trimap_table(metrics)], fig("trimap")), notes[1]]),
        Section("images", "Worst and best images", [*images, Pair([dist, worst], fig("per_image"))]),
    ]  # fmt: skip
    if run and run.get("timing"):
        sections.append(report_time.time_section(run["timing"]))
    sections.append(Section("rows", "Rows", [_rows_table(metrics), notes[0], notes[2]]))
    return sections


def _headline(metrics: dict, run: dict | None) -> list[Headline]:
    """The answer first: mean IoU and pixel accuracy (no CRF -> CRF), images, model, time and cost."""
    raw, crf = metrics["raw"], metrics["crf"]
    out = []
    for label, key, ids in (("Mean IoU", "mean_iou", ("miou-raw", "miou-crf")),
                            ("Pixel accuracy", "pixel_accuracy", ("pa-raw", "pa-crf"))):  # fmt: skip
        if crf is None:
            out.append(Headline(f"{label} (CRF off)", [(_fmt(raw[key]), ids[0]), (" %", None)]))
            continue
        big = [(_fmt(raw[key]), ids[0]), (" % → ", None), (_fmt(crf[key]), ids[1]), (" %", None)]
        gain = (
            ""
            if raw[key] is None or crf[key] is None
            else f"{100 * (crf[key] - raw[key]):+.2f} points with the CRF"
        )
        out.append(Headline(f"{label}: no CRF → CRF", big, gain))
    ok_rows = metrics["num_images"] + metrics["num_unlabelled"] + metrics["num_eval_errors"]
    errors = ", ".join(f"{k} {v}" for k, v in metrics["errors_by_status"].items())
    small = f"{ok_rows} ok rows, {metrics['num_errors']} error rows" + (f" ({errors})" if errors else "")
    if metrics["num_unlabelled"] or metrics["num_eval_errors"]:
        small += (
            f"; not scored: {metrics['num_unlabelled']} without a label, "
            f"{metrics['num_eval_errors']} not evaluable here"
        )
    out.append(Headline("Images evaluated", [(str(metrics["num_images"]), "num-images")], small))
    digests = (run or {}).get("model_digests") or []
    variant = ", ".join(metrics["model_variants"]) or "unknown"
    out.append(Headline("Model", [(variant, "model")], "; ".join(f"sha256 {d[:12]}" for d in digests)))
    if run and run.get("timing"):
        out += report_time.time_headline(run["timing"])
    return out


def render_markdown(
    metrics: dict,
    figure_names: Sequence[str],
    run: dict | None = None,
    examples: Sequence[OverlayExample] = (),
) -> str:
    """report.md: the sections of report.html in the same order; figures as ``figures/<name>.png`` beside it."""
    sections = _sections(metrics, figure_names, examples, run)
    where = report_time.where_lines(run, metrics["output_uri"])
    return render_md("Segmentation report", where, _headline(metrics, run), sections, figure_names)


def render_html(
    metrics: dict,
    figs: dict[str, bytes],
    run: dict | None = None,
    examples: Sequence[OverlayExample] = (),
) -> str:
    """report.html: self-contained (inline CSS, figures as base64 data URIs, no scripts); the answer first."""
    sections = _sections(metrics, list(figs), examples, run)
    where = report_time.where_lines(run, metrics["output_uri"])
    return render_page("Segmentation report", where, _headline(metrics, run), sections, figs)


def _per_image_csv(per_image: Sequence[ImageScore]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["image_id", "mean_iou_raw", "mean_iou_crf", "pixel_accuracy_raw", "pixel_accuracy_crf", "num_pixels"]
    )
    for s in per_image:
        writer.writerow(
            [
                csv_cell(s.image_id),  # formula-injection guard (report_page.csv_cell)
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
    run: dict | None = None,
) -> dict[str, str]:
    """Write metrics.json, report.md, report.html, figures/*.png, per_image.csv, and run.json when ``run`` (the
    facts of ``report_time.run_facts``: where, when, model digest, timing) is given, under ``report_uri``.

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
    if run is not None:
        put("run.json", json.dumps(run, indent=1, allow_nan=False).encode())
    figs = render_figures(metrics, examples)
    for name, png in figs.items():
        put(f"figures/{name}.png", png)
    put("report.md", render_markdown(metrics, list(figs), run, examples).encode())
    put("report.html", render_html(metrics, figs, run, examples).encode())
    put("per_image.csv", _per_image_csv(per_image))
    log.info("report written to %s (%d figures)", report_uri, len(figs))
    return written
