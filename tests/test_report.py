"""pipeline/report.py: metrics.json content, self-contained HTML, Markdown and figures from a known accumulator."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.metrics import MetricsAccumulator
from pipeline.report import (
    METRICS_SCHEMA_VERSION,
    OverlayExample,
    build_metrics,
    render_figures,
    voc_palette,
    write_report,
)
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
    for ref in figure_refs:
        assert (report / ref).stat().st_size > 1000
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
