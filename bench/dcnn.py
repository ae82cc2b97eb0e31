"""Benchmark of the DCNN stage on CPU: float32 vs bf16 autocast, contiguous vs channels_last, 1 vs 2 threads.

Runs ``pipeline.stages.dcnn.DeepLabPredictor`` (the stage itself: preprocessing, forward at 513x513, x8 upsampling, argmax,
float16 logits) on generated 500x375 scenes for every setting, side by side in one run. Prints images/s, the
speed-up over the float32 / contiguous / 1-thread reference, CPU core-seconds per image (all threads; much
less sensitive to other load on the machine than wall time) with its speed-up, and agreement with the reference: the share of
``raw_mask`` pixels with the same label, and the largest absolute difference of the stride-8 logits relative to
their range.

Model: DeepLab-LargeFOV with channel counts scaled by each ``--widths`` value (1 = the real network), random init
with a confident classifier (as bench/pipeline.py), or ``--model PATH`` for a real checkpoint.

Also prints the GPU plan's arithmetic (docs/performance.md): FLOPs of the full-width DeepLab-LargeFOV at 513x513
counted from the model itself (forward hooks on a meta-device copy: no compute), expected images/s per GPU from
published dense peak rates at a stated utilisation, and CPU cores per GPU for a given CRF cost.

    python bench/dcnn.py [--images 4] [--widths 0.125,0.5] [--threads 1,2] [--model PATH]
    python bench/dcnn.py --plan-only [--crf-core-s 0.41]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.pipeline import NUM_CLASSES, SIZE, bench_checkpoint, model_classes, uptime, wait_for_load  # noqa: E402
from pipeline import schema as S  # noqa: E402
from pipeline.demo.scenes import make_scene  # noqa: E402
from pipeline.stages.dcnn import DCNNConfig, DeepLabPredictor  # noqa: E402

# Published dense peak TFLOPS (NVIDIA datasheets; no sparsity): (FP32 CUDA cores, FP16 tensor cores).
# A10G is AWS's A10 derivative (g5); its FP16 tensor rate is commonly given as ~70 dense, below the A10's 125.
GPUS = {"T4": (8.1, 65.0), "A10G": (31.2, 70.0), "L4": (30.3, 121.0)}
# Share of peak a conv net reaches at batch 4-8, 513x513 (dilated 3x3 convs, cuDNN): our planning assumption.
UTILISATION = {"fp32": 0.5, "fp16": 0.35}

SETTINGS = [  # (autocast, channels_last)
    ("none", False),
    ("none", True),
    ("bf16", False),
    ("bf16", True),
]


def batch_of(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    n = len(images)
    return {
        S.ID: np.array([f"img{i}" for i in range(n)], dtype=object),
        S.STATUS: np.array([S.OK] * n, dtype=object),
        S.ERROR: np.array([None] * n, dtype=object),
        S.IMAGE: S.object_column(images),
    }


def run(model: str, images: list[np.ndarray], *, autocast: str, channels_last: bool, threads: int) -> dict:
    cfg = DCNNConfig(
        model_uri=model, device="cpu", autocast=autocast, channels_last=channels_last, num_threads=threads
    )
    predictor = DeepLabPredictor(cfg)
    predictor(batch_of(images[:1]))  # warm-up: oneDNN picks and caches its kernels on the first call
    t0, c0 = time.perf_counter(), time.process_time()
    out = predictor(batch_of(images))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert set(out[S.STATUS]) == {S.OK}, out[S.ERROR]
    return {
        "images_per_s": len(images) / wall,
        "core_s": cpu / len(images),  # CPU time of all threads: barely moved by other load, unlike wall time
        "masks": list(out[S.RAW_MASK]),
        "logits": [np.asarray(x, dtype=np.float32) for x in out[S.LOGITS]],
    }


def conv_flops(model: torch.nn.Module, height: int, width: int) -> int:
    """FLOPs (2 x multiply-adds) of every convolution for one (height, width) input, counted on a meta-device copy."""
    import copy

    total = 0

    def hook(module: torch.nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += 2 * output.numel() * k  # bias and ReLU are negligible next to this

    meta = copy.deepcopy(model).to("meta")
    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        meta(torch.empty(1, 3, height, width, device="meta"))
    for h in handles:
        h.remove()
    return total


def gpu_plan(crf_core_s: float, *, size: int = 513) -> None:
    from pipeline.model.deeplab import build_model

    model = build_model("deeplab-largefov", num_classes=NUM_CLASSES, width=1.0)
    gflop = conv_flops(model, size, size) / 1e9
    print(
        f"\nGPU plan: deeplab-largefov (full width, 21 classes) at {size}x{size}: {gflop:.1f} GFLOP per image"
    )
    print(
        f"  utilisation assumed: fp32 {UTILISATION['fp32']:.0%}, fp16 tensor {UTILISATION['fp16']:.0%} of peak"
    )
    print(f"  CRF cost {crf_core_s:.3f} core-s per image (bench/pipeline.py) -> cores per GPU to keep up")
    print(f"  {'GPU':<6}{'fp32 img/s':>11}{'cores':>7}{'fp16 img/s':>12}{'cores':>7}")
    for name, (fp32, fp16) in GPUS.items():
        r32 = fp32 * 1e12 * UTILISATION["fp32"] / (gflop * 1e9)
        r16 = fp16 * 1e12 * UTILISATION["fp16"] / (gflop * 1e9)
        print(f"  {name:<6}{r32:>11.0f}{r32 * crf_core_s:>7.0f}{r16:>12.0f}{r16 * crf_core_s:>7.0f}")
    small = build_model("deeplab-largefov", num_classes=NUM_CLASSES, width=0.125)
    print(f"  (the width-1/8 bench model: {conv_flops(small, size, size) / 1e9:.2f} GFLOP per image)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4, help="scenes per setting (default 4)")
    p.add_argument(
        "--widths", default="0.125,0.5", help="channel scales of the built-in model, comma-separated"
    )
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    p.add_argument("--model", default=None, help="a checkpoint to use instead of the built-in models")
    p.add_argument("--wait-load", type=float, default=None, help="wait until the load average is below this")
    p.add_argument(
        "--crf-core-s", type=float, default=0.41, help="CRF core-seconds per image for the GPU plan"
    )
    p.add_argument("--plan-only", action="store_true", help="print the GPU plan and exit")
    args = p.parse_args(argv)

    if args.plan_only:
        gpu_plan(args.crf_core_s)
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    classes = model_classes(args.model) if args.model else NUM_CLASSES
    images = [make_scene(SIZE[1], SIZE[0], seed=100 + i, num_classes=classes)[0] for i in range(args.images)]
    load = wait_for_load(args.wait_load)
    print(
        f"{args.images} scenes {SIZE[0]}x{SIZE[1]} per setting, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"start: {uptime()}")
    with tempfile.TemporaryDirectory(prefix="bench-dcnn-") as tmp:
        if args.model:
            models = [(args.model, args.model)]
        else:
            widths = [float(w) for w in args.widths.split(",")]
            models = [(f"largefov width {w:g}", bench_checkpoint(Path(tmp), w)) for w in widths]
        for name, path in models:
            print(f"\n{name}:")
            print(f"  {'autocast':<9}{'layout':<15}{'threads':>7}{'images/s':>10}{'speed-up':>10}"
                  f"{'core-s/img':>12}{'speed-up':>10}{'mask agree':>12}{'logit err':>11}")  # fmt: skip
            ref = None
            for n_threads, (autocast, channels_last) in itertools.product(threads, SETTINGS):
                r = run(path, images, autocast=autocast, channels_last=channels_last, threads=n_threads)
                ref = ref or r
                agree = np.mean([(a == b).mean() for a, b in zip(r["masks"], ref["masks"], strict=True)])
                err = max(
                    float(np.abs(a - b).max() / (np.ptp(b) or 1.0))
                    for a, b in zip(r["logits"], ref["logits"], strict=True)
                )
                layout = "channels_last" if channels_last else "contiguous"
                print(
                    f"  {autocast:<9}{layout:<15}{n_threads:>7}{r['images_per_s']:>10.2f}"
                    f"{r['images_per_s'] / ref['images_per_s']:>9.2f}x{r['core_s']:>12.3f}"
                    f"{ref['core_s'] / r['core_s']:>9.2f}x{agree:>11.4%}{err:>11.2e}",
                    flush=True,
                )
    print(f"\nend: {uptime()}  (load average at start {load:.2f})")
    print("reference (speed-up 1.00x, agreement 100 %): float32, contiguous, first thread count")
    gpu_plan(args.crf_core_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
