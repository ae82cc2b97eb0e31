"""Benchmark of the CRF backends side by side on this CPU: pydensecrf (C++) vs the torch backend (pipeline.stages.crf_torch).

Same inputs, same parameters (the variant's paper values, normalisation "after"), four runs per image:

* ``direct``: the textbook pydensecrf call (all labels, unary_from_softmax, fixed iterations): the reference.
* ``torch-full``: the torch backend through ``crf.refine`` without pruning: the same model as ``direct``.
* ``stage``: ``crf.refine`` with the stage's defaults on pydensecrf (pruning, padding, adaptive iterations).
* ``torch-stage``: ``crf.refine`` with the stage's defaults on the torch backend (pruning; fixed iterations).

Prints per image the CPU seconds of each (process CPU time: pydensecrf is one thread, torch uses ``--threads``)
and the share of pixels equal to ``direct``; then per run ms/image, the ratio to ``direct``, agreement and the mean
IoU against the labels (scene labels, or pseudo labels from the photo's colour regions). ``--memory`` adds the
torch backend's peak resident memory per image size (a child process per size).

    python bench/crf_backends.py [--images 4] [--labels 21] [--variant deeplab-largefov] [--photos DIR]
        [--threads 1] [--memory]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo.scenes import make_scene, simulate_scores  # noqa: E402
from pipeline.stages.crf import CRFConfig, crf_config_for, refine  # noqa: E402

HEIGHT, WIDTH = 375, 500  # PASCAL VOC's typical size
RUNS = ("direct", "torch-full", "stage", "torch-stage")


def direct_pydensecrf(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    """The textbook pydensecrf call with the config's parameters: labels (H, W)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    norm = {"after": dcrf.NORMALIZE_AFTER, "symmetric": dcrf.NORMALIZE_SYMMETRIC}[cfg.normalization]
    num_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=cfg.pos_w, normalization=norm)
    crf.addPairwiseBilateral(
        sxy=cfg.bi_xy_std, srgb=cfg.bi_rgb_std, rgbim=image, compat=cfg.bi_w, normalization=norm
    )
    return np.array(crf.inference(cfg.iterations)).argmax(axis=0).reshape(height, width).astype(np.uint8)


def run_configs(cfg: CRFConfig) -> dict[str, CRFConfig | None]:
    full = dataclasses.replace(cfg, backend="torch", prune_threshold=0.0, pad_labels_to_multiple=1)
    return {
        "direct": None,
        "torch-full": full,
        "stage": cfg,
        "torch-stage": dataclasses.replace(cfg, backend="torch"),
    }


# --- inputs ----------------------------------------------------------------------------------------------------


def scene_samples(num_labels: int, count: int, seed: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for i in range(count):
        image, label = make_scene(HEIGHT, WIDTH, seed=seed + i, num_classes=num_labels)
        yield f"scene{seed + i}", image, label


def photo_samples(folder: Path, count: int, num_labels: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Every .png/.jpg in ``folder`` (sorted, at most ``count``) fitted to 500x375, with pseudo labels: the photo's
    median-cut colour regions (blurred, mode-filtered), each region a label drawn at random."""
    from PIL import Image, ImageFilter, ImageOps

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    if not paths:
        raise SystemExit(f"no .png/.jpg photos in {folder}")
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            fitted = ImageOps.fit(im.convert("RGB"), (WIDTH, HEIGHT), Image.Resampling.LANCZOS)
        small = fitted.resize((WIDTH // 4, HEIGHT // 4), Image.Resampling.BILINEAR).filter(
            ImageFilter.GaussianBlur(2)
        )
        index = np.asarray(
            small.quantize(colors=8, method=Image.Quantize.MEDIANCUT).filter(ImageFilter.ModeFilter(5))
        )
        classes = np.random.default_rng(i).choice(num_labels, size=256).astype(np.uint8)
        label = np.asarray(Image.fromarray(classes[index]).resize((WIDTH, HEIGHT), Image.Resampling.NEAREST))
        yield path.stem, np.array(fitted), label


# --- scoring ---------------------------------------------------------------------------------------------------


def confusion(pred: np.ndarray, label: np.ndarray, num_labels: int) -> np.ndarray:
    valid = label < num_labels
    idx = label[valid].astype(np.int64) * num_labels + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def mean_iou(conf: np.ndarray) -> float:
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return float((tp[union > 0] / union[union > 0]).mean())


def run_samples(args: argparse.Namespace, cfg: CRFConfig) -> None:
    configs = run_configs(cfg)
    cpu = dict.fromkeys(RUNS, 0.0)
    same = dict.fromkeys(RUNS, 0)
    conf = {r: np.zeros((args.labels, args.labels), np.int64) for r in RUNS}
    worst = dict.fromkeys(RUNS, 1.0)
    pixels = count = 0
    source = (
        photo_samples(args.photos, args.images, args.labels)
        if args.photos
        else scene_samples(args.labels, args.images, args.seed)
    )
    print(
        f"{'image':<14} "
        + " ".join(f"{r + ' s':>13}" for r in RUNS)
        + "  "
        + " ".join(f"{'=direct ' + r[:11]:>19}" for r in RUNS[1:])
    )
    for i, (name, image, label) in enumerate(source):
        probs = simulate_scores(label, args.labels, seed=args.seed + i)
        out, secs = {}, {}
        for run, run_cfg in configs.items():
            t0 = time.process_time()
            out[run] = (
                direct_pydensecrf(image, probs, cfg) if run_cfg is None else refine(image, probs, run_cfg)
            )
            secs[run] = time.process_time() - t0
            cpu[run] += secs[run]
            conf[run] += confusion(out[run], label, args.labels)
        agree = {r: float((out[r] == out["direct"]).mean()) for r in RUNS}
        for r in RUNS:
            same[r] += int((out[r] == out["direct"]).sum())
            worst[r] = min(worst[r], agree[r])
        pixels += label.size
        count += 1
        print(
            f"{name:<14} "
            + " ".join(f"{secs[r]:>13.3f}" for r in RUNS)
            + "  "
            + " ".join(f"{100 * agree[r]:>18.4f}%" for r in RUNS[1:]),
            flush=True,
        )
    miou_direct = mean_iou(conf["direct"])
    print(
        f"\n{count} images of {WIDTH}x{HEIGHT}, {args.labels} labels, {args.variant}, torch threads {args.threads}"
    )
    print(
        f"{'run':<12} {'ms/image':>9} {'x direct':>9} {'=direct %':>10} {'worst img %':>12} {'mIoU':>7} {'dmIoU pts':>9}"
    )
    for r in RUNS:
        ms = 1000 * cpu[r] / max(1, count)
        miou = mean_iou(conf[r])
        print(
            f"{r:<12} {ms:>9.0f} {cpu[r] / max(1e-9, cpu['direct']):>9.2f} {100 * same[r] / max(1, pixels):>10.4f} "
            f"{100 * worst[r]:>12.4f} {100 * miou:>7.2f} {100 * (miou - miou_direct):>+9.3f}"
        )


# --- the torch backend on a device (bench/gpu_check.py) -------------------------------------------------


def crf_samples(count: int, *, seed: int = 300, size: tuple[int, int] = (HEIGHT, WIDTH)) -> list[tuple]:
    """(image, probs) pairs: 21-label scenes with DeepLab-like scores, tiled up to ``size`` (H, W)."""
    out = []
    reps = (-(-size[0] // HEIGHT), -(-size[1] // WIDTH))
    for i in range(count):
        image, label = make_scene(HEIGHT, WIDTH, seed=seed + i, num_classes=21)
        probs = simulate_scores(label, 21, seed=seed + i)
        image = np.tile(image, (*reps, 1))[: size[0], : size[1]].copy()
        out.append((image, np.tile(probs, (1, *reps))[:, : size[0], : size[1]].copy()))
    return out


def timed_crf(images: list, probs_dev: list, cfg, device: str) -> tuple:
    """(labels per image, seconds, peak device GiB above the inputs) of one torch-backend CRF call on ``device``
    (several images: one batch, as the DCNN actor refines a sub-batch)."""
    import torch

    from pipeline.stages.crf_torch import refine_probs_batch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    labels = refine_probs_batch(images, probs_dev, cfg)  # returns host labels: synchronised
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else float("nan")
    return labels, seconds, peak


# --- memory ----------------------------------------------------------------------------------------------------


def peak_rss_child(image: np.ndarray, probs: np.ndarray, variant: str, workdir: Path) -> dict:
    """Peak resident memory of one torch-backend CRF (unpruned, 2 iterations) in a fresh process whose only other
    allocations are the inputs, loaded from .npy files (so the high-water mark before the CRF is theirs)."""
    np.save(workdir / "image.npy", image)
    np.save(workdir / "probs.npy", probs)
    code = f"""
import json, resource, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import numpy as np, torch
torch.set_num_threads(1)
from pipeline.stages.crf import crf_config_for, refine
image, probs = np.load({str(workdir / "image.npy")!r}), np.load({str(workdir / "probs.npy")!r})
cfg = crf_config_for({variant!r}, backend="torch", prune_threshold=0.0, pad_labels_to_multiple=1, iterations=2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.process_time()
refine(image, probs, cfg)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"crf_mib": (peak - base) / 1024, "cpu_s": time.process_time() - t0}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory(args: argparse.Namespace) -> None:
    import tempfile

    print(
        f"\ntorch backend peak memory on the CPU ({args.labels} labels, unpruned, {args.variant}, 2 iterations)"
    )
    print(f"{'size':>11} {'CRF MiB':>8} {'bytes/pixel':>12} {'CPU s':>6}")
    image, label = make_scene(HEIGHT, WIDTH, seed=1, num_classes=args.labels)
    probs = simulate_scores(label, args.labels, seed=1)
    with tempfile.TemporaryDirectory(prefix="crf-memory-") as tmp:
        for scale in (1, 2, 4):  # tiles of the VOC-size scene: 500x375, 1000x750, 2000x1500
            big_image = np.tile(image, (scale, scale, 1))
            r = peak_rss_child(big_image, np.tile(probs, (1, scale, scale)), args.variant, Path(tmp))
            pixels = big_image.shape[0] * big_image.shape[1]
            print(
                f"{big_image.shape[1]:>5}x{big_image.shape[0]:<5} {r['crf_mib']:>8.0f} "
                f"{r['crf_mib'] * 2**20 / pixels:>12.0f} {r['cpu_s']:>6.2f}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4, help="0: skip the side-by-side run")
    p.add_argument("--labels", type=int, default=21)
    p.add_argument("--variant", default="deeplab-largefov")
    p.add_argument("--photos", type=Path, default=None, help="folder of photos (default: generated scenes)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--memory", action="store_true", help="also the torch backend's peak memory per image size"
    )
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.images:
        run_samples(args, crf_config_for(args.variant))
    if args.memory:
        run_memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
