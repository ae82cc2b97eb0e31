"""Benchmark of the CRF stage: direct pydensecrf (paper settings, all labels, 10 iterations) vs pipeline.stages.crf.refine.

Three CRFs per image, on the same inputs, in one process, order alternated per image:

* **direct**: the textbook pydensecrf call a user writes (all labels, ``unary_from_softmax``, 10 iterations);
* **fixed**: the stage with label pruning and the paper's 10 iterations (``adaptive: false``);
* **stage**: the stage as configured by default (pruning + adaptive mean-field).

Data sets (500x375, the VOC size):

* ``scenes-6`` / ``scenes-21``: generated scenes (``pipeline.demo.scenes.make_scene``) with DeepLab-like coarse scores
  (``simulate_scores``) at 6 and 21 classes, mIoU against the scene labels;
* ``scenes-model``: the shipped demo model's (``pipeline/assets/demo-largefov.pt``, 6 classes) real softmax on
  6-class scenes, mIoU against the scene labels;
* with ``--photos DIR`` (every .png/.jpg in it, fitted to 500x375): ``photos-model``, the shipped model's softmax on
  the photos (6 labels; no ground truth, so mIoU is against the direct CRF's masks), and ``photos-21``: 21-class
  coarse scores simulated from a pseudo-label map that follows the photo's own colour regions (median-cut colours
  of a blurred copy, classes drawn per region), so boundaries and the bilateral lattice are a real photo's.

Prints per set: CRF core-seconds per image (``time.process_time``, single thread; the machine is shared, so
compare the ratios, measured side by side), the ratio direct / stage (bar: >= 1.3x at 6 labels, >= 2.5x at 21),
pixel agreement stage vs fixed and stage vs direct (bar: >= 99.9 %), mIoU of each, mean iterations run.

    python bench/crf.py [--images 8] [--photos DIR] [--sets scenes-6,scenes-21,...] [--no-model]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo.scenes import make_scene, simulate_scores  # noqa: E402
from pipeline.stages.crf import CRFConfig, crf_config_for, refine_detailed  # noqa: E402

HEIGHT, WIDTH = 375, 500
MODEL = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "demo-largefov.pt"
SETS = ("scenes-6", "scenes-21", "scenes-model", "photos-model", "photos-21")

# One input: (name, image uint8 (H, W, 3), probs float32 (C, H, W), ground truth uint8 (H, W) or None)
Sample = tuple[str, np.ndarray, np.ndarray, np.ndarray | None]


def direct_pydensecrf(
    image: np.ndarray, probs: np.ndarray, cfg: CRFConfig, iterations: int = 10
) -> np.ndarray:
    """The textbook pydensecrf call (all labels, unary_from_softmax, paper parameters): labels uint8 (H, W)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    num_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=cfg.pos_w, normalization=dcrf.NORMALIZE_AFTER)
    crf.addPairwiseBilateral(
        sxy=cfg.bi_xy_std,
        srgb=cfg.bi_rgb_std,
        rgbim=image,
        compat=cfg.bi_w,
        normalization=dcrf.NORMALIZE_AFTER,
    )
    q = np.array(crf.inference(iterations))  # (C, H*W)
    return q.argmax(axis=0).reshape(height, width).astype(np.uint8)


# --- inputs ----------------------------------------------------------------------------------------------------


def scene_samples(num_classes: int, count: int, seed: int) -> Iterator[Sample]:
    for i in range(count):
        image, label = make_scene(HEIGHT, WIDTH, seed=seed + i, num_classes=num_classes)
        yield f"scene{seed + i}", image, simulate_scores(label, num_classes, seed=seed + i), label


def model_probs(images: list[np.ndarray]) -> list[np.ndarray]:
    """The shipped demo model's softmax (C, H, W) per image, as the job computes it (stride 8, x8 upsampling)."""
    import torch

    from pipeline.model.inference import predict_probs
    from pipeline.model.weights import load_checkpoint

    torch.set_num_threads(1)
    model, _ = load_checkpoint(str(MODEL))
    return predict_probs(model, images, batch_size=2, min_input_size=1)


def model_scene_samples(count: int, seed: int) -> Iterator[Sample]:
    scenes = [make_scene(HEIGHT, WIDTH, seed=seed + i, num_classes=6) for i in range(count)]
    probs = model_probs([image for image, _ in scenes])
    for i, ((image, label), p) in enumerate(zip(scenes, probs, strict=True)):
        yield f"scene{seed + i}", image, p, label


def load_photos(folder: Path, count: int) -> list[tuple[str, np.ndarray]]:
    """Every .png/.jpg in ``folder`` (sorted, at most ``count``), centre-cropped and resized to 500x375 RGB."""
    from PIL import Image, ImageOps

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    if not paths:
        raise SystemExit(f"no .png/.jpg photos in {folder}")
    out = []
    for path in paths:
        with Image.open(path) as im:
            fitted = ImageOps.fit(im.convert("RGB"), (WIDTH, HEIGHT), Image.Resampling.LANCZOS)
            out.append((path.stem, np.array(fitted)))
    return out


def pseudo_label(image: np.ndarray, num_classes: int, seed: int, regions: int = 8) -> np.ndarray:
    """A label map (H, W) following the photo's colour regions: median-cut colours of a blurred, 1/4-size copy,
    each colour a class drawn at random (several regions may share one), upsampled nearest."""
    from PIL import Image, ImageFilter

    small = Image.fromarray(image).resize((WIDTH // 4, HEIGHT // 4), Image.Resampling.BILINEAR)
    quant = small.filter(ImageFilter.GaussianBlur(2)).quantize(
        colors=regions, method=Image.Quantize.MEDIANCUT
    )
    index = np.asarray(quant.filter(ImageFilter.ModeFilter(5)))  # (h, w) palette index
    classes = np.random.default_rng(seed).choice(num_classes, size=256)
    coarse = classes[index].astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.NEAREST))


def photo_samples(folder: Path, count: int, num_classes: int) -> Iterator[Sample]:
    for i, (name, image) in enumerate(load_photos(folder, count)):
        label = pseudo_label(image, num_classes, seed=i)
        yield name, image, simulate_scores(label, num_classes, seed=i), label


def model_photo_samples(folder: Path, count: int) -> Iterator[Sample]:
    photos = load_photos(folder, count)
    probs = model_probs([image for _, image in photos])
    for (name, image), p in zip(photos, probs, strict=True):
        yield name, image, p, None


def samples(name: str, args: argparse.Namespace) -> Iterator[Sample]:
    if name == "scenes-6":
        return scene_samples(6, args.images, args.seed)
    if name == "scenes-21":
        return scene_samples(21, args.images, args.seed)
    if name == "scenes-model":
        return model_scene_samples(args.images, args.seed)
    if name == "photos-model":
        return model_photo_samples(args.photos, args.images)
    if name == "photos-21":
        return photo_samples(args.photos, args.images, 21)
    raise SystemExit(f"unknown set {name!r}: expected one of {SETS}")


# --- scoring ---------------------------------------------------------------------------------------------------


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    valid = label != 255
    idx = label[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over the classes that occur (in ground truth or prediction)."""
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    present = denom > 0
    return float((tp[present] / denom[present]).mean())


@dataclasses.dataclass
class SetResult:
    cpu_s: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("direct", "fixed", "stage"), 0.0)
    )
    same_fixed: int = 0  # stage pixels equal to the fixed-schedule stage
    same_direct: int = 0  # stage pixels equal to direct pydensecrf
    same_fixed_direct: int = 0
    pixels: int = 0
    images: int = 0
    iterations: int = 0
    labels_kept: int = 0
    conf: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def run_set(name: str, args: argparse.Namespace, cfg: CRFConfig) -> SetResult:
    fixed_cfg = dataclasses.replace(cfg, adaptive=False)
    res = SetResult()
    print(
        f"\n[{name}]  {'image':<22} {'labels':>6} {'kept':>4} {'iters':>5} {'direct_s':>8} {'fixed_s':>7} "
        f"{'stage_s':>7} {'ratio':>5} {'=fixed %':>9} {'=direct %':>9}"
    )
    for i, (ident, image, probs, label) in enumerate(samples(name, args)):
        num_classes = probs.shape[0]
        runs: list[tuple[str, Callable[..., object], CRFConfig]] = [
            ("direct", direct_pydensecrf, cfg),
            ("fixed", refine_detailed, fixed_cfg),
            ("stage", refine_detailed, cfg),
        ]
        if i % 2:  # alternate the order so that no side always runs on a warmer cache
            runs.reverse()
        out, secs = {}, {}
        for side, fn, side_cfg in runs:
            c0 = time.process_time()
            out[side] = fn(image, probs, side_cfg)
            secs[side] = time.process_time() - c0
            res.cpu_s[side] += secs[side]
        direct, fixed, stage = out["direct"], out["fixed"].labels, out["stage"].labels
        same_f, same_d = int((stage == fixed).sum()), int((stage == direct).sum())
        res.same_fixed += same_f
        res.same_direct += same_d
        res.same_fixed_direct += int((fixed == direct).sum())
        res.pixels += direct.size
        res.images += 1
        res.iterations += out["stage"].iterations
        res.labels_kept += out["stage"].labels_kept
        truth = label if label is not None else direct
        for side, pred in (("direct", direct), ("fixed", fixed), ("stage", stage)):
            res.conf[side] = res.conf.get(side, 0) + confusion(pred, truth, num_classes)
        print(
            f"{'':>{len(name) + 3}}{ident[:22]:<22} {num_classes:>6} {out['stage'].labels_kept:>4} "
            f"{out['stage'].iterations:>5} {secs['direct']:>8.3f} {secs['fixed']:>7.3f} {secs['stage']:>7.3f} "
            f"{secs['direct'] / secs['stage']:>5.2f} {100 * same_f / direct.size:>9.4f} "
            f"{100 * same_d / direct.size:>9.4f}",
            flush=True,
        )
    return res


def print_summary(results: dict[str, SetResult], has_truth: dict[str, bool]) -> None:
    print(
        "\n| set | images | labels kept | iterations | direct core-s | fixed core-s | stage core-s | direct/stage "
        "| stage = fixed | stage = direct | mIoU direct / fixed / stage |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        n = max(r.images, 1)
        c = {k: v / n for k, v in r.cpu_s.items()}
        miou = " / ".join(f"{100 * mean_iou(r.conf[s]):.2f}" for s in ("direct", "fixed", "stage"))
        ref = "" if has_truth[name] else " (vs direct)"
        print(
            f"| {name} | {r.images} | {r.labels_kept / n:.1f} | {r.iterations / n:.1f} | {c['direct']:.3f} "
            f"| {c['fixed']:.3f} | {c['stage']:.3f} | **{c['direct'] / c['stage']:.2f}x** "
            f"| {100 * r.same_fixed / r.pixels:.4f} % | {100 * r.same_direct / r.pixels:.4f} % | {miou}{ref} |"
        )
    print(
        "bars: direct/stage >= 1.3x at 6 labels, >= 2.5x at 21; stage = fixed >= 99.9 %, mIoU within 0.05 points"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8, help="images per set (default 8)")
    p.add_argument(
        "--photos", type=Path, default=None, help="folder of photos: adds photos-model and photos-21"
    )
    p.add_argument("--sets", default=None, help=f"comma-separated subset of {','.join(SETS)}")
    p.add_argument("--no-model", action="store_true", help="skip the sets that run the shipped model")
    p.add_argument("--variant", default="deeplab-largefov", help="CRF parameters of this variant")
    p.add_argument("--seed", type=int, default=20150101, help="first scene seed")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="CRFConfig override for the stage, e.g. --set converge_changed_frac=2e-4 (repeatable)",
    )
    args = p.parse_args(argv)

    names = (
        args.sets.split(",") if args.sets else [s for s in SETS if args.photos or not s.startswith("photos")]
    )
    if args.no_model:
        names = [s for s in names if not s.endswith("model")]
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key] = (
            type(getattr(CRFConfig(), key))(value) if value not in ("true", "false") else value == "true"
        )
    cfg = crf_config_for(args.variant, **overrides)
    print(f"config: {cfg}")
    results = {name: run_set(name, args, cfg) for name in names}
    print_summary(results, {name: not name.startswith("photos-model") for name in names})
    return 0


if __name__ == "__main__":
    sys.exit(main())
