"""GPU check: the measurement the first GPU machine runs, replacing the paper plan of docs/performance.md.

One command, on one GPU, in ~4-7 minutes (bar: 10). Prints a table per check and exits 0 when all pass, 1 when
any fails, 2 when torch sees no CUDA device (one line says why; nothing else runs):

1. **Device**: GPU, compute capability, memory, driver, torch / CUDA / cuDNN versions, native bf16.
2. **Agreement**: the DCNN stage (``pipeline.stages.dcnn.DeepLabPredictor``) on CUDA in float32, fp16 and bf16 autocast
   against float32 on the CPU, for the shipped demo checkpoint (``pipeline/assets/demo-largefov.pt``) and a
   full-width DeepLab-LargeFOV (random init, confident classifier, as ``bench/pipeline.py``), on 500x375 scenes.
   Share of ``raw_mask`` pixels with the CPU's label (bars: float32 99.9 %, fp16 99.5 %, bf16 99 %), and the largest
   stride-8 logit difference relative to the logits' range. bf16 on a GPU without it: the predictor must refuse
   it (checked), the row says so.
3. **Throughput**: the DCNN stage of the full-width model at 513x513 (500x375 images padded to Caffe's crop,
   ``min_input_size=None``) per batch size and precision: images/s (the whole stage: preprocessing, copy,
   forward, upsampling, argmax, copy back, with ``torch.cuda.synchronize``) and peak CUDA memory. A batch that runs
   out of memory is reported as such (the stage itself falls back to smaller sub-batches).
3b. **Out of memory** (CUDA only): more 12-MP photos in one batch than the GPU holds, no pixel budget: every row
   must end ok through smaller sub-batches.
4. **CRF CPUs per GPU**: the dense CRF's core-seconds per image on this host's CPU (thread CPU time, the full
   model's fp32 logits) x the best images/s of step 3 = the CRF vCPUs one GPU keeps busy.
5. **End to end**: ``pipeline.segment.run_segment`` on a local Ray with this GPU (``num_gpus=1``): every row ok,
   the DCNN pool planned on the GPU, images/s and per-stage seconds.
6. **CRF on the GPU** (``crf.backend: torch``, ``crf.device: cuda``; runs right after step 1): the torch backend
   on 500x375 21-label scenes at LargeFOV's parameters, unpruned and with the stage's pruning: ms per image on the
   GPU, pixels equal to pydensecrf on the CPU (bar 99.9 %), peak CUDA memory; then 21 labels unpruned at
   500x375 .. 4000x3000 (ms, peak memory, the first size out of memory); after step 4, **DCNN + CRF** in one
   ``DeepLabPredictor`` on the GPU: images/s against the DCNN alone, with 0 CRF CPU cores.

    python bench/gpu_check.py [--images 4] [--batch-sizes 1,2,4,8,16] [--job-images 64] [--crf-images 4]
    python bench/gpu_check.py --crf-only     # step 6 alone: ~1-2 minutes

``--device cpu`` runs the same steps with the CPU standing in for the GPU (a smoke test of this script on a
machine without CUDA, with ``--width`` and ``--size`` to keep it short); its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = ROOT / "pipeline" / "assets" / "demo-largefov.pt"
SCENE_HW = (375, 500)  # PASCAL VOC's typical size: padded to 513x513
BARS = {"none": 0.999, "fp16": 0.995, "bf16": 0.99}  # raw-mask pixel agreement with float32 on the CPU
PRECISIONS = ("none", "fp16", "bf16")


def no_cuda_reason() -> str | None:
    """None when torch can use a CUDA device; else why not, in one line."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as e:  # the driver's own reason
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: {e}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    sys.stdout.flush()


def device_info(device: str) -> dict:
    import torch

    info = {
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "cuDNN": torch.backends.cudnn.version(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {
            "GPU": props.name,
            "compute capability": f"{props.major}.{props.minor}",
            "memory": f"{props.total_memory / 2**30:.1f} GiB",
            "native bf16": torch.cuda.is_bf16_supported(including_emulation=False),
            "GPUs visible": torch.cuda.device_count(),
        }
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["driver"] = out.stdout.strip() or out.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["driver"] = f"nvidia-smi failed: {e}"
    info["CPU cores (this host)"] = os.cpu_count()
    return info


def scene_batch(count: int, num_classes: int, *, seed: int = 1) -> dict:
    import numpy as np

    from pipeline import schema as S
    from pipeline.demo.scenes import make_scene

    images = np.empty(count, dtype=object)
    for i in range(count):
        images[i] = make_scene(*SCENE_HW, seed=seed + i, num_classes=num_classes)[0]
    return {
        S.ID: np.array([f"img{i}" for i in range(count)], dtype=object),
        S.STATUS: np.array([S.OK] * count, dtype=object),
        S.ERROR: np.array([None] * count, dtype=object),
        S.IMAGE: images,
    }


def predictor(model: str, device: str, autocast: str = "none", **kw):
    from pipeline.stages.dcnn import DCNNConfig, DeepLabPredictor

    return DeepLabPredictor(DCNNConfig(model_uri=model, device=device, autocast=autocast, **kw))


def compare(ref: dict, out: dict) -> tuple[float, float, int]:
    """(raw-mask pixel agreement, max |logit diff| / logit range, rows not ok)."""
    import numpy as np

    from pipeline import schema as S

    same = total = 0
    rel = 0.0
    for a, b in zip(ref[S.RAW_MASK], out[S.RAW_MASK], strict=True):
        if a.shape == b.shape and a.size:
            same += int((a == b).sum())
        total += a.size
    for a, b in zip(ref[S.LOGITS], out[S.LOGITS], strict=True):
        if a.shape == b.shape and a.size:
            a32, b32 = a.astype(np.float32), b.astype(np.float32)
            rel = max(rel, float(np.abs(a32 - b32).max() / max(1e-6, float(a32.max() - a32.min()))))
    bad = int(sum(s != S.OK for s in out[S.STATUS]))
    return same / max(1, total), rel, bad


def check_agreement(models: dict[str, str], device: str, num_images: int) -> list[str]:
    import torch

    from pipeline.model.weights import load_checkpoint

    failures, rows = [], []
    bf16_ok = device != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    for name, path in models.items():
        num_classes = int(load_checkpoint(path)[1]["num_classes"])
        batch = scene_batch(num_images, num_classes)
        kw: dict = {}
        t0 = time.perf_counter()
        ref = predictor(path, "cpu", **kw)(batch)
        cpu_s = time.perf_counter() - t0
        for precision in PRECISIONS:
            label = "fp32" if precision == "none" else precision
            if precision == "bf16" and not bf16_ok:
                try:
                    predictor(path, device, precision, **kw)
                    rows.append([name, label, "accepted on a GPU without bf16", "", "", "", "FAIL"])
                    failures.append(f"{name} {label}: accepted on a GPU without native bf16")
                except ValueError as e:
                    rows.append([name, label, "refused (no native bf16)", "", "", "", f"ok: {str(e)[:60]}"])
                continue
            pred = predictor(path, device, precision, **kw)
            out = pred(batch)
            agree, rel, bad = compare(ref, out)
            ok = bad == 0 and agree >= BARS[precision]
            rows.append(
                [
                    name,
                    label,
                    f"{100 * agree:.3f} %",
                    f"{rel:.2e}",
                    bad,
                    f"{cpu_s / num_images:.2f}",
                    "ok" if ok else "FAIL",
                ]
            )
            if not ok:
                failures.append(
                    f"{name} {label}: agreement {100 * agree:.3f} % (bar {100 * BARS[precision]:g}), {bad} rows not ok"
                )
            del pred
    table(
        f"Agreement with float32 on the CPU ({num_images} scenes of {SCENE_HW[1]}x{SCENE_HW[0]})",
        [
            "model",
            "precision",
            "raw-mask pixels equal",
            "max logit diff / range",
            "rows not ok",
            "CPU s/image",
            "result",
        ],
        rows,
    )
    return failures


def check_throughput(
    model: str, device: str, batch_sizes: list[int], min_time_s: float
) -> tuple[list[str], dict]:
    import torch

    from pipeline.model.weights import load_checkpoint

    num_classes = int(load_checkpoint(model)[1]["num_classes"])
    side = 513  # the 500x375 scenes' padded size
    rows, best, failures = [], {}, []
    precisions = ["none", "fp16"]
    if device != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False):
        precisions.append("bf16")
    for precision in precisions:
        label = "fp32" if precision == "none" else precision
        for b in batch_sizes:
            pred = predictor(  # min_input_size=None: Caffe's 513 crop, whatever the job's default padding
                model, device, precision, batch_size=b, max_batch_pixels=b * side * side, min_input_size=None
            )
            batch = scene_batch(b, num_classes, seed=100)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            pred(batch)  # warm-up: cuDNN picks its algorithms for this shape
            n_iter, t0 = 0, time.perf_counter()
            while n_iter < 3 or time.perf_counter() - t0 < min_time_s:
                out = pred(batch)
                n_iter += 1
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            rate = b * n_iter / wall
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            split = pred.max_batch_pixels is not None and pred.max_batch_pixels < b * side * side
            not_ok = int(sum(s != "ok" for s in out["status"]))
            note = "out of memory: ran as smaller sub-batches" if split else ""
            if not_ok:
                note = f"{not_ok} rows not ok"
                failures.append(f"throughput {label} batch {b}: {not_ok} rows not ok")
            rows.append([label, b, f"{rate:.1f}", f"{peak:.2f}", note])
            if not split and not not_ok:
                best[label] = max(best.get(label, 0.0), rate)
            del pred
            if split:
                break  # larger batches only run out of memory too
    table(
        f"DCNN stage throughput at {side}x{side} ({num_classes} classes)",
        ["precision", "batch", "images/s", "peak CUDA memory (GiB)", "note"],
        rows,
    )
    return failures, best


def check_out_of_memory(model: str) -> list[str]:
    """Real out-of-memory on the GPU: a batch of 12-MP photos (4000x3000, padded to 4001x3001, ~5.7 GiB each at
    conv1_2 in float32) larger than the GPU holds, with no pixel budget. The stage must halve the sub-batch and end
    every row ok (or, when one photo alone does not fit, mark only that image's row)."""
    import numpy as np
    import torch

    from pipeline import schema as S
    from pipeline.demo.scenes import make_scene

    total = torch.cuda.get_device_properties(0).total_memory
    n = min(8, int(total // (5.7 * 2**30)) + 2)  # more photos than fit at once
    image = np.tile(make_scene(375, 500, seed=7, num_classes=21)[0], (8, 8, 1))  # 3000x4000
    batch = scene_batch(n, 21)
    for i in range(n):
        batch[S.IMAGE][i] = image
    pred = predictor(model, "cuda", batch_size=n, max_batch_pixels=None)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = pred(batch)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    status = [str(x) for x in out[S.STATUS]]
    too_big = [e for e in out[S.ERROR] if e and e.startswith("out of memory for one")]
    halved = pred.max_batch_pixels is not None
    ok = all(st == S.OK for st in status) or len(too_big) == status.count(S.ErrorKind.DCNN)
    table(
        f"Out of memory: {n} photos of 4000x3000 in one batch, no pixel budget",
        ["rows ok", "rows too large alone", "sub-batch after OOM (images)", "seconds", "peak GiB", "result"],
        [
            [
                status.count(S.OK),
                len(too_big),
                pred.max_batch_pixels // (4001 * 3001) if halved else "no OOM",
                f"{wall:.1f}",
                f"{torch.cuda.max_memory_allocated() / 2**30:.1f}",
                "ok" if ok else "FAIL",
            ]
        ],
    )
    return [] if ok else [f"out of memory: statuses {status}, errors {list(out[S.ERROR])[:2]}"]


def crf_core_seconds(model: str, num_images: int) -> float:
    """CRF core-seconds per image on this host (one thread's CPU time), on the model's fp32 CPU logits."""
    from pipeline.config import resolve_crf
    from pipeline.flow import _take
    from pipeline.model.weights import load_checkpoint
    from pipeline.stages.crf import CRFRefiner

    meta = load_checkpoint(model)[1]
    cfg, crf_raw = job_config_for("unused", "unused", model)
    crf_cfg = resolve_crf(cfg, meta["variant"], crf_raw).crf
    batch = predictor(model, "cpu")(scene_batch(num_images, int(meta["num_classes"]), seed=200))
    refiner = CRFRefiner(crf_cfg)
    refiner(_take(batch, 0))  # imports, first allocation
    t0 = time.thread_time()
    for i in range(num_images):
        refiner(_take(batch, i))
    return (time.thread_time() - t0) / num_images


def job_config_for(input_uri: str, output_uri: str, model: str, **extra):
    from pipeline.config import load_job_config

    return load_job_config(input=input_uri, output=output_uri, model=model, evaluate=False, **extra)


def check_crf_feed(model: str, best: dict) -> list[str]:
    core_s = crf_core_seconds(model, 4)
    rows = [[label, f"{rate:.1f}", f"{core_s:.3f}", f"{rate * core_s:.1f}"] for label, rate in best.items()]
    table(
        "CRF vCPUs one GPU keeps busy (images/s x CRF core-s per image on this host's CPU)",
        ["DCNN precision", "best images/s", "CRF core-s / image", "CRF vCPUs per GPU"],
        rows,
    )
    return [] if core_s > 0 else ["CRF timing gave 0 core-seconds"]


def check_end_to_end(
    model: str, device: str, num_images: int, workdir: Path, size: tuple[int, int]
) -> list[str]:
    import ray

    from bench.pipeline import write_scenes
    from pipeline.segment import run_segment

    inputs = write_scenes(workdir / "scenes", num_images, size=size, num_classes=21)
    cfg, crf_raw = job_config_for(inputs, str(workdir / "out"), model)
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=max(4, os.cpu_count() or 1),
            num_gpus=1 if device == "cuda" else 0,
            include_dashboard=False,
            log_to_driver=False,
        )
    t0 = time.monotonic()
    manifest = run_segment(cfg, crf_raw)
    wall = time.monotonic() - t0
    run = manifest["run"]
    status = manifest["counts"]["status"]
    gpus = run["pools"]["dcnn_num_gpus"]
    failures = []
    if status != {"ok": num_images}:
        failures.append(f"end to end: statuses {status}, expected {num_images} ok")
    if device == "cuda" and gpus != 1:
        failures.append(f"end to end: the DCNN pool was planned with {gpus} GPUs, expected 1")
    per_image = {k: f"{v / max(1, run['processed']):.4f}" for k, v in sorted(run["stage_s"].items())}
    table(
        f"End to end on a local Ray ({num_images} scenes of {size[0]}x{size[1]}, CRF on)",
        ["statuses", "DCNN GPUs", "images/s (incl. start-up)", "stream images/s", "stage seconds per image"],
        [[status, gpus, f"{num_images / wall:.2f}", f"{run['images_per_s']:.2f}", per_image]],
    )
    return failures


CRF_BAR = 0.999  # pixels of the torch CRF backend equal to pydensecrf's labels (docs/crf-backends.md)


def check_crf_backend(device: str, num_images: int) -> list[str]:
    """The torch CRF backend on ``device`` vs pydensecrf on the CPU: VOC-size scenes, 21 labels, LargeFOV's
    parameters, unpruned (the direct call's model), with the stage's pruning, and all images in one batch."""
    import dataclasses

    import torch

    from bench.crf_backends import crf_samples, direct_pydensecrf, timed_crf
    from pipeline.stages.crf import crf_config_for

    base = crf_config_for("deeplab-largefov", backend="torch", device=device)
    unpruned = dataclasses.replace(base, prune_threshold=0.0)
    modes = [
        ("unpruned", unpruned, 1),
        ("stage (pruned)", base, 1),
        (f"stage, {num_images} in one batch", base, 0),
    ]
    samples = crf_samples(num_images)
    refs, cpu_s = [], 0.0
    for image, probs in samples:
        t0 = time.thread_time()
        refs.append(direct_pydensecrf(image, probs, base))
        cpu_s += time.thread_time() - t0
    rows, failures = [], []
    for mode, cfg, per_call in modes:
        per_call = per_call or num_images
        images = [image for image, _ in samples]
        probs = [torch.from_numpy(p).to(device) for _, p in samples]
        timed_crf(images[:per_call], probs[:per_call], cfg, device)  # warm-up
        same = total = 0
        worst, seconds, peak = 1.0, 0.0, 0.0
        for start in range(0, num_images, per_call):
            labels, sec, gib = timed_crf(
                images[start : start + per_call], probs[start : start + per_call], cfg, device
            )
            seconds, peak = seconds + sec, max(peak, gib)
            for got, ref in zip(labels, refs[start : start + per_call], strict=True):
                same, total = same + int((got == ref).sum()), total + ref.size
                worst = min(worst, float((got == ref).mean()))
        ok = same / total >= CRF_BAR
        rows.append(
            [mode, f"{1000 * seconds / num_images:.1f}", f"{1000 * cpu_s / num_images:.0f}",
             f"{100 * same / total:.4f} %", f"{100 * worst:.4f} %", f"{peak:.2f}" if device == "cuda" else "n/a",
             "ok" if ok else "FAIL"]
        )  # fmt: skip
        if not ok:
            failures.append(f"CRF torch on {device} ({mode}): {100 * same / total:.4f} % equal to pydensecrf")
    table(
        f"CRF torch backend on {device} vs pydensecrf on the CPU ({num_images} scenes of "
        f"{SCENE_HW[1]}x{SCENE_HW[0]}, 21 labels, LargeFOV, 10 iterations)",
        ["mode", f"{device} ms/image", "pydensecrf CPU ms/image (unpruned)", "pixels equal", "worst image",
         "peak GiB", "result"],
        rows,
    )  # fmt: skip
    return failures


def check_crf_sizes(device: str) -> list[str]:
    """Memory and time per image size: the torch backend, 21 labels unpruned (the worst case), until one fails."""
    import torch

    from bench.crf_backends import crf_samples, timed_crf
    from pipeline.stages.crf import crf_config_for

    cfg = crf_config_for("deeplab-largefov", backend="torch", device=device, prune_threshold=0.0)
    sizes = [(375, 500), (750, 1000), (1500, 2000), (3000, 4000)] if device == "cuda" else [(375, 500)]
    rows = []
    for size in sizes:
        image, probs = crf_samples(1, size=size)[0]
        try:
            _, seconds, peak = timed_crf([image], [torch.from_numpy(probs).to(device)], cfg, device)
            gib = f"{peak:.2f}" if device == "cuda" else "n/a"
            rows.append([f"{size[1]}x{size[0]}", f"{1000 * seconds:.0f}", gib, ""])
        except torch.OutOfMemoryError as e:
            rows.append([f"{size[1]}x{size[0]}", "", "", f"out of memory: {str(e)[:80]}"])
            break
        finally:
            del probs
            if device == "cuda":
                torch.cuda.empty_cache()
    table("CRF torch backend per image size (21 labels unpruned, first call)",
          ["image", "ms", "peak GiB", "note"], rows)  # fmt: skip
    return []


def check_dcnn_crf(model: str, device: str, batch_size: int, min_time_s: float, best: dict) -> list[str]:
    """DCNN + CRF in one actor on the device (crf.device: cuda): images/s of the whole stage, vs the DCNN alone."""
    import numpy as np

    from pipeline.model.weights import load_checkpoint
    from pipeline.stages.crf import crf_config_for
    from pipeline.stages.dcnn import DCNNConfig, DeepLabPredictor

    num_classes = int(load_checkpoint(model)[1]["num_classes"])
    crf_cfg = crf_config_for("deeplab-largefov", backend="torch", device=device)
    dcnn_cfg = DCNNConfig(model_uri=model, device=device, batch_size=batch_size, min_input_size=None)
    pred = DeepLabPredictor(dcnn_cfg, crf_cfg=crf_cfg)
    batch = scene_batch(batch_size, num_classes, seed=100)
    pred(batch)  # warm-up
    n_iter, t0, crf_s = 0, time.perf_counter(), 0.0
    while n_iter < 2 or time.perf_counter() - t0 < min_time_s:
        out = pred(batch)
        crf_s += float(np.sum(out["crf_s"]))
        n_iter += 1
    rate = batch_size * n_iter / (time.perf_counter() - t0)
    bad = int(sum(s != "ok" for s in out["status"]))
    table(
        f"DCNN + CRF on one {device} (fp32, batch {batch_size}, {SCENE_HW[1]}x{SCENE_HW[0]} padded to 513)",
        ["DCNN images/s (alone)", "DCNN + CRF images/s", "CRF ms/image in the actor", "CRF CPU cores", "rows not ok"],
        [[f"{best.get('fp32', float('nan')):.1f}", f"{rate:.1f}", f"{1000 * crf_s / (batch_size * n_iter):.1f}",
          0, bad]],
    )  # fmt: skip
    return [f"DCNN + CRF: {bad} rows not ok"] if bad else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke-test this script")
    p.add_argument("--images", type=int, default=4, help="scenes per agreement check")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--job-images", type=int, default=64, help="images of the end-to-end job (0: skip it)")
    p.add_argument(
        "--width", type=float, default=1.0, help="channel width of the LargeFOV model (1 = the paper's)"
    )
    p.add_argument("--min-time-s", type=float, default=2.0, help="timed seconds per throughput row")
    p.add_argument("--crf-images", type=int, default=4, help="scenes of the CRF backend check")
    p.add_argument(
        "--crf-only",
        action="store_true",
        help="only the CRF checks (torch backend, DCNN + CRF): ~1-2 minutes",
    )
    args = p.parse_args(argv)

    if args.device == "cuda":
        reason = no_cuda_reason()
        if reason is not None:
            print(f"gpu_check: no usable CUDA device ({reason}); run it on a GPU machine", file=sys.stderr)
            return 2

    from bench.pipeline import bench_checkpoint

    t0 = time.monotonic()
    failures: list[str] = []
    table("Device", ["item", "value"], [[k, v] for k, v in device_info(args.device).items()])
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        full = bench_checkpoint(work, args.width)
        failures += check_crf_backend(args.device, args.crf_images)
        failures += check_crf_sizes(args.device)
        if args.crf_only:
            failures += check_dcnn_crf(full, args.device, 8, args.min_time_s, {})
            return finish(t0, failures)
        name = "LargeFOV full width" if args.width == 1 else f"LargeFOV width {args.width:g}"
        failures += check_agreement(
            {"demo checkpoint": str(DEMO_CHECKPOINT), name: full}, args.device, args.images
        )
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        more, best = check_throughput(full, args.device, sizes, args.min_time_s)
        failures += more
        if args.device == "cuda":
            failures += check_out_of_memory(full)
        failures += check_crf_feed(full, best)
        failures += check_dcnn_crf(full, args.device, 8, args.min_time_s, best)
        if args.job_images:
            size = (SCENE_HW[1], SCENE_HW[0]) if args.width == 1 else (160, 120)
            failures += check_end_to_end(full, args.device, args.job_images, work, size)
    return finish(t0, failures)


def finish(t0: float, failures: list[str]) -> int:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    print(f"\ngpu_check: {'FAILED' if failures else 'all checks passed'} in {time.monotonic() - t0:.0f} s")
    for f in failures:
        print(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
