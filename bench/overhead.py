"""Framework cost per image on tiny images: the driver's CPU while streaming, and the workers' CPU beyond the stages.

    python bench/overhead.py [--images 1000] [--size 40x30] [--model PATH] [--min-input-size N]

Three Ray jobs on one local Ray (a warm-up of N images, then N and 3N; generated scenes, the shipped demo model by
default) give per-image figures as differences between the N and 3N jobs, so every fixed cost (actor start-up,
torch imports, model loads, planning, the final check, the manifest) cancels:
- **driver CPU per image while streaming**: the driver process's CPU (all its threads, getrusage) inside
  ``flow.execute``; the issue's bar is 0.5 ms;
- **framework CPU per image**: the CPU of every process the jobs start (driver, Ray daemons, actors, tasks),
  minus the same stages' core-seconds in this process (``bench.pipeline.stage_costs``, one thread, same images);
  the bar is 3 ms.
Also printed: images/s of each job and the per-process split of the 3N job's CPU.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import CPUMeter, resolved, stage_costs, start_local_ray, write_scenes  # noqa: E402

DEMO_MODEL = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "demo-largefov.pt"


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_job(scenes: str, output: str, model: str, dcnn: dict, *, pools: dict | None = None) -> dict:
    """run_segment on the local Ray; CPU of every process, and of the driver inside flow.execute."""
    import pipeline.flow as flow
    from pipeline.config import load_job_config
    from pipeline.segment import run_segment

    cfg, crf_raw = load_job_config(
        input=scenes, output=output, model=model, evaluate=False, dcnn=dcnn, pools=pools or {}
    )
    streaming: dict[str, float] = {}
    execute = flow.execute

    def timed_execute(ds, total, **kwargs):
        c0, w0 = _cpu_self(), time.monotonic()
        try:
            return execute(ds, total, **kwargs)
        finally:
            streaming.update(cpu=_cpu_self() - c0, wall=time.monotonic() - w0)

    flow.execute = timed_execute
    meter = CPUMeter()
    meter.start()
    t0 = time.monotonic()
    try:
        manifest = run_segment(cfg, crf_raw)
    finally:
        flow.execute = execute
    wall = time.monotonic() - t0
    total_cpu = meter.stop()
    n = manifest["run"]["processed"]
    return {
        "images": n,
        "wall_s": wall,
        "cpu_s": total_cpu,
        "driver_stream_cpu_s": streaming["cpu"],
        "stream_wall_s": streaming["wall"],
        "by_kind": meter.by_kind(),
        "status": manifest["counts"]["status"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="N: the jobs process N and 3N images")
    ap.add_argument("--size", default="40x30", help="scene size WxH")
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument(
        "--min-input-size", type=int, default=None, help="dcnn.min_input_size (default: the job's)"
    )
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    n = args.images
    dcnn = {} if args.min_input_size is None else {"min_input_size": args.min_input_size}
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        from pipeline.demo.scenes import class_names  # noqa: F401  (imports torch-free scene code before Ray starts)

        num_classes = _classes(args.model)
        small = write_scenes(work / "small", n, size=(w, h), seed=3, num_classes=num_classes)
        large = write_scenes(work / "large", 3 * n, size=(w, h), seed=3, num_classes=num_classes)

        # The stages in this process, one thread, on the small set: core-seconds per image.
        from pipeline.config import load_job_config
        from pipeline.stages.plan import list_inputs

        cfg, crf_raw = load_job_config(input=small, output=str(work / "inproc"), model=args.model, dcnn=dcnn)
        cfg, encode_cfg = resolved(cfg, crf_raw)
        costs = stage_costs(cfg, encode_cfg, list_inputs(small, cfg.storage)[1])
        stage_core_s = sum(costs["core_s"].values())

        start_local_ray()
        run_job(small, str(work / "warm"), args.model, dcnn)  # first use of Ray's task workers: not measured
        a = run_job(small, str(work / "out-n"), args.model, dcnn)
        b = run_job(large, str(work / "out-3n"), args.model, dcnn)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    extra = b["images"] - a["images"]
    driver_ms = (b["driver_stream_cpu_s"] - a["driver_stream_cpu_s"]) / extra * 1e3
    total_ms = (b["cpu_s"] - a["cpu_s"]) / extra * 1e3
    framework_ms = total_ms - stage_core_s * 1e3
    print(f"scenes {w}x{h}, model {Path(args.model).name}, dcnn {dcnn or 'defaults'}")
    print(
        "stages in-process (core-ms per image): "
        + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in costs["core_s"].items())
    )
    for name, r in (("N", a), ("3N", b)):
        print(
            f"job {name}: {r['images']} images in {r['wall_s']:.1f} s ({r['images'] / r['wall_s']:.0f} images/s overall, "
            f"{r['images'] / r['stream_wall_s']:.0f} while streaming); CPU {r['cpu_s']:.1f} s, "
            f"driver while streaming {r['driver_stream_cpu_s']:.2f} s; status {r['status']}"
        )
    print("3N job CPU by process (s): " + ", ".join(f"{k} {v:.1f}" for k, v in b["by_kind"].items()))
    print(f"per extra image (3N - N): driver while streaming {driver_ms:.3f} ms (bar 0.5)")
    print(
        f"per extra image (3N - N): all processes {total_ms:.2f} ms - stages in-process {stage_core_s * 1e3:.2f} ms "
        f"= framework {framework_ms:.2f} ms (bar 3)"
    )
    return 0


def _classes(model: str) -> int:
    from bench.pipeline import model_classes

    return model_classes(model)


if __name__ == "__main__":
    raise SystemExit(main())
