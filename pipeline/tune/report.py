"""The tune-crf report (``OUT/report.md``, ``OUT/report.html``) from ``tuning.json`` (``pipeline/tune/``).

The answer first (mean IoU and pixel accuracy: DCNN -> CRF default -> CRF tuned, the tuned parameters, images,
model, time per image), then each table beside its figure: the trimap curve, one heatmap per search round, and
the run's details. Same page pieces and escaping as the segment report (``pipeline/metrics/page.py``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json

import numpy as np
from matplotlib.figure import Figure

from pipeline.metrics.page import (
    Fig,
    Headline,
    Pair,
    Section,
    Table,
    figure_png,
    plain_text_figures,
    render_md,
    render_page,
)
from pipeline.stages.crf import CRFConfig

__all__ = ["render_reports"]

CRF_FIELDS = tuple(f.name for f in dataclasses.fields(CRFConfig))
_SEARCHED = ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std")


def _heatmap(doc: dict, rd: dict) -> tuple[bytes, list[list[str]]] | None:
    """mIoU over (bi_xy_std, bi_rgb_std) at the round's best bi_w (other fields at the round's best)."""
    keys = set(rd["keys"])
    trials = [t for t in doc["trials"] if t["key"] in keys and t["status"] == "ok"]
    if not trials:
        return None
    top = min(trials, key=lambda t: (-t["mean_iou"], t["key"]))
    fixed = [f for f in CRF_FIELDS if f not in ("bi_xy_std", "bi_rgb_std")]
    plane = [t for t in trials if all(t["params"][f] == top["params"][f] for f in fixed)]
    xs = sorted({t["params"]["bi_rgb_std"] for t in plane})
    ys = sorted({t["params"]["bi_xy_std"] for t in plane})
    grid = np.full((len(ys), len(xs)), np.nan)
    for t in plane:
        grid[ys.index(t["params"]["bi_xy_std"]), xs.index(t["params"]["bi_rgb_std"])] = 100 * t["mean_iou"]
    fig = Figure(figsize=(2.2 + 0.75 * len(xs), 1.4 + 0.45 * len(ys)))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    ax.set_xlabel("bi_rgb_std (sigma_beta)")
    ax.set_ylabel("bi_xy_std (sigma_alpha)")
    ax.set_title(f"round {rd['round']}: mIoU % at bi_w = {top['params']['bi_w']:g}", fontsize=10)
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isfinite(grid[i, j]):
                colour = "black" if grid[i, j] > mid else "white"
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(im, ax=ax, label="mean IoU %")
    table = [
        [f"{y:g}", *(f"{grid[i, j]:.2f}" if np.isfinite(grid[i, j]) else "" for j in range(len(xs)))]
        for i, y in enumerate(ys)
    ]
    return figure_png(fig), [["bi_xy_std \\ bi_rgb_std", *(f"{x:g}" for x in xs)], *table]


def _trimap_figure(doc: dict) -> bytes:
    t = doc["trimap"]
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    for name, style in (("raw", ":"), ("default", "--"), ("best", "-")):
        ys = [np.nan if v is None else 100 * v for v in t[name]]
        label = {"raw": "DCNN", "default": "CRF default", "best": "CRF tuned"}[name]
        ax.plot(t["widths"], ys, style, label=label)
    ax.set_xlabel(f"trimap width (px, band around {t['band_source']})")
    ax.set_ylabel("mean IoU %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _crf_seconds_per_image(doc: dict) -> float | None:
    """Median over this run's ok trials of a trial's seconds / images scored (one CRF process per trial)."""
    tm, scored = doc["timing"], doc["images"]["scored"]
    per = [
        t["seconds"] / scored
        for t in doc["trials"]
        if t["run_id"] == tm["run_id"] and t["seconds"] and scored
    ]
    return float(np.median(per)) if per else None


def _headline(doc: dict) -> list[Headline]:
    best, default, raw, tm = doc["best"], doc["default"], doc["raw"], doc["timing"]
    out = []
    for label, key, prefix in (("Mean IoU", "mean_iou", "miou"), ("Pixel accuracy", "pixel_accuracy", "pa")):
        parts = [(_pct(raw[key]), f"{prefix}-raw"), (" → ", None), (_pct(default[key]), f"{prefix}-default")]
        parts += [(" → ", None), (_pct(best[key]), f"{prefix}-tuned"), (" %", None)]
        small = ""
        if default[key] is not None and raw[key] is not None:
            small = (
                f"tuned {100 * (best[key] - default[key]):+.2f} points over the default, "
                f"{100 * (best[key] - raw[key]):+.2f} over no CRF"
            )
        out.append(Headline(f"{label}: DCNN → CRF default → CRF tuned", parts, small))
    changed = [f for f in CRF_FIELDS if best["crf"][f] != default["crf"][f]] or list(_SEARCHED[:3])
    tuned = " · ".join(f"{f} {best['crf'][f]:g}" if isinstance(best["crf"][f], float) else f"{f} {best['crf'][f]}"
                       for f in changed)  # fmt: skip
    was = ", ".join(f"{f} {default['crf'][f]}" for f in changed)
    out.append(Headline("Tuned parameters (crf.yaml)", [(tuned, "tuned-params")], f"default: {was}"))
    im = doc["images"]
    excluded = f"; {len(im['excluded'])} left out" if im["excluded"] else ""
    out.append(Headline("Images scored", [(str(im["scored"]), "num-images")],
                        f"of {im['chosen']} chosen, {im['labelled_available']} labelled available{excluded}"))  # fmt: skip
    m = doc["model"]
    out.append(
        Headline("Model", [(m["variant"], "model")], f"sha256 {m['digest'][:12]}, {m['num_classes']} classes")
    )
    crf_s = _crf_seconds_per_image(doc)
    rate = "" if tm["trials_per_s"] is None else f", {tm['trials_per_s']:.3g} trials/s"
    out.append(Headline(
        "CRF seconds per image (median trial)",
        [("-" if crf_s is None else f"{crf_s:.3g}", "crf-s-per-image"), (" s", None)],
        f"{len(doc['trials'])} trials ({tm['trials_run']} run now) in {tm['search_wall_s']:.1f} s on "
        f"{tm['cpu_slots']:g} CPU slots{rate}",
    ))  # fmt: skip
    return out


def _where(doc: dict) -> list[str]:
    made = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    return [
        f"Output: {doc['output']}.",
        f"Input: {doc['input']} ({doc['input_format']}).",
        f"Report made {made} UTC.",
    ]


def _run_table(doc: dict) -> Table:
    tm, im = doc["timing"], doc["images"]
    rows = [
        ["input", doc["input"]],
        ["model", f"{doc['model']['variant']} (sha256 {doc['model']['digest'][:12]}), "
                  f"{doc['model']['num_classes']} classes"],
        ["images scored", f"{im['scored']} of {im['chosen']} chosen ({im['labelled_available']} labelled)"],
        ["trials", f"{len(doc['trials'])} ({tm['trials_run']} run now, {tm['trials_done_before']} recorded before)"],
        ["search wall time", f"{tm['search_wall_s']:.1f} s on {tm['cpu_slots']:g} CPU slots"],
        ["trials per second", "" if tm["trials_per_s"] is None else f"{tm['trials_per_s']:.3f}"],
        ["DCNN (logits once)", f"{tm['dcnn_s']:.1f} s" + (" (cache reused)" if tm["logits_cache_reused"] else "")],
        ["logits cache", doc["logits_cache"]],
        ["mean IoU protocol", doc["mean_iou_protocol"]],
    ]  # fmt: skip
    return Table(["", "value"], rows)


def _sections(doc: dict, heat: list[tuple[str, list[list[str]]]]) -> list[Section]:
    best, default, t = doc["best"], doc["default"], doc["trimap"]
    params = [[f, f"{default['crf'][f]}", f"{best['crf'][f]}"] for f in CRF_FIELDS]
    scores = [
        ["DCNN (no CRF)", _pct(doc["raw"]["mean_iou"]), _pct(doc["raw"]["pixel_accuracy"])],
        ["CRF, default parameters", _pct(default["mean_iou"]), _pct(default["pixel_accuracy"])],
        ["CRF, tuned parameters", _pct(best["mean_iou"]), _pct(best["pixel_accuracy"])],
    ]
    widths = [w for w in (1, 2, 3, 5, 10, 20, 40) if w in t["widths"]]
    trimap = [
        [name, *(_pct(t[key][t["widths"].index(w)]) for w in widths)]
        for name, key in (("DCNN", "raw"), ("CRF default", "default"), ("CRF tuned", "best"))
    ]
    sections = [
        Section("scores", "Default vs tuned", [Pair(
            [Table(["", "mean IoU %", "pixel accuracy %"], scores, "Mean IoU"),
             Table(["parameter", "default", "tuned"], params, "Parameters")],
            [Table(["", *(f"w={w}" for w in widths)], trimap, f"Trimap mean IoU % (band around {t['band_source']})"),
             Fig("trimap")],
        )]),
        Section("search", "Search rounds", [
            Pair([Table(rows[0], rows[1:], title)], [Fig(name)]) for name, (title, rows) in heat
        ] or ["No round has a finished trial."]),
        Section("run", "Run", [_run_table(doc)]),
    ]  # fmt: skip
    failed = [t for t in doc["trials"] if t["status"] != "ok"]
    if failed:
        rows = [[t["key"], json.dumps(t["params"]), t["error"] or ""] for t in failed]
        sections.append(Section("failed", "Failed trials", [Table(["trial", "params", "error"], rows)]))
    return sections


def render_reports(doc: dict, rounds: list[dict]) -> tuple[str, str, dict[str, bytes]]:
    """(report.md, report.html, figures) for a ``tuning.json`` document; ``rounds``: each round's trial keys."""
    figures: dict[str, bytes] = {}
    heat: list[tuple[str, tuple[str, list[list[str]]]]] = []
    with plain_text_figures():
        for rd in rounds:
            made = _heatmap(doc, rd)
            if made is not None:
                name = f"heatmap_round{rd['round']}"
                figures[name] = made[0]
                heat.append((name, (f"Round {rd['round']} mIoU % (bi_xy_std x bi_rgb_std)", made[1])))
        figures["trimap"] = _trimap_figure(doc)
    sections = _sections(doc, heat)
    where, headline = _where(doc), _headline(doc)
    md = render_md("CRF tuning report", where, headline, sections, list(figures))
    return md, render_page("CRF tuning report", where, headline, sections, figures), figures
