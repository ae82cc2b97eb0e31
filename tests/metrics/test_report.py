"""pipeline/metrics/report.py (and report_page, report_time): metrics.json content, self-contained HTML, Markdown and
figures from a known accumulator; hostile ids kept inert; where the time went from hand-made timing rows."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.metrics.confusion import MetricsAccumulator
from pipeline.metrics.page import csv_cell
from pipeline.metrics.report import (
    METRICS_SCHEMA_VERSION,
    OverlayExample,
    build_metrics,
    render_figures,
    voc_palette,
    write_report,
)
from pipeline.metrics.timing import Prices, run_facts, summarize_timing
from pipeline.storage import StorageConfig

V = 255
NAMES = ["background", "cat", "dog"]


def make_acc(*, with_crf: bool = True) -> MetricsAccumulator:
    """Three images with known per-image scores: 'good' (perfect), 'mid', 'bad'."""
    acc = MetricsAccumulator(3, widths=(1, 2, 5))
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 1
    gt[1, 1:7] = V  # a void stroke: the void band source applies
    perfect = np.where(gt == V, 0, gt).astype(np.uint8)
    mid = perfect.copy()
    mid[2:4, 2:6] = 2  # half the cat called dog
    bad = np.full_like(perfect, 2)
    for image_id, raw, crf in (("good", perfect, perfect), ("mid", bad, mid), ("bad", bad, bad)):
        acc.add_image(image_id, gt, raw, crf if with_crf else None)
    acc.add_error("broken", "decode_error", "truncated file")
    return acc


def _examples(acc: MetricsAccumulator) -> list[OverlayExample]:
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 1
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return [
        OverlayExample("bad", "worst", image, gt, np.full_like(gt, 2), np.full_like(gt, 2), 0.0, 0.0),
        OverlayExample("good", "best", None, gt, gt, gt, 1.0, 1.0),  # image unreadable: masks only
    ]


def test_build_metrics_content():
    acc = make_acc()
    m = build_metrics(acc, class_names=NAMES, worst_k=1, output_uri="/x", model_variants=["DeepLab"])
    assert m["schema_version"] == METRICS_SCHEMA_VERSION
    assert m["num_images"] == 3 and m["num_errors"] == 1 and m["errors_by_status"] == {"decode_error": 1}
    assert m["raw"]["confusion"] == acc.confusion["raw"].tolist()
    assert len(m["raw"]["per_class_iou"]) == 3 and m["crf"]["mean_iou"] is not None
    assert m["trimap"]["band_source"] == "void" and m["trimap"]["widths"] == [1, 2, 5]
    assert len(m["trimap"]["raw"]["mean_iou"]) == 3 and len(m["trimap"]["crf"]["pixel_accuracy"]) == 3
    assert [r["image_id"] for r in m["per_image"]["worst"]] == ["bad"]
    assert [r["image_id"] for r in m["per_image"]["best"]] == ["good"]
    assert m["per_image"]["mean_iou_crf"]["count"] == 3 and m["per_image"]["mean_iou_crf"]["max"] == 1.0
    assert sum(m["per_image"]["mean_iou_crf"]["histogram"]["counts"]) == 3
    json.dumps(m, allow_nan=False)  # strict JSON: absent values are null, never NaN
    with pytest.raises(ValueError, match="class_names"):
        build_metrics(acc, class_names=["a"])


def test_build_metrics_without_crf_and_forced_edges():
    m = build_metrics(make_acc(with_crf=False), class_names=NAMES, band_source="edges")
    assert m["crf"] is None and m["trimap"]["crf"] is None and m["num_crf_images"] == 0
    assert m["trimap"]["band_source"] == "edges" and m["per_image"]["ranked_by"] == "raw"


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_write_report_files_parse_and_hold_the_figures(tmp_path):
    acc = make_acc()
    m = build_metrics(acc, class_names=NAMES, worst_k=2, output_uri=str(tmp_path), model_variants=["DeepLab"])
    written = write_report(
        m,
        str(tmp_path / "report"),
        storage_cfg=StorageConfig(),
        examples=_examples(acc),
        per_image=acc.sorted_images(),
    )
    report = tmp_path / "report"
    assert json.loads((report / "metrics.json").read_text()) == m
    assert set(written) >= {"metrics.json", "report.md", "report.html", "per_image.csv", "figures/trimap.png"}

    html = (report / "report.html").read_text()
    parser = _Collector()
    parser.feed(html)
    imgs = [a["src"] for t, a in parser.tags if t == "img"]
    expected = {"class_iou", "confusion", "trimap", "per_image", "overlay_worst_0", "overlay_best_0"}
    assert len(imgs) == len(expected)
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    # Self-contained: no external resource, no script.
    assert not any(t in ("script", "link", "iframe") for t, _ in parser.tags)
    assert not re.search(r"(src|href)=\"(https?:|//)", html)
    # The paper-style table, with the numbers in percent.
    assert "<th>model</th><th>no CRF</th><th>CRF</th>" in html
    assert (
        f"<td>DeepLab</td><td>{100 * m['raw']['mean_iou']:.2f}</td><td>{100 * m['crf']['mean_iou']:.2f}</td>"
        in html
    )
    assert "<td>2 dog</td>" in html  # per-class table

    md = (report / "report.md").read_text()
    assert "| model | no CRF | CRF |" in md and f"| DeepLab | {100 * m['raw']['mean_iou']:.2f} |" in md
    figure_refs = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert {Path(f).stem for f in figure_refs} == expected
    for ref in figure_refs:  # overlays are flat colours: small PNGs, still whole images
        assert (report / ref).stat().st_size > (100 if "overlay" in ref else 1000)
    csv_lines = (report / "per_image.csv").read_text().splitlines()
    assert [ln.split(",")[0] for ln in csv_lines[1:]] == ["bad", "mid", "good"]  # worst first


def test_render_figures_without_crf_shows_dashes(tmp_path):
    m = build_metrics(make_acc(with_crf=False), class_names=NAMES)
    figs = render_figures(m)
    assert set(figs) == {"class_iou", "confusion", "trimap", "per_image"}
    write_report(m, str(tmp_path), storage_cfg=StorageConfig())
    md = (tmp_path / "report.md").read_text()
    assert f"| model | {100 * m['raw']['mean_iou']:.2f} | - |" in md


def test_write_report_rejects_wrong_schema(tmp_path):
    m = build_metrics(make_acc(), class_names=NAMES)
    with pytest.raises(ValueError, match="schema_version"):
        write_report({**m, "schema_version": 0}, str(tmp_path), storage_cfg=StorageConfig())


def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert (
        pal[0].tolist() == [0, 0, 0]
        and pal[1].tolist() == [128, 0, 0]
        and pal[15].tolist() == [192, 128, 128]
    )
    assert pal[255].tolist() == [224, 224, 192]


# -- untrusted ids and class names ---------------------------------------------------------------------------------
HOSTILE_ID = "=HYPERLINK(1) $\\frac{1}{$ <script>x</script> | *b* [l](u) `c`"


def test_hostile_ids_are_plain_text_everywhere(tmp_path):
    acc = make_acc()
    gt = np.zeros((8, 8), np.uint8)
    acc.add_image(HOSTILE_ID, gt, gt, gt)
    names = ["background", "$\\frac{1}{$", "<b>dog</b>"]  # class names are text from a checkpoint
    m = build_metrics(acc, class_names=names, worst_k=8, output_uri=str(tmp_path))
    example = OverlayExample(HOSTILE_ID, "best", None, gt, gt, gt, 1.0, 1.0)
    # Without the plain-text guard matplotlib parses the class name as (broken) math text and raises.
    from pipeline.metrics.figures import class_iou_figure

    with pytest.raises(ValueError):
        class_iou_figure(m)
    write_report(
        m, str(tmp_path), storage_cfg=StorageConfig(), examples=[example], per_image=acc.sorted_images()
    )

    page = (tmp_path / "report.html").read_text()
    parser = _Collector()
    parser.feed(page)
    assert not any(t in ("script", "b") for t, _ in parser.tags)  # the id's and the name's markup stay text
    assert html_escape(HOSTILE_ID) in page

    md = (tmp_path / "report.md").read_text()
    assert "<script>" not in md and "<b>" not in md
    row = next(line for line in md.splitlines() if "HYPERLINK" in line and line.startswith("|"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 4  # three cells: the id's "|" is escaped
    assert "\\$\\\\frac{1}{\\$" in md and "\\*b\\*" in md and "\\[l\\](u)" in md and "\\`c\\`" in md

    cells = {r[0] for r in csv.reader(io.StringIO((tmp_path / "per_image.csv").read_text()))}
    assert "'" + HOSTILE_ID in cells and HOSTILE_ID not in cells  # starts with "=": a leading apostrophe


@pytest.mark.parametrize("text", ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"])
def test_csv_cell_guards_formula_starts(text):
    assert csv_cell(text) == "'" + text
    assert csv_cell("a=1") == "a=1" and csv_cell("scene_0001") == "scene_0001"


# -- where the time went -------------------------------------------------------------------------------------------
def _timing_rows() -> list[dict]:
    rows = [
        {"status": "ok", "decode_s": 0.01, "dcnn_s": d, "crf_s": c, "encode_s": 0.002,
         "dcnn_node": node, "crf_node": "crf-a"}
        for d, c, node in ((0.1, 0.5, "gpu-a"), (0.2, 0.7, "gpu-a"), (0.4, 0.9, "gpu-b"))
    ]  # fmt: skip
    rows.append({"status": "dcnn_error", "decode_s": 9.0, "dcnn_s": 9.0, "crf_s": None, "encode_s": None,
                 "dcnn_node": "gpu-b", "crf_node": None})  # fmt: skip
    return rows


def test_summarize_timing_from_rows():
    prices = Prices(dcnn_worker_hour_usd=3.6, cpu_core_hour_usd=0.36)
    t = summarize_timing(_timing_rows(), prices=prices, wall_s=2.0, wall_images=4)
    stage = {s["stage"]: s for s in t["stages"]}
    assert t["ok_rows"] == 3  # the failed row's seconds are left out
    assert stage["DCNN"]["median_s"] == pytest.approx(0.2) and stage["CRF"]["median_s"] == pytest.approx(0.7)
    assert stage["DCNN"]["p90_s"] == pytest.approx(np.percentile(np.float32([0.1, 0.2, 0.4]), 90))
    assert sum(s["share"] for s in t["stages"]) == pytest.approx(1.0)
    assert stage["CRF"]["share"] == pytest.approx(2.1 / (0.03 + 0.7 + 2.1 + 0.006), rel=1e-6)
    assert [n["node"] for n in t["nodes"]["dcnn_node"]] == ["gpu-a", "gpu-b"] and t["several_nodes"]
    assert t["nodes"]["dcnn_node"][1]["images"] == 1 and t["nodes"]["dcnn_node"][1][
        "median_s"
    ] == pytest.approx(0.4)
    assert t["job"] == {"wall_s": 2.0, "images": 4, "images_per_s": 2.0}
    # USD per million = mean seconds x 1e6 / 3600 x price per hour: DCNN 0.7/3 s at $3.6/h -> $233.33
    cost = t["cost"]["usd_per_million_by_stage"]
    assert cost["DCNN"] == pytest.approx(0.7 / 3 * 1e6 / 3600 * 3.6, rel=1e-6)
    assert cost["CRF"] == pytest.approx(0.7 * 1e6 / 3600 * 0.36, rel=1e-6)
    assert t["cost"]["usd_per_million"] == pytest.approx(sum(cost.values()))
    with pytest.raises(ValueError, match="cpu_core_hour_usd"):
        Prices(cpu_core_hour_usd=-1)


def test_report_answers_first_and_md_keeps_the_page_order(tmp_path):
    acc = make_acc()
    m = build_metrics(acc, class_names=NAMES, output_uri=str(tmp_path), model_variants=["DeepLab"])
    run = run_facts(
        str(tmp_path), timing=summarize_timing(_timing_rows()), original_output="s3://gone-bucket/out",
        model_digests=["ab" * 32], written_utc=("2026-01-02 03:04", "2026-01-02 03:09"),
    )  # fmt: skip
    write_report(m, str(tmp_path), storage_cfg=StorageConfig(), examples=_examples(acc), run=run)
    assert json.loads((tmp_path / "run.json").read_text()) == run
    page = (tmp_path / "report.html").read_text()
    header = page[page.index("<header") : page.index("</header>")]
    assert f'<span id="miou-raw">{100 * m["raw"]["mean_iou"]:.2f}</span>' in header
    assert f'<span id="miou-crf">{100 * m["crf"]["mean_iou"]:.2f}</span>' in header
    assert '<span id="median-dcnn">0.2</span>' in header and '<span id="median-crf">0.7</span>' in header
    assert "a copy of the output s3://gone-bucket/out" in header and "sha256 abababababab" in header
    assert "1 error rows (decode_error 1)" in header and "2026-01-02 03:04 to 2026-01-02 03:09 UTC" in header
    # Each table beside its figure: the per-class table and the class_iou bars share one .pair block.
    per_class = page[page.index('<section id="classes">') : page.index('<section id="metrics">')]
    assert 'class="pair"' in per_class and 'id="fig-class_iou"' in per_class and "<td>2 dog</td>" in per_class
    trimap = page[page.index('<section id="trimap">') : page.index('<section id="images">')]
    assert 'id="fig-trimap"' in trimap and "<th>band pixels</th>" in trimap
    # report.md: the same sections in the same order.
    md = (tmp_path / "report.md").read_text()
    html_titles = re.findall(r"<h2>([^<]+)</h2>", page)
    md_titles = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert md_titles == html_titles and html_titles[-2:] == ["Where the time went", "Rows"]
    assert md.index("Mean IoU") < md.index("## Per-class IoU") and "| DCNN | 3 | 0.2 |" in md


def test_evaluate_output_reports_run_facts_from_the_rows(tmp_path):
    """evaluate_output on a hand-made output: timing from the rows, digest, and a local copy named as one."""
    from pipeline.metrics.evaluate import evaluate_output
    from pipeline.schema import OUTPUT_SCHEMA

    root = tmp_path / "copy"
    gt = np.zeros((4, 4), np.uint8)
    gt[1:3, 1:3] = 1
    label = root / "labels" / "a.png"
    label.parent.mkdir(parents=True)
    Image.fromarray(gt).save(label)
    buf = io.BytesIO()
    Image.fromarray(gt).save(buf, format="PNG")
    rows = []
    for i, (dcnn_s, crf_s) in enumerate(((0.25, 1.5), (0.5, 2.5), (1.0, 3.5))):
        rows.append({
            "image_id": f"img{i}", "source": str(root / "missing.jpg"), "label_source": str(label), "status": "ok",
            "retryable": False, "mask_png": buf.getvalue(), "raw_mask_png": buf.getvalue(), "num_classes": 3,
            "model_variant": "DeepLab", "model_digest": "cd" * 32, "decode_s": 0.01, "dcnn_s": dcnn_s,
            "crf_s": crf_s, "encode_s": 0.01, "dcnn_node": "n1", "crf_node": "n1",
        })  # fmt: skip
    (root / "masks").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), root / "masks" / "part-0.parquet")
    manifest = {
        "config": {"write": {"output_uri": "s3://bucket/out"}},
        "run": {"wall_s": 3.0, "processed": 3},
    }
    (root / "_manifest.json").write_text(json.dumps(manifest))
    m = evaluate_output(str(root), storage_cfg=StorageConfig(), widths=(1,), use_ray=False, num_overlays=1)
    run = json.loads((root / "report" / "run.json").read_text())
    assert run["read_from"] == str(root) and run["original_output"] == "s3://bucket/out"
    assert run["model_digests"] == ["cd" * 32] and run["written_utc"] is not None
    stage = {s["stage"]: s for s in run["timing"]["stages"]}
    assert stage["DCNN"]["median_s"] == 0.5 and stage["CRF"]["median_s"] == 2.5
    assert run["timing"]["job"]["images_per_s"] == pytest.approx(1.0)
    page = (root / "report" / "report.html").read_text()
    assert f"Read from {root}, a copy of the output s3://bucket/out." in page
    assert '<span id="median-crf">2.5</span>' in page
    assert "run.json" not in json.dumps(m) and set(m) == set(
        json.loads((root / "report" / "metrics.json").read_text())
    )
