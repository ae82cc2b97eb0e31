"""Benchmark of the CRF stage: plain 21-label pydensecrf vs pipeline.crf.refine, side by side on the same inputs.

Inputs: generated 500x375 scenes (pipeline.scenes.make_scene) with DeepLab-like coarse 21-class scores
(simulate_scores, stride 8). Both sides use the same parameters (DeepLab-LargeFOV by default) and the same
normalisation (NORMALIZE_AFTER for the default "after"); the baseline has no pruning or padding. Prints per-image
times, the speed ratio (sum of plain times / sum of stage times, wall and CPU), pixel agreement of the two label maps, and the
mIoU of the raw argmax vs the CRF against the scene labels.

    python bench/crf.py [--images N] [--variant deeplab-largefov] [--prune-threshold T] [--pad 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.crf import CRFConfig, crf_config_for, refine  # noqa: E402
from pipeline.scenes import make_scene, simulate_scores  # noqa: E402

NUM_CLASSES = 21
HEIGHT, WIDTH = 375, 500


def plain_pydensecrf(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    """The textbook pydensecrf call (all labels, unary_from_softmax), same parameters as the stage."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    norm = {
        "after": dcrf.NORMALIZE_AFTER,
        "symmetric": dcrf.NORMALIZE_SYMMETRIC,
        "before": dcrf.NORMALIZE_BEFORE,
        "none": dcrf.NO_NORMALIZATION,
    }[cfg.normalization]
    num_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=cfg.pos_w, normalization=norm)
    crf.addPairwiseBilateral(
        sxy=cfg.bi_xy_std, srgb=cfg.bi_rgb_std, rgbim=image, compat=cfg.bi_w, normalization=norm
    )
    q = np.array(crf.inference(cfg.iterations))  # (C, H*W)
    return q.argmax(axis=0).reshape(height, width).astype(np.uint8)


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    valid = label != 255
    idx = label[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over the classes that occur (in ground truth or prediction)."""
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    present = denom > 0
    return float((tp[present] / denom[present]).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=12, help="number of scenes (default 12)")
    p.add_argument("--variant", default="deeplab-largefov", help="CRF parameters of this variant")
    p.add_argument("--prune-threshold", type=float, default=None, help="override the stage's threshold")
    p.add_argument("--pad", type=int, default=None, help="override pad_labels_to_multiple")
    p.add_argument("--seed", type=int, default=20150101, help="first scene seed")
    args = p.parse_args(argv)

    overrides = {}
    if args.prune_threshold is not None:
        overrides["prune_threshold"] = args.prune_threshold
    if args.pad is not None:
        overrides["pad_labels_to_multiple"] = args.pad
    cfg = crf_config_for(args.variant, **overrides)
    print(f"config: {cfg}")
    print(f"{args.images} scenes {WIDTH}x{HEIGHT}, {NUM_CLASSES} classes, seeds {args.seed}..")
    print(f"{'image':>5} {'labels kept':>11} {'plain_s':>8} {'stage_s':>8} {'ratio':>6} {'agree %':>9}")

    plain_times, stage_times = [], []
    cpu = {"plain": 0.0, "stage": 0.0}  # CPU seconds: steadier than wall time when the machine is shared
    num_same = num_pixels = 0
    conf_raw = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    conf_crf = np.zeros_like(conf_raw)
    for i in range(args.images):
        seed = args.seed + i
        image, label = make_scene(HEIGHT, WIDTH, seed=seed, num_classes=NUM_CLASSES)
        probs = simulate_scores(label, NUM_CLASSES, seed=seed)  # float32 (C, H, W)
        kept = int((probs.reshape(NUM_CLASSES, -1).max(axis=1) >= cfg.prune_threshold).sum())

        # Alternate the order so neither side always runs on a warmer cache.
        runs = [("plain", plain_pydensecrf), ("stage", refine)]
        if i % 2:
            runs.reverse()
        out, secs = {}, {}
        for name, fn in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            out[name] = fn(image, probs, cfg)
            secs[name] = time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
        plain_times.append(secs["plain"])
        stage_times.append(secs["stage"])
        same = int((out["plain"] == out["stage"]).sum())
        num_same += same
        num_pixels += label.size
        conf_raw += confusion(probs.argmax(axis=0), label)
        conf_crf += confusion(out["stage"], label)
        print(
            f"{i:>5} {kept:>11} {secs['plain']:>8.3f} {secs['stage']:>8.3f} "
            f"{secs['plain'] / secs['stage']:>6.2f} {100 * same / label.size:>9.4f}",
            flush=True,
        )

    ratio = sum(plain_times) / sum(stage_times)
    print(
        f"mean per image: plain {np.mean(plain_times):.3f} s, stage {np.mean(stage_times):.3f} s "
        f"(median ratio {np.median(np.array(plain_times) / np.array(stage_times)):.2f})"
    )
    print(
        f"speed ratio (total plain / total stage): {ratio:.2f}x wall, {cpu['plain'] / cpu['stage']:.2f}x CPU time"
        "   goal >= 1.8x"
    )
    print(f"pixel agreement stage vs plain: {100 * num_same / num_pixels:.4f} %   goal >= 99.99 %")
    print(
        f"mIoU vs scene labels: raw argmax {100 * mean_iou(conf_raw):.2f}, CRF {100 * mean_iou(conf_crf):.2f} "
        f"(margin {100 * (mean_iou(conf_crf) - mean_iou(conf_raw)):+.2f} points)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
