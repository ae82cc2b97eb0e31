"""pipeline/metrics/evaluate.py on hand-made outputs (local and on the moto S3 server): hand-computed numbers, Ray == local."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.metrics.evaluate import decode_label_png, evaluate_output
from pipeline.metrics.report import voc_palette
from pipeline.schema import OUTPUT_SCHEMA
from pipeline.storage import StorageConfig

V = 255
C = 3
# Image "a" (2x3) and "b" (2x2): ground truth, raw DCNN mask, CRF mask.
GT_A = np.array([[0, 0, 1], [V, 1, 2]], np.uint8)
RAW_A = np.array([[0, 1, 1], [0, 1, 0]], np.uint8)
CRF_A = np.array([[0, 0, 1], [2, 1, 1]], np.uint8)
GT_B = np.array([[2, 2], [0, V]], np.uint8)
RAW_B = np.array([[2, 0], [0, 1]], np.uint8)
CRF_B = np.array([[2, 2], [0, 0]], np.uint8)
# Summed by hand over the 8 non-void pixels (row = gt, column = prediction).
RAW_CONF = [[2, 1, 0], [0, 2, 0], [2, 0, 1]]
CRF_CONF = [[3, 0, 0], [0, 2, 0], [0, 1, 2]]
# Trimap, void source: a's band(1) = (0,0),(0,1),(1,1) [around its void pixel (1,0)], b's band(1) = its 3 pixels;
# band(2) covers every non-void pixel of both.
RAW_BAND1 = [[2, 1, 0], [0, 1, 0], [1, 0, 1]]
CRF_BAND1 = [[3, 0, 0], [0, 1, 0], [0, 0, 2]]


def _png(arr: np.ndarray, *, palette: bool = False) -> bytes:
    im = Image.fromarray(arr)
    if palette:
        im = im.convert("P")
        im.putpalette(voc_palette().ravel().tolist())
        im.frombytes(arr.tobytes())  # keep the indices: the palette only colours them
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(h: int, w: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return _png(arr)


def _row(
    image_id, source, label_source, status="ok", error=None, mask=None, raw=None, conf_raw=None, conf_crf=None
):
    return {
        "image_id": image_id,
        "source": source,
        "label_source": label_source,
        "height": None if mask is None else mask.shape[0],
        "width": None if mask is None else mask.shape[1],
        "status": status,
        "error": error,
        "retryable": False,
        "mask_png": None if mask is None else _png(mask),
        "raw_mask_png": None if raw is None else _png(raw),
        "confusion_raw": conf_raw,
        "confusion_crf": conf_crf,
        "num_classes": None if mask is None else C,
        "model_variant": None if mask is None else "DeepLab-LargeFOV",
        "crf_node": None if raw is None else "node-1",  # set by the CRF stage: the CRF ran on this row
    }


def _conf(gt, pred) -> list[int]:
    out = np.zeros((C, C), np.int64)
    for g, p in zip(gt.ravel(), pred.ravel(), strict=True):
        if g != V:
            out[g, p] += 1
    return out.ravel().tolist()


def make_output(root: str, cfg: StorageConfig, *, with_label_source: bool = True) -> str:
    """A finished output at ``root`` (two Parquet parts, labels, images); returns the labels prefix."""
    j = storage.join
    labels = j(root, "labels")
    for name, gt in (("a", GT_A), ("b", GT_B), ("d", GT_B)):
        storage.write_bytes(j(labels, f"{name}.png"), _png(gt, palette=True), cfg)
    storage.write_bytes(j(root, "images/a.png"), _rgb(2, 3, 0), cfg)
    storage.write_bytes(j(root, "images/b.png"), _rgb(2, 2, 1), cfg)

    def lab(name):
        return j(labels, f"{name}.png") if with_label_source else None

    part0 = [
        # stored raw confusion deliberately wrong: counted as a mismatch, never used for the numbers
        _row(
            "a",
            j(root, "images/a.png"),
            lab("a"),
            mask=CRF_A,
            raw=RAW_A,
            conf_raw=[0] * 9,
            conf_crf=_conf(GT_A, CRF_A),
        ),
        _row(
            "c", j(root, "images/c.jpg"), lab("c"), status="decode_error", error="cannot identify image file"
        ),
        _row("e", j(root, "images/e.png"), None, mask=CRF_B, raw=RAW_B),  # no ground truth
    ]
    part1 = [
        _row(
            "b",
            j(root, "images/b.png"),
            lab("b"),
            mask=CRF_B,
            raw=RAW_B,
            conf_raw=_conf(GT_B, RAW_B),
            conf_crf=_conf(GT_B, CRF_B),
        ),
        _row(
            "d",
            j(root, "images/d.png"),
            lab("d"),
            status="label_error",
            error="label size",
            mask=CRF_B,
            raw=RAW_B,
        ),
        _row(
            "f", j(root, "images/f.png"), lab("f") or j(labels, "f.png"), mask=CRF_B, raw=RAW_B
        ),  # label missing
    ]
    for k, rows in enumerate((part0, part1)):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf)
        storage.write_bytes(j(root, f"masks/part-{k:05d}.parquet"), buf.getvalue(), cfg)
    return labels


def _numbers(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("output_uri", "error_samples")}  # these name paths


def _check_hand_numbers(m: dict) -> None:
    assert m["raw"]["confusion"] == RAW_CONF and m["crf"]["confusion"] == CRF_CONF
    assert m["raw"]["per_class_iou"] == pytest.approx([2 / 5, 2 / 3, 1 / 3])
    assert m["raw"]["mean_iou"] == pytest.approx(7 / 15)
    assert m["raw"]["pixel_accuracy"] == pytest.approx(5 / 8)
    assert m["crf"]["per_class_iou"] == pytest.approx([1, 2 / 3, 2 / 3])
    assert m["crf"]["mean_iou"] == pytest.approx(7 / 9)
    assert m["crf"]["pixel_accuracy"] == pytest.approx(7 / 8)
    assert m["num_images"] == 2 and m["num_crf_images"] == 2
    assert m["num_errors"] == 2 and m["errors_by_status"] == {"decode_error": 1, "label_error": 1}
    assert m["num_unlabelled"] == 1 and m["num_eval_errors"] == 1
    assert m["num_classes"] == C and m["model_variants"] == ["DeepLab-LargeFOV"]
    t = m["trimap"]
    assert t["band_source"] == "void" and t["widths"] == [1, 2]
    assert t["raw"]["num_pixels"] == [6, 8]
    assert t["raw"]["mean_iou"][0] == pytest.approx((2 / 4 + 1 / 2 + 1 / 2) / 3)  # from RAW_BAND1
    assert t["crf"]["mean_iou"][0] == pytest.approx((1 + 1 + 1) / 3)  # CRF_BAND1 is diagonal
    assert t["raw"]["mean_iou"][1] == pytest.approx(7 / 15) and t["crf"]["mean_iou"][1] == pytest.approx(
        7 / 9
    )
    p = m["per_image"]
    assert [r["image_id"] for r in p["worst"]] == ["a"] and [r["image_id"] for r in p["best"]] == ["b"]
    assert p["worst"][0]["mean_iou_crf"] == pytest.approx(5 / 9) and p["worst"][0][
        "mean_iou_raw"
    ] == pytest.approx(1 / 3)
    assert p["best"][0]["mean_iou_raw"] == pytest.approx(1 / 2)  # class 1 absent from b: mean over 2 classes
    assert p["mean_iou_crf"]["count"] == 2 and p["mean_iou_crf"]["mean"] == pytest.approx((5 / 9 + 1) / 2)


def test_evaluate_local_hand_computed(tmp_path):
    cfg = StorageConfig()
    root = str(tmp_path / "out")
    make_output(root, cfg)
    m = evaluate_output(root, storage_cfg=cfg, widths=(1, 2), use_ray=False, worst_k=1, num_overlays=1)
    _check_hand_numbers(m)
    assert m["num_confusion_mismatches"] == 1  # row a's stored raw confusion was wrong
    report = tmp_path / "out" / "report"
    assert json.loads((report / "metrics.json").read_text()) == m
    html = (report / "report.html").read_text()
    assert "overlay_worst_0" in html and "overlay_best_0" in html
    assert (report / "figures" / "overlay_worst_0.png").stat().st_size > 0
    lines = (report / "per_image.csv").read_text().splitlines()
    assert lines[0].startswith("image_id") and [ln.split(",")[0] for ln in lines[1:]] == ["a", "b"]


def test_evaluate_labels_uri_and_forced_edges(tmp_path):
    cfg = StorageConfig()
    root = str(tmp_path / "out")
    labels = make_output(root, cfg, with_label_source=False)
    m = evaluate_output(
        root, storage_cfg=cfg, labels_uri=labels, widths=(1, 2), use_ray=False, write_report=False
    )
    assert m["raw"]["confusion"] == RAW_CONF and m["crf"]["confusion"] == CRF_CONF
    # e (no label_source) is now looked up under labels_uri and, like f, has no file there: both eval errors
    assert m["num_images"] == 2 and m["num_unlabelled"] == 0 and m["num_eval_errors"] == 2
    assert not (tmp_path / "out" / "report").exists()
    edges = evaluate_output(
        root,
        storage_cfg=cfg,
        labels_uri=labels,
        widths=(1, 2),
        use_ray=False,
        band_source="edges",
        write_report=False,
    )
    assert edges["trimap"]["band_source"] == "edges" and edges["raw"] == m["raw"]


def test_evaluate_crf_off_scores_raw_only(tmp_path):
    """As encode.py writes it with the CRF off: the DCNN mask in both PNG columns, no crf_node, no CRF confusion."""
    cfg = StorageConfig()
    root = tmp_path / "nocrf"
    storage.write_bytes(str(root / "labels" / "a.png"), _png(GT_A, palette=True), cfg)
    row = _row(
        "a", str(root / "a.png"), str(root / "labels" / "a.png"), mask=RAW_A, conf_raw=_conf(GT_A, RAW_A)
    )
    row["raw_mask_png"] = row["mask_png"]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=OUTPUT_SCHEMA), buf)
    storage.write_bytes(str(root / "masks" / "part-0.parquet"), buf.getvalue(), cfg)
    m = evaluate_output(str(root), storage_cfg=cfg, widths=(1,), use_ray=False)
    assert m["crf"] is None and m["num_crf_images"] == 0 and m["trimap"]["crf"] is None
    assert m["raw"]["confusion"] == np.array(_conf(GT_A, RAW_A)).reshape(C, C).tolist()
    assert m["num_confusion_mismatches"] == 0 and m["per_image"]["ranked_by"] == "raw"
    md = (root / "report" / "report.md").read_text()
    assert f"| DeepLab-LargeFOV | {100 * m['raw']['mean_iou']:.2f} | - |" in md


def test_evaluate_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        evaluate_output(str(tmp_path), storage_cfg=StorageConfig(), use_ray=False)
    with pytest.raises(ValueError, match="band_source"):
        evaluate_output(str(tmp_path), storage_cfg=StorageConfig(), use_ray=False, band_source="bands")


def test_decode_label_png_keeps_palette_indices():
    gt = np.array([[0, 15], [V, 20]], np.uint8)
    np.testing.assert_array_equal(decode_label_png(_png(gt, palette=True)), gt)
    with pytest.raises(ValueError, match="palette"):
        decode_label_png(_rgb(2, 2, 0))


def test_evaluate_s3_ray_equals_local(storage_cfg, bucket, ray_local, tmp_path):
    root = f"{bucket}/run1"
    make_output(root, storage_cfg)
    local = evaluate_output(
        root, storage_cfg=storage_cfg, widths=(1, 2), use_ray=False, worst_k=1, num_overlays=1
    )
    _check_hand_numbers(local)
    on_ray = evaluate_output(
        root, storage_cfg=storage_cfg, widths=(1, 2), use_ray=True, worst_k=1, num_overlays=1
    )
    assert on_ray == local  # exactly, floats included
    written = json.loads(storage.read_bytes(f"{root}/report/metrics.json", storage_cfg))
    assert written == on_ray
    html = storage.read_bytes(f"{root}/report/report.html", storage_cfg).decode()
    assert html.count('<img alt="overlay_') == 2
    # Same output on local disk gives the same numbers.
    make_output(str(tmp_path / "out"), StorageConfig())
    on_disk = evaluate_output(
        str(tmp_path / "out"),
        storage_cfg=StorageConfig(),
        widths=(1, 2),
        use_ray=True,
        worst_k=1,
        num_overlays=1,
        write_report=False,
    )
    assert _numbers(on_disk) == _numbers(local)


def test_evaluate_ray_many_rows_equals_local(ray_local, tmp_path):
    """Several files and batches: per-batch partials merged on the driver equal one local pass, to the bit."""
    cfg = StorageConfig()
    root = tmp_path / "big"
    rng = np.random.default_rng(5)
    for k in range(3):
        rows = []
        for i in range(40):
            gt = rng.integers(0, C, (4, 6)).repeat(3, 0).repeat(3, 1).astype(np.uint8)
            gt[rng.random(gt.shape) < 0.1] = V
            iid = f"p{k}_{i:03d}"
            storage.write_bytes(str(root / "labels" / f"{iid}.png"), _png(gt, palette=True), cfg)
            crf = np.where(rng.random(gt.shape) < 0.8, np.where(gt == V, 0, gt), 1).astype(np.uint8)
            raw = rng.integers(0, C, gt.shape).astype(np.uint8)
            rows.append(
                _row(iid, str(root / "img" / iid), str(root / "labels" / f"{iid}.png"), mask=crf, raw=raw)
            )
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf, row_group_size=16)
        storage.write_bytes(str(root / "masks" / f"part-{k}.parquet"), buf.getvalue(), cfg)
    local = evaluate_output(str(root), storage_cfg=cfg, use_ray=False, write_report=False)
    on_ray = evaluate_output(str(root), storage_cfg=cfg, use_ray=True, write_report=False)
    assert local["num_images"] == 120 and local["trimap"]["widths"] == list(range(1, 41))
    assert on_ray == local
