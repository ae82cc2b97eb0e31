"""Benchmark of the whole segment job: the Ray job (run_segment on local Ray) vs the single-process loop, side by side.

Five measurements on generated VOC-size scenes (500x375, 21 classes), in one run:

1. **Stages in-process** (the cost model): every stage of the job (read, decode, DCNN, CRF, encode + write) run in
   this process with one torch thread over the images, timed with the thread's CPU clock, so each figure is
   core-seconds per image. ideal images/s = cores / (sum of the stages' core-seconds). This pass is also the
   single-process loop on one core (one torch thread, as each of the job's actors runs): its wall time is printed.
2. **Stages in-process, every core busy**: the same pass in one process per core at once, each over its share of
   the images, still no Ray. A vCPU does less when its neighbours are busy (shared core, caches, memory bandwidth:
   ``bench/cores.py`` measures it for the CRF alone), and the Ray job keeps every vCPU busy; this pass measures that
   factor for every stage under the job's own mix, and its sum is the bar's denominator.
3. **Single process**: ``pipeline.flow.run_single_process`` (same decode, model, CRF, encode, write; no Ray) with
   torch's default threads (here 2: the DCNN's convolutions use both cores, the CRF one), timed end to end.
4. **Ray job**: ``pipeline.segment.run_segment`` on a local Ray (started before the clock, as a cluster would be),
   timed end to end: listing, actor start-up (torch import, model load), streaming, commit, manifest. Its CPU
   seconds are summed over every process it starts (driver, Ray daemons, actors, tasks) and printed per process.
5. **A small Ray job** (``--small-images``, other scenes of the same size) right after it: the big job's CPU minus
   the small one's, per extra image, is what an image costs the Ray job beyond the fixed start-up, i.e. what each
   of a 10M-image job's images costs. It runs on the Ray the big job warmed, so its fixed part is if anything
   smaller and the per-image figure if anything larger.

The in-process measurements are split around the Ray jobs (even-numbered images before them, odd-numbered after,
summed): this VM's speed drifts by ~10 % within minutes, and a pass run only before the Ray job put that drift into
the ratio and the efficiency (the ideal moved 3.87-4.67 images/s across runs). The figure of each half is printed.

The bar (issue 15): the Ray job's CPU per image <= 1.10x the stages' core-seconds with every core busy.

Prints images/s of each, ratio = Ray / single process and efficiency = Ray / ideal. The default 480 images make a
Ray job of ~2.5 minutes (the whole benchmark ~14), so actor start-up (~5 s of torch imports and model loads) weighs
as in a real batch job rather than dominating; at 160 images it costs ~15 points of efficiency.

Model: the DCNN on a GPU costs a few ms per image while the dense CRF costs ~0.3 core-seconds on CPU; a full-width
DeepLab-LargeFOV on this CPU would cost seconds per image and turn the benchmark into a DCNN benchmark. So the
default model is DeepLab-LargeFOV with every channel count scaled by ``--width`` (1/8: ~1.3 GFLOP per 513x513
image), random init with a confident classifier (fc8 x50, 16 of 21 classes biased off) so that, like a trained
model, 5-8 labels survive the CRF's pruning. ``--model PATH`` uses a real checkpoint instead.

    python bench/pipeline.py [--images 480] [--small-images 24] [--width 0.125] [--model PATH] [--wait-load 2.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from pipeline.cluster.localhead import descendants  # noqa: E402

CORES = os.cpu_count() or 1
SIZE = (500, 375)  # (W, H), PASCAL VOC's typical size
NUM_CLASSES = 21
ACTIVE_CLASSES = 5
STAGES = ("read", "decode", "dcnn", "crf", "encode_write")


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_load(limit: float | None, timeout_s: float = 1200.0) -> float:
    """Block until the 1-minute load average is below ``limit`` (other jobs share the machine); return it."""
    t0 = time.monotonic()
    while limit is not None and load_average() > limit and time.monotonic() - t0 < timeout_s:
        print(f"  load average {load_average():.2f} > {limit}: waiting", flush=True)
        time.sleep(30)
    return load_average()


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


TICK = os.sysconf("SC_CLK_TCK")


class CPUMeter(threading.Thread):
    """CPU seconds used by this process and everything it started (Ray daemons, workers) from ``start()`` on.

    /proc keeps a process's CPU time only while it lives, so every 0.5 s the last value of each pid is kept.
    """

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._done = threading.Event()
        self.base = self._read()

    def _read(self) -> dict[int, float]:
        out = {}
        for pid in [os.getpid(), *descendants(os.getpid())]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[pid] = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
            self.names[pid] = process_kind(pid, self.names.get(pid))
        return out

    def run(self) -> None:
        while not self._done.is_set():
            self.last.update(self._read())
            self._done.wait(self.period_s)

    def stop(self) -> float:
        self._done.set()
        self.join()
        self.last.update(self._read())
        return sum(self.by_kind().values())

    def by_kind(self) -> dict[str, float]:
        """CPU seconds per kind of process (driver, raylet, gcs, each actor class, idle/task workers)."""
        out: Counter = Counter()
        for pid, v in self.last.items():
            out[self.names.get(pid, "?")] += v - self.base.get(pid, 0.0)
        return dict(out.most_common())


def cmdline(pid: int) -> str | None:
    """A process's command line with spaces between arguments (Ray workers: their ``ray::`` title); None if gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def process_kind(pid: int, seen: str | None) -> str:
    """A short name for a process: Ray sets worker titles to ``ray::<actor or task>``; keep the most specific seen."""
    if pid == os.getpid():
        return "driver"
    cmd = cmdline(pid)
    if cmd is None:
        return seen or "?"
    if cmd.startswith("ray::"):
        title = cmd.split()[0]
        if "DeepLabPredictor" in title:
            kind = "ray::DCNN actor"
        elif "CRFRefiner" in title:
            kind = "ray::CRF actor"
        elif "encode_rows" in title or "write_rows" in title:
            kind = "ray::encode+write tasks"
        elif title in ("ray::IDLE", "ray::IDLE_SpillWorker"):
            kind = seen if seen and seen != "ray::IDLE" else "ray::IDLE"
        else:
            kind = "ray::" + title[5:].split("(")[0][:40]
        return kind
    for name in (
        "raylet",
        "gcs_server",
        "dashboard",
        "log_monitor",
        "monitor.py",
        "runtime_env",
        "default_worker",
    ):
        if name in cmd:
            return name
    return (seen or cmd.split(" ")[0].rsplit("/", 1)[-1])[:40]


def start_local_ray() -> None:
    """pipeline.cluster.ray_init.init_ray's local Ray, but always a new one: ray.init() without an address would join any
    cluster already running on this machine (another user's `ray start`) and then refuse num_cpus."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(5, CORES), include_dashboard=False, log_to_driver=False)


def bench_checkpoint(directory: Path, width: float, *, seed: int = 0) -> str:
    """Width-scaled DeepLab-LargeFOV checkpoint with a confident classifier (see the module docstring)."""
    import torch

    from pipeline.demo.scenes import class_names
    from pipeline.model.deeplab import build_model
    from pipeline.model.weights import save_checkpoint

    torch.manual_seed(seed)
    model = build_model("deeplab-largefov", num_classes=NUM_CLASSES, width=width)
    with torch.no_grad():
        fc8 = model.classifier.fc8
        fc8.weight.mul_(50.0)  # random init gives near-uniform scores, which the CRF would prune to one label
        fc8.bias.fill_(-20.0)
        fc8.bias[:ACTIVE_CLASSES] = 0.0
    path = directory / f"bench-largefov-w{width:g}.pt"
    save_checkpoint(
        model,
        str(path),
        class_names=class_names(NUM_CLASSES),
        provenance={"source": f"bench: random init, width {width:g}, confident fc8"},
    )
    return str(path)


def model_classes(path: str) -> int:
    from pipeline.model.weights import load_checkpoint

    return int(load_checkpoint(path)[1]["num_classes"])


def write_scenes(
    directory: Path,
    count: int,
    *,
    size: tuple[int, int] = SIZE,
    seed: int = 11,
    num_classes: int = NUM_CLASSES,
) -> str:
    from pipeline.demo.scenes import write_voc_dataset

    write_voc_dataset(str(directory), count=count, size=size, num_classes=num_classes, seed=seed)
    return str(directory)


def job_config(input_uri: str, output_uri: str, model: str, **extra):
    """The job's config as `deeplab segment` builds it (defaults everywhere, no evaluation)."""
    from pipeline.config import load_job_config

    return load_job_config(input=input_uri, output=output_uri, model=model, evaluate=False, **extra)


def resolved(cfg, crf_raw):
    """What run_segment does before the flow: CRF parameters of the variant, class count; plus the EncodeConfig."""
    import dataclasses

    from pipeline.config import resolve_crf
    from pipeline.segment import load_model_meta
    from pipeline.stages.encode import EncodeConfig

    meta, digest = load_model_meta(cfg)
    cfg = resolve_crf(cfg, meta["variant"], crf_raw)
    cfg = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, num_classes=meta["num_classes"]))
    return cfg, EncodeConfig(
        num_classes=meta["num_classes"], model_variant=meta["variant"], model_digest=digest
    )


def items_of(cfg) -> list[dict]:
    from pipeline.stages.plan import list_inputs

    return list_inputs(cfg.read.input_uri, cfg.storage)[1]


def stage_costs(cfg, encode_cfg, items: list[dict], *, batch_size: int = 8) -> dict:
    """Each stage in this process with one torch thread: core-seconds (thread CPU time) and wall seconds per image."""
    import dataclasses

    import torch

    from pipeline.flow import _concat, _take, encode_rows
    from pipeline.schema import ID, LOGITS
    from pipeline.stages.crf import CRFRefiner
    from pipeline.stages.dcnn import DeepLabPredictor
    from pipeline.stages.decode import decode_batch
    from pipeline.stages.read import fetch_batch
    from pipeline.stages.write import commit_rows

    t0 = time.monotonic()  # from model load on, as run_single and the Ray job are timed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the thread's CPU clock then holds all of the DCNN's work
    predictor = DeepLabPredictor(dataclasses.replace(cfg.dcnn, num_threads=1), cfg.storage)
    refiner = CRFRefiner(cfg.crf)
    cpu: Counter = Counter()
    wall: Counter = Counter()
    kept: list[int] = []

    def timed(name, fn, *args, **kwargs):
        c0, w0 = time.thread_time(), time.perf_counter()
        out = fn(*args, **kwargs)
        cpu[name] += time.thread_time() - c0
        wall[name] += time.perf_counter() - w0
        return out

    load_s = time.monotonic() - t0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = {k: np.array([it[k] for it in chunk], dtype=object) for k in chunk[0]}
        batch = timed("read", fetch_batch, batch, cfg.storage)
        batch = timed("decode", decode_batch, batch, cfg.decode)
        batch = timed("dcnn", predictor, batch)
        kept += [labels_kept(lg, cfg.crf.prune_threshold) for lg in batch[LOGITS]]
        batch = timed("crf", lambda b: _concat([refiner(_take(b, i)) for i in range(len(b[ID]))]), batch)
        timed(
            "encode_write",
            lambda b: commit_rows(encode_rows(b, encode_cfg), cfg.write.output_uri, cfg.storage),
            batch,
        )
    total_wall = time.monotonic() - t0
    torch.set_num_threads(threads)
    n = len(items)
    return {
        "images": n,
        "load_s": load_s,
        "total_wall_s": total_wall,
        "images_per_s": n / total_wall,
        "core_s": {k: cpu[k] / n for k in STAGES},
        "wall_s": {k: wall[k] / n for k in STAGES},
        "labels_kept_mean": float(np.mean(kept)),
    }


def merge_stage_costs(a: dict, b: dict) -> dict:
    """Two passes over disjoint halves as one: per-image figures weighted by images, one model load counted."""
    total_wall = a["total_wall_s"] + b["total_wall_s"] - b["load_s"]
    merged = {**_weighted([a, b]), "load_s": a["load_s"], "total_wall_s": total_wall}
    merged["images_per_s"] = merged["images"] / total_wall
    merged["ideal_halves"] = [CORES / sum(h["core_s"].values()) for h in (a, b)]
    return merged


def _weighted(parts: list[dict]) -> dict:
    """Per-image figures of passes over disjoint images, weighted by their images."""
    n = sum(p["images"] for p in parts)

    def mean(key: str, k: str | None = None) -> float:
        return sum((p[key] if k is None else p[key][k]) * p["images"] for p in parts) / n

    return {
        "images": n,
        "core_s": {k: mean("core_s", k) for k in STAGES},
        "wall_s": {k: mean("wall_s", k) for k in STAGES},
        "labels_kept_mean": mean("labels_kept_mean"),
    }


def _stage_worker(cfg, encode_cfg, items: list[dict], results) -> None:
    results.put(stage_costs(cfg, encode_cfg, items))


def busy_stage_costs(cfgs: list, encode_cfg, items: list[dict]) -> dict:
    """stage_costs in one process per core at once (``cfgs``: one per process), each over its share of the images:
    every core busy, as in the Ray job, and no Ray. The bar's denominator: the same stages' core-seconds under the
    same contention (a vCPU does less when its neighbours are busy: bench/cores.py)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    shares = [items[i :: len(cfgs)] for i in range(len(cfgs))]
    procs = [
        ctx.Process(target=_stage_worker, args=(c, encode_cfg, share, results))
        for c, share in zip(cfgs, shares, strict=True)
        if share
    ]
    for proc in procs:
        proc.start()
    parts = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    merged = _weighted(parts)
    merged["total_wall_s"] = max(p["total_wall_s"] for p in parts)
    merged["images_per_s"] = merged["images"] / merged["total_wall_s"]
    return merged


def labels_kept(logits: np.ndarray, threshold: float) -> int:
    """How many labels survive the CRF's pruning (peak softmax >= threshold) on the stride-8 scores."""
    import torch

    p = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=0)
    return int((p.flatten(1).max(dim=1).values >= threshold).sum())


def run_single(cfg, encode_cfg, items: list[dict]) -> dict:
    """run_single_process with torch's default threads, timed end to end."""
    from pipeline.flow import run_single_process

    t0, c0 = time.monotonic(), time.process_time()
    out = run_single_process(items, cfg, encode_cfg)
    wall = time.monotonic() - t0  # model load included, as the Ray job's actor start-up is
    cpu = time.process_time() - c0
    n = len(items)
    return {
        **out,
        "cpu_s": cpu,
        "total_wall_s": wall,
        "total_images_per_s": n / wall,
        "cpu_s_per_image": cpu / n,
        "cores_used": cpu / wall,
    }


def merge_single(a: dict, b: dict) -> dict:
    """Two runs over disjoint halves as one: the second run's model load left out (wall_s is its loop only)."""
    n = a["processed"] + b["processed"]
    wall = a["total_wall_s"] + b["wall_s"]
    cpu = a["cpu_s"] + b["cpu_s"]
    return {
        "processed": n,
        "status_counts": dict(Counter(a["status_counts"]) + Counter(b["status_counts"])),
        "halves_images_per_s": [a["images_per_s"], b["images_per_s"]],
        "cpu_s": cpu,
        "total_wall_s": wall,
        "total_images_per_s": n / wall,
        "cpu_s_per_image": cpu / n,
        "cores_used": cpu / wall,
    }


def run_ray(cfg, crf_raw) -> dict:
    from pipeline.segment import run_segment

    start_local_ray()  # a running cluster is not part of the job's time
    meter = CPUMeter()
    meter.start()
    t0 = time.monotonic()
    manifest = run_segment(cfg, crf_raw)
    wall = time.monotonic() - t0
    cpu = meter.stop()
    run = manifest["run"]
    n = run["processed"]
    return {
        "processed": n,
        "status": manifest["counts"]["status"],
        "total_wall_s": wall,
        "images_per_s": n / wall,
        "stream_images_per_s": run["images_per_s"],
        "cpu_s_per_image": cpu / n,  # driver + Ray daemons + workers: useful work and all overhead
        "cpu_s_by_process": meter.by_kind(),
        "cores_used": cpu / wall,
        "pools": run["pools"],
        "stage_s_per_image": {k: v / n for k, v in run["stage_s"].items()},
    }


def marginal_costs(big: dict, small: dict) -> dict:
    """What each image beyond the small job's costs the Ray job: (CPU of big - CPU of small) / (images difference),
    in total and per kind of process; the rest of the small job's CPU is the fixed start-up."""
    extra = big["processed"] - small["processed"]
    big_cpu, small_cpu = (
        big["cpu_s_per_image"] * big["processed"],
        small["cpu_s_per_image"] * small["processed"],
    )
    per_image = (big_cpu - small_cpu) / extra
    kinds = set(big["cpu_s_by_process"]) | set(small["cpu_s_by_process"])
    by_process = {
        k: (big["cpu_s_by_process"].get(k, 0.0) - small["cpu_s_by_process"].get(k, 0.0)) / extra
        for k in kinds
    }
    return {
        "per_image": per_image,
        "fixed_s": small_cpu - per_image * small["processed"],
        "by_process": by_process,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=480, help="scenes to segment (default 480)")
    p.add_argument("--width", type=float, default=0.125, help="channel scale of the built-in model")
    p.add_argument("--model", default=None, help="a checkpoint to use instead of the built-in model")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--small-images", type=int, default=24, help="images of the small job (fixed costs)")
    p.add_argument("--wait-load", type=float, default=None, help="wait until the load average is below this")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model or bench_checkpoint(work, args.width)
        scenes = write_scenes(work / "scenes", args.images, num_classes=model_classes(model))
        model_desc = args.model or f"deeplab-largefov width {args.width:g} (built in code)"
        print(f"{args.images} scenes {SIZE[0]}x{SIZE[1]}, model {model_desc}, {CORES} cores")

        load = wait_for_load(args.wait_load)
        print(f"start: {uptime()}")
        job, crf_raw = job_config(scenes, str(work / "out-ray"), model)  # as `deeplab segment` builds it
        cfg, encode_cfg = resolved(job, crf_raw)  # what run_segment resolves, for the in-process passes
        items = items_of(cfg)
        halves = (items[0::2], items[1::2])  # in-process passes before and after the Ray job: drift cancels

        def writing_to(name: str):
            return dataclasses.replace(cfg, write=dataclasses.replace(cfg.write, output_uri=str(work / name)))

        def stage_pass(half: int) -> dict:
            return stage_costs(writing_to(f"out-stages-{half}"), encode_cfg, halves[half])

        def single_pass(half: int) -> dict:
            return run_single(writing_to(f"out-single-{half}"), encode_cfg, halves[half])

        def busy_pass(half: int) -> dict:
            cfgs = [writing_to(f"out-busy-{half}-{i}") for i in range(CORES)]
            return busy_stage_costs(cfgs, encode_cfg, halves[half])

        # A small job on other scenes of the same size: the big job's CPU minus the small one's, per extra image,
        # is what each image costs beyond the fixed start-up (actor imports and model loads, listing, manifest).
        # Run after the big one, on the Ray it warmed, so its fixed part is if anything smaller: conservative.
        small_n = min(args.small_images, args.images // 2)
        small_scenes = write_scenes(work / "scenes-small", small_n, num_classes=model_classes(model), seed=12)
        small_job, _ = job_config(small_scenes, str(work / "out-ray-small"), model)

        # mirrored order: stages, single, busy | Ray jobs | busy, single, stages
        stages_a, single_a, busy_a = stage_pass(0), single_pass(0), busy_pass(0)
        ray_run = run_ray(job, crf_raw)
        ray_small = run_ray(small_job, crf_raw)
        busy_b, single_b, stages_b = busy_pass(1), single_pass(1), stage_pass(1)
        stages = merge_stage_costs(stages_a, stages_b)
        busy = {
            **_weighted([busy_a, busy_b]),
            "halves": [sum(h["core_s"].values()) for h in (busy_a, busy_b)],
        }
        single = merge_single(single_a, single_b)
        marginal = marginal_costs(ray_run, ray_small)
        core_s = sum(stages["core_s"].values())
        ideal = CORES / core_s
        end_load = load_average()
        print(f"end:   {uptime()}")

        print("\nstage costs in-process (1 torch thread), per image:")
        print(f"  {'stage':<14}{'core-s':>9}{'wall-s':>9}")
        for k in STAGES:
            print(f"  {k:<14}{stages['core_s'][k]:>9.4f}{stages['wall_s'][k]:>9.4f}")
        print(f"  {'sum':<14}{core_s:>9.4f}{sum(stages['wall_s'].values()):>9.4f}")
        print(f"  labels kept for the CRF: {stages['labels_kept_mean']:.1f} on average")
        print(
            f"\n  ideal on {CORES} cores     {ideal:7.2f} images/s  (cores / sum of core-s; "
            f"{stages['ideal_halves'][0]:.2f} before the Ray job, {stages['ideal_halves'][1]:.2f} after)"
        )
        print(
            f"  single process       {single['total_images_per_s']:7.2f} images/s  "
            f"({single['total_wall_s']:.1f} s; {single['cores_used']:.2f} cores busy; torch's default threads; "
            f"{single['halves_images_per_s'][0]:.2f} before, {single['halves_images_per_s'][1]:.2f} after)"
        )
        print(
            f"  single process, 1 thr{stages['images_per_s']:7.2f} images/s  "
            f"({stages['total_wall_s']:.1f} s; one torch thread: the stage pass above)"
        )
        print(
            f"  Ray job              {ray_run['images_per_s']:7.2f} images/s  "
            f"({ray_run['total_wall_s']:.1f} s; streaming only {ray_run['stream_images_per_s']:.2f})"
        )
        print(
            f"\n  CPU per image: stages {core_s:.3f} core-s; single process {single['cpu_s_per_image']:.3f} "
            f"({single['cores_used']:.2f} cores busy); Ray job {ray_run['cpu_s_per_image']:.3f} "
            f"({ray_run['cores_used']:.2f} cores busy, all its processes)"
        )
        overhead = ray_run["cpu_s_per_image"] / core_s
        print(
            f"  Ray CPU overhead: {overhead:.2f}x the stages' core-s; with {CORES} free cores it would reach "
            f"{CORES / ray_run['cpu_s_per_image']:.2f} images/s = {1 / overhead:.1%} of ideal (load-independent)"
        )
        ratio = ray_run["images_per_s"] / single["total_images_per_s"]
        ratio1 = ray_run["images_per_s"] / stages["images_per_s"]
        eff = ray_run["images_per_s"] / ideal
        print(f"\n  ratio Ray / single process  {ratio:.2f}x   (the loop uses torch's default threads)")
        print(f"  ratio Ray / single, 1 thread {ratio1:.2f}x  (the same loop on one core)")
        print(f"  efficiency Ray / ideal      {eff:.1%}")

        busy_core_s = sum(busy["core_s"].values())
        print(
            f"\nstage costs in-process with every core busy ({CORES} processes at once, 1 torch thread each):"
        )
        for k in STAGES:
            print(
                f"  {k:<14}{busy['core_s'][k]:>9.4f}  ({busy['core_s'][k] / max(stages['core_s'][k], 1e-9):.2f}x alone)"
            )
        print(
            f"  {'sum':<14}{busy_core_s:>9.4f}  ({busy_core_s / core_s:.2f}x alone: the busy factor; "
            f"halves {busy['halves'][0]:.4f} / {busy['halves'][1]:.4f})"
        )
        print(
            f"  Ray job, whole ({ray_run['processed']} images): {ray_run['cpu_s_per_image']:.4f} core-s per image "
            f"= {ray_run['cpu_s_per_image'] / busy_core_s:.2f}x the busy stages"
        )
        print(
            f"  Ray job per image beyond start-up ({ray_run['processed']} - {ray_small['processed']} images): "
            f"{marginal['per_image']:.4f} core-s = {marginal['per_image'] / busy_core_s:.2f}x the busy stages "
            f"(bar <= 1.10x); fixed start-up {marginal['fixed_s']:.1f} core-s"
        )
        print("  Ray job CPU seconds by process (whole job; per image beyond start-up):")
        for kind, sec in ray_run["cpu_s_by_process"].items():
            extra = marginal["by_process"].get(kind, 0.0)
            print(f"    {kind:<28}{sec:8.1f} s  {sec / ray_run['processed']:.4f} per image; {extra:.4f}")
        print(f"  Ray pools: {ray_run['pools']}")
        print(f"  Ray per-image stage seconds (rows, wall in the actors): {ray_run['stage_s_per_image']}")
        print(f"  load average: {load:.2f} at start, {end_load:.2f} at end")
        if args.json:
            figures = {
                "images": args.images,
                "model": model_desc,
                "cores": CORES,
                "stages": stages,
                "ideal_images_per_s": ideal,
                "single": single,
                "ratio_1_thread": ratio1,
                "ray": ray_run,
                "ray_small": ray_small,
                "busy_stages": busy,
                "marginal": marginal,
                "ratio_whole_to_busy": ray_run["cpu_s_per_image"] / busy_core_s,
                "ratio_marginal_to_busy": marginal["per_image"] / busy_core_s,
                "ratio": ratio,
                "efficiency": eff,
                "load": [load, end_load],
            }
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
