"""report.html and the tune-crf report opened in a real headless Chromium (Selenium + Debian's chromium-driver).

The reports are built from data made in code (generated scenes, simulated DCNN and CRF masks, timing rows written
to and read back from Parquet as the segment job stores them), then checked as a reader sees them at 1280x800:
every image loads, nothing is wider than the page, the headline numbers equal metrics.json / tuning.json and sit
on the first screen, and the page states the median DCNN and CRF seconds that the Parquet columns give.

Needs ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``) and ``selenium``;
without them the test skips and says which is missing. Set REPORT_SCREENSHOT_DIR to keep the screenshots.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.demo.scenes import make_scene, simulate_scores
from pipeline.metrics.confusion import MetricsAccumulator
from pipeline.metrics.report import OverlayExample, build_metrics, write_report
from pipeline.metrics.timing import Prices, fmt_seconds, run_facts, summarize_timing
from pipeline.storage import StorageConfig

pytestmark = pytest.mark.integration

VIEW_W, VIEW_H = 1280, 800
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def _browser(tmp_path: Path):
    """A Selenium Chrome driver on Debian's chromium, or skip naming what is missing."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    chromium = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no Chromium browser/chromedriver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument(f"--window-size={VIEW_W},{VIEW_H}")
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    # The layout viewport exactly 1280x800 (the window size alone leaves it to the headless shell).
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": VIEW_W, "height": VIEW_H, "deviceScaleFactor": 1, "mobile": False},
    )
    return driver


# -- a demo-like segment output, made in code -----------------------------------------------------------------------
NUM_CLASSES = 21
ODD_ID = "$\\frac{a}{b}$ <b>=1+1</b> | `x`"  # math text, HTML, a formula and Markdown syntax in one id


def _timing_table(ids: list[str], statuses: list[str], rng: np.random.Generator, path: Path) -> pa.Table:
    """Rows' timing and node columns as the segment job writes them (float32), read back from Parquet."""
    n = len(ids)
    ok = np.array([s == S.OK for s in statuses])
    cols = {
        S.ID: ids,
        S.STATUS: statuses,
        "decode_s": rng.gamma(4, 0.002, n),
        "dcnn_s": np.where(ok, rng.gamma(6, 0.01, n), np.nan),
        "crf_s": np.where(ok, rng.gamma(5, 0.05, n), np.nan),
        "encode_s": np.where(ok, rng.gamma(3, 0.001, n), np.nan),
        "dcnn_node": [("a" * 40 if i % 2 else "b" * 40) if o else None for i, o in enumerate(ok)],
        "crf_node": [("c" * 40 if i % 3 else "d" * 40) if o else None for i, o in enumerate(ok)],
    }
    fields = [S.OUTPUT_SCHEMA.field(name) for name in cols]
    arrays = [
        pa.array(v, type=f.type, from_pandas=True) if f.type == pa.float32() else pa.array(v, type=f.type)
        for v, f in zip(cols.values(), fields, strict=True)
    ]
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path)
    return pq.read_table(path)


def make_demo_report(out: Path, *, count: int = 24, size: tuple[int, int] = (160, 120)) -> dict:
    """Write a demo-like report under ``out``; return what the page must show."""
    w, h = size
    rng = np.random.default_rng(7)
    acc = MetricsAccumulator(NUM_CLASSES, widths=tuple(range(1, 41)))
    scenes = {}
    ids = [f"scene_{i:04d}" for i in range(count)]
    ids[5] = ODD_ID
    for i, image_id in enumerate(ids):
        image, gt = make_scene(h, w, seed=i, num_classes=NUM_CLASSES)
        raw = (
            simulate_scores(gt, NUM_CLASSES, seed=100 + i, noise=1.0 + 0.1 * (i % 5))
            .argmax(0)
            .astype(np.uint8)
        )
        crf = simulate_scores(gt, NUM_CLASSES, seed=100 + i, noise=0.7 + 0.1 * (i % 5), stride=4)
        crf = crf.argmax(0).astype(np.uint8)
        acc.add_image(image_id, gt, raw, crf)
        scenes[image_id] = (image, gt, raw, crf)
    errors = {"broken_0": "decode_error", "broken_1": "decode_error", "gone_0": "read_error"}
    for image_id, status in errors.items():
        acc.add_error(image_id, status, "made in the test")
    metrics = build_metrics(
        acc,
        class_names=list(S.VOC_CLASSES),
        worst_k=8,
        output_uri=str(out),
        model_variants=["deeplab-largefov"],
    )
    ranked = [s for s in acc.sorted_images() if s.mean_iou is not None]
    chosen = [(s, "worst") for s in ranked[:3]] + [(s, "best") for s in reversed(ranked[-3:])]
    examples = [
        OverlayExample(s.image_id, kind, *scenes[s.image_id], s.mean_iou_raw, s.mean_iou_crf)
        for s, kind in chosen
    ]
    statuses = [S.OK] * count + list(errors.values())
    out.mkdir(parents=True, exist_ok=True)
    table = _timing_table(ids + list(errors), statuses, rng, out.parent / "timing.parquet")
    timing = summarize_timing(table, prices=Prices(), wall_s=42.0, wall_images=count + len(errors))
    run = run_facts(
        str(out),
        timing=timing,
        original_output="s3://demo-bucket/out",
        model_digests=["3f2a9c0d" * 8],
        written_utc=("2026-12-07 01:02", "2026-12-07 01:04"),
        report_utc="2026-12-07 02:00",
    )
    write_report(
        metrics,
        str(out),
        storage_cfg=StorageConfig(),
        examples=examples,
        per_image=acc.sorted_images(),
        run=run,
    )
    ok = table.filter(pc.equal(table[S.STATUS], S.OK))
    return {
        "median_dcnn": float(np.median(ok["dcnn_s"].to_numpy().astype(np.float64))),
        "median_crf": float(np.median(ok["crf_s"].to_numpy().astype(np.float64))),
    }


# -- the checks a reader's browser makes ----------------------------------------------------------------------------
_PAGE_FACTS = """
const imgs = Array.from(document.images).map(i => [i.id || i.alt, i.complete, i.naturalWidth]);
const rect = id => { const e = document.getElementById(id); return e ? [e.textContent, e.getBoundingClientRect().top] : null; };
const ids = arguments[0];
return {imgs: imgs, scrollWidth: document.documentElement.scrollWidth,
        headline: Object.fromEntries(ids.map(id => [id, rect(id)])), text: document.body.innerText};
"""


def _open(driver, html: Path, ids: list[str], screenshot: Path) -> dict:
    driver.get(html.as_uri())
    driver.execute_script("window.scrollTo(0, 0)")
    facts = driver.execute_script(_PAGE_FACTS, ids)
    driver.save_screenshot(str(screenshot))
    keep = os.environ.get("REPORT_SCREENSHOT_DIR")
    if keep:
        shutil.copy(screenshot, Path(keep) / screenshot.name)
    return facts


def _check_page(facts: dict, expected_headline: dict[str, str]) -> None:
    assert facts["imgs"], "the page has no images"
    broken = [name for name, complete, width in facts["imgs"] if not complete or width <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert facts["scrollWidth"] <= VIEW_W, f"page is {facts['scrollWidth']} px wide at a {VIEW_W} px viewport"
    for element_id, text in expected_headline.items():
        got = facts["headline"][element_id]
        assert got is not None, f"no element #{element_id}"
        assert got[0] == text, f"#{element_id} says {got[0]!r}, expected {text!r}"
        assert got[1] < VIEW_H, f"#{element_id} is at {got[1]} px, below the first screen"


def test_segment_report_in_chromium(tmp_path):
    driver = _browser(tmp_path)
    try:
        out = tmp_path / "local-copy" / "report"
        expected = make_demo_report(out)
        metrics = json.loads((out / "metrics.json").read_text())
        headline = {
            "miou-raw": f"{100 * metrics['raw']['mean_iou']:.2f}",
            "miou-crf": f"{100 * metrics['crf']['mean_iou']:.2f}",
            "pa-raw": f"{100 * metrics['raw']['pixel_accuracy']:.2f}",
            "pa-crf": f"{100 * metrics['crf']['pixel_accuracy']:.2f}",
            "num-images": str(metrics["num_images"]),
            "median-dcnn": fmt_seconds(expected["median_dcnn"]),
            "median-crf": fmt_seconds(expected["median_crf"]),
        }
        facts = _open(driver, out / "report.html", list(headline), tmp_path / "segment_report.png")
    finally:
        driver.quit()
    _check_page(facts, headline)
    assert len(facts["imgs"]) == 4 + 6  # four charts and six overlays (three worst, three best)
    text = facts["text"]
    assert "a copy of the output s3://demo-bucket/out" in text  # read from a local copy: the page says so
    assert ODD_ID in text  # the hostile id shown as the text it is (escaped, not markup)
    stage_row = next(line for line in text.splitlines() if line.startswith("DCNN\t"))
    assert fmt_seconds(expected["median_dcnn"]) in stage_row.split("\t")


def make_tune_doc(num_classes: int = 4) -> tuple[dict, list[dict]]:
    """A tuning.json document of a 2 x 2 grid + default and one refine round, as ``tune_crf`` writes it."""
    rng = np.random.default_rng(3)
    trials, rounds = [], []
    from pipeline.stages.crf import CRFConfig

    default = {**dataclasses.asdict(CRFConfig()), "bi_w": 4.0, "bi_xy_std": 67.0, "bi_rgb_std": 3.0}
    grids = [
        {"bi_w": [3.0, 6.0], "bi_xy_std": [30.0, 60.0], "bi_rgb_std": [5.0]},
        {"bi_w": [4.5, 6.0, 7.5], "bi_xy_std": [45.0, 60.0, 75.0], "bi_rgb_std": [5.0]},
    ]
    for r, values in enumerate(grids):
        base = {**default, "bi_rgb_std": 5.0}
        keys = []
        for combo in itertools.product(*values.values()):
            params = {**base, **dict(zip(values, combo, strict=True))}
            key = json.dumps([params[f] for f in ("bi_w", "bi_xy_std", "bi_rgb_std")])
            keys.append(key)
            if any(t["key"] == key for t in trials):
                continue
            miou = 0.6 + 0.02 * rng.standard_normal()
            trials.append({"key": key, "round": r, "params": params, "status": "ok", "mean_iou": miou,
                           "pixel_accuracy": 0.9, "seconds": 2.0 + rng.random(), "error": None,
                           "is_default": False, "run_id": "r1"})  # fmt: skip
        rounds.append({"round": r, "keys": keys})
    trials.append({"key": "default", "round": 0, "params": default, "status": "ok", "mean_iou": 0.59,
                   "pixel_accuracy": 0.89, "seconds": 2.2, "error": None, "is_default": True, "run_id": "r1"})  # fmt: skip
    best = max((t for t in trials if t["status"] == "ok"), key=lambda t: t["mean_iou"])
    widths = list(range(1, 41))
    curve = [0.3 + 0.3 * (1 - np.exp(-w / 8)) for w in widths]
    doc = {
        "schema_version": 1, "input": "s3://demo-bucket/voc", "input_format": "voc", "output": "/tmp/tune-out",
        "model": {"uri": "s3://demo-bucket/model.pt", "variant": "deeplab-largefov", "num_classes": num_classes,
                  "digest": "ab" * 32},
        "class_names": ["background", "a", "b", "c"],
        "images": {"requested": 20, "labelled_available": 40, "chosen": 20, "scored": 19, "ids": [], "excluded": []},
        "search": {}, "rounds": [{"round": r["round"], "num_trials": len(r["keys"])} for r in rounds],
        "trials": trials,
        "best": {"crf": best["params"], "mean_iou": best["mean_iou"], "pixel_accuracy": best["pixel_accuracy"],
                 "key": best["key"]},
        "default": {"crf": default, "mean_iou": 0.59, "pixel_accuracy": 0.89},
        "raw": {"mean_iou": 0.55, "pixel_accuracy": 0.87, "per_class_iou": [0.9, 0.5, 0.4, None]},
        "per_class_iou": {"default": [0.91, 0.52, 0.42, None], "best": [0.92, 0.55, 0.45, None]},
        "trimap": {"band_source": "void", "widths": widths, "raw": curve,
                   "default": [c + 0.02 for c in curve], "best": [c + 0.04 for c in curve]},
        "timing": {"run_id": "r1", "cpu_slots": 2.0, "dcnn_s": 3.5, "logits_cache_reused": False,
                   "search_wall_s": 20.0, "trials_total": len(trials), "trials_done_before": 0,
                   "trials_run": len(trials), "trials_per_s": len(trials) / 20.0, "evaluate_s": 4.0,
                   "trial_seconds_sum": sum(t["seconds"] for t in trials), "total_wall_s": 30.0},
        "logits_cache": "/tmp/tune-out/cache/x/logits.parquet",
        "mean_iou_protocol": "one confusion matrix summed over the scored images (void skipped), as metrics.json",
    }  # fmt: skip
    return doc, rounds


def test_tune_report_in_chromium(tmp_path):
    from pipeline.tune.report import render_reports

    doc, rounds = make_tune_doc()
    _, page, _ = render_reports(doc, rounds)
    html = tmp_path / "report.html"
    html.write_text(page)
    (tmp_path / "tuning.json").write_text(json.dumps(doc))
    doc = json.loads((tmp_path / "tuning.json").read_text())
    headline = {
        "miou-raw": f"{100 * doc['raw']['mean_iou']:.2f}",
        "miou-default": f"{100 * doc['default']['mean_iou']:.2f}",
        "miou-tuned": f"{100 * doc['best']['mean_iou']:.2f}",
    }
    driver = _browser(tmp_path)
    try:
        facts = _open(driver, html, list(headline), tmp_path / "tune_report.png")
    finally:
        driver.quit()
    _check_page(facts, headline)
    assert len(facts["imgs"]) == 3  # two heatmaps (rounds 0 and 1) and the trimap curve
