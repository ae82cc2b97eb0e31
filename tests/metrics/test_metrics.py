"""pipeline/metrics/confusion.py: hand-computed confusions and IoUs, trimap bands against explicit dilation, accumulator sums."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.metrics.confusion import (
    MetricsAccumulator,
    band_confusions,
    band_distance,
    chessboard_distance,
    choose_band_source,
    confusion_matrix,
    image_mean_iou,
    label_edges,
    summarize,
    trimap_band,
)

V = 255
GT = np.array([[0, 0, 1, V], [0, 1, 1, V], [2, 2, 1, 1]], np.uint8)
PRED = np.array([[0, 1, 1, 0], [0, 1, 2, 3], [2, 0, 1, 1]], np.uint8)  # class 3 only under void
CONF = np.array([[2, 1, 0, 0], [0, 4, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])


def test_confusion_matrix_hand_computed_skips_void():
    conf = confusion_matrix(GT, PRED, 4)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, CONF)
    assert conf.sum() == 10  # 12 pixels, 2 void


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="must be < 3"):
        confusion_matrix(np.array([[0, 3]], np.uint8), np.array([[0, 0]], np.uint8), 3)
    with pytest.raises(ValueError, match="prediction values"):
        confusion_matrix(np.array([[0, 1]], np.uint8), np.array([[0, 7]], np.uint8), 3)
    with pytest.raises(ValueError, match="size"):
        confusion_matrix(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), 3)


def test_summarize_hand_computed_absent_class_is_none_not_zero():
    s = summarize(CONF)
    assert s["per_class_iou"][:3] == pytest.approx([2 / 4, 4 / 6, 1 / 3])  # TP / (gt + pred - TP)
    assert s["per_class_iou"][3] is None and s["absent_classes"] == [3]
    assert s["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 3) / 3)  # absent class left out, not a 0
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    assert s["per_class_accuracy"] == pytest.approx([2 / 3, 4 / 5, 1 / 2, None])
    assert s["mean_accuracy"] == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
    assert s["fw_iou"] == pytest.approx((3 * 1 / 2 + 5 * 2 / 3 + 2 * 1 / 3) / 10)
    assert s["num_pixels"] == 10


def test_summarize_predicted_but_not_in_gt_counts_as_zero():
    conf = np.array([[3, 1], [0, 0]])  # class 1 predicted once, never in the ground truth
    s = summarize(conf)
    assert s["per_class_iou"] == [0.75, 0.0]
    assert s["mean_iou"] == pytest.approx(0.375)
    assert s["per_class_accuracy"] == [0.75, None] and s["mean_accuracy"] == 0.75
    assert image_mean_iou(conf) == pytest.approx(0.375)


def test_summarize_empty_is_none():
    s = summarize(np.zeros((3, 3), np.int64))
    assert s["mean_iou"] is None and s["pixel_accuracy"] is None and s["fw_iou"] is None
    assert s["per_class_iou"] == [None, None, None]


def test_trimap_band_around_void_column():
    gt = np.zeros((9, 9), np.uint8)
    gt[:, 4] = V
    b1 = trimap_band(gt, 1)
    assert np.array_equal(np.nonzero(b1.any(axis=0))[0], [3, 5]) and b1[:, [3, 5]].all()
    b2 = trimap_band(gt, 2)
    assert np.array_equal(np.nonzero(b2.any(axis=0))[0], [2, 3, 5, 6]) and b2.sum() == 36


def test_trimap_band_square_around_void_pixel():
    gt = np.ones((9, 9), np.uint8)
    gt[4, 4] = V
    assert trimap_band(gt, 1).sum() == 8  # 3x3 square minus the void pixel
    assert trimap_band(gt, 2).sum() == 24  # auto: the label has void -> void band
    assert not trimap_band(gt, 3)[4, 4]


def test_trimap_band_from_label_edges():
    gt = np.ones((6, 8), np.uint8)
    gt[:, 4:] = 2  # vertical edge between columns 3 and 4, no void
    assert np.array_equal(np.nonzero(label_edges(gt).any(axis=0))[0], [3, 4])
    b1 = trimap_band(gt, 1, source="edges")
    b2 = trimap_band(gt, 2, source="edges")
    assert np.array_equal(np.nonzero(b1.any(axis=0))[0], [3, 4]) and b1.sum() == 12
    assert np.array_equal(np.nonzero(b2.any(axis=0))[0], [2, 3, 4, 5]) and b2.sum() == 24
    assert not trimap_band(gt, 3, source="void").any()  # no void, no void band
    np.testing.assert_array_equal(trimap_band(gt, 2), b2)  # auto: no void pixel -> edges


def _dilate_slow(seeds: np.ndarray, r: int) -> np.ndarray:
    """Explicit dilation by a (2r+1)-square: OR of every shifted copy."""
    h, w = seeds.shape
    padded = np.pad(seeds, r)
    out = np.zeros_like(seeds)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= padded[r + dy : r + dy + h, r + dx : r + dx + w]
    return out


def _edges_slow(gt: np.ndarray) -> np.ndarray:
    h, w = gt.shape
    out = np.zeros(gt.shape, bool)
    for y in range(h):
        for x in range(w):
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and V not in (gt[y, x], gt[ny, nx]) and gt[y, x] != gt[ny, nx]:
                    out[y, x] = True
    return out


def _random_label(rng, h, w, c):
    gt = rng.integers(0, c, (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w].astype(np.uint8)
    gt[rng.random((h, w)) < 0.05] = V
    return gt


def test_chessboard_distance_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(30):
        h, w = rng.integers(1, 20, 2)
        seeds = rng.random((h, w)) < 0.05
        d = chessboard_distance(seeds)
        ys, xs = np.nonzero(seeds)
        if not len(ys):
            assert (d == h + w).all()
            continue
        yy, xx = np.mgrid[:h, :w]
        ref = np.maximum(abs(yy[..., None] - ys), abs(xx[..., None] - xs)).min(-1)
        np.testing.assert_array_equal(d, ref)


@pytest.mark.parametrize("source", ["void", "edges"])
def test_band_confusions_equal_explicit_dilation(source):
    rng = np.random.default_rng(7)
    c = 4
    widths = [1, 2, 3, 5, 8, 13]
    for _ in range(12):
        h, w = rng.integers(5, 30, 2)
        gt = _random_label(rng, h, w, c)
        pred = rng.integers(0, c, (h, w)).astype(np.uint8)
        got = band_confusions(gt, pred, widths, c, source=source)
        assert got.shape == (len(widths), c, c) and got.dtype == np.int64
        seeds = gt == V if source == "void" else _edges_slow(gt)
        if source == "edges":
            np.testing.assert_array_equal(label_edges(gt), seeds)
        for k, wd in enumerate(widths):
            band = _dilate_slow(seeds, wd if source == "void" else wd - 1) & (gt != V)
            np.testing.assert_array_equal(trimap_band(gt, wd, source=source), band)
            np.testing.assert_array_equal(got[k], confusion_matrix(np.where(band, gt, V), pred, c))


def test_band_confusions_wide_band_is_whole_image_confusion():
    rng = np.random.default_rng(3)
    gt = _random_label(rng, 20, 25, 3)
    gt[0, 0] = V
    pred = rng.integers(0, 3, gt.shape).astype(np.uint8)
    got = band_confusions(gt, pred, [40], 3)
    np.testing.assert_array_equal(got[0], confusion_matrix(gt, pred, 3))
    with pytest.raises(ValueError, match="widths"):
        band_confusions(gt, pred, [0, 1], 3)
    with pytest.raises(ValueError, match="band source"):
        band_distance(gt, "bogus")


def test_choose_band_source():
    assert choose_band_source(5, 10) == "void"
    assert choose_band_source(4, 10) == "edges"
    assert choose_band_source(0, 0) == "edges"


def test_accumulator_sums_merges_and_pickles():
    rng = np.random.default_rng(11)
    c, widths = 3, (1, 4)
    images = []
    for i in range(6):
        gt = _random_label(rng, 12, 10, c)
        images.append((f"img{i}", gt, rng.integers(0, c, gt.shape).astype(np.uint8), gt.copy()))
    whole = MetricsAccumulator(c, widths)
    parts = [MetricsAccumulator(c, widths), MetricsAccumulator(c, widths)]
    for k, (iid, gt, raw, crf) in enumerate(images):
        whole.add_image(iid, gt, raw, crf)
        parts[k % 2].add_image(iid, gt, raw, crf, stored_raw=[0] * 9 if k == 0 else None)
    parts[1].add_error("bad", "decode_error", "truncated")
    merged = pickle.loads(pickle.dumps(parts[0])).merge(parts[1])
    np.testing.assert_array_equal(merged.confusion["raw"], whole.confusion["raw"])
    np.testing.assert_array_equal(merged.trimap["void"]["crf"], whole.trimap["void"]["crf"])
    np.testing.assert_array_equal(merged.trimap["edges"]["raw"], whole.trimap["edges"]["raw"])
    expect = sum(confusion_matrix(gt, raw, c) for _, gt, raw, _ in images)
    np.testing.assert_array_equal(merged.confusion["raw"], expect)
    assert merged.num_images == 6 and merged.num_crf_images == 6 and merged.num_errors == 1
    assert merged.errors_by_status == {"decode_error": 1} and merged.num_confusion_mismatches == 1
    assert [s.image_id for s in merged.sorted_images()] == [s.image_id for s in whole.sorted_images()]
    assert merged.sorted_images()[-1].mean_iou_crf == 1.0  # crf == gt: perfect, so ranked last
    with pytest.raises(ValueError, match="different setups"):
        merged.merge(MetricsAccumulator(c, (1, 2)))


def test_accumulator_rejects_bad_image_without_partial_update():
    acc = MetricsAccumulator(2, (1,))
    with pytest.raises(ValueError):
        acc.add_image(
            "x", np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8), np.full((2, 2), 5, np.uint8)
        )
    assert acc.num_images == 0 and acc.confusion["raw"].sum() == 0
