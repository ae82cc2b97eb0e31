"""Benchmark of scaling: throughput and peak memory of the Ray job at 1x and 10x the number of images.

Each size runs in a fresh process with its own local Ray (so idle workers or caches of one run can't inflate the
other), started before the clock. While ``run_segment`` runs, a thread samples every 0.2 s, from /proc, the
resident memory of the driver (this process) and of every process it started: Ray workers (``ray::`` processes:
actors and tasks) and Ray's own daemons (raylet, GCS, ...). Reported: images/s and the peak of each; the peak of
driver + workers with and without the pages of Ray's object store (RssShmem: the /dev/shm mapping every worker
shares); the peak proportional set size (PSS) of everything.

The bar (at 10x <= 1.25x the 1x peak: the job streams instead of accumulating) is judged on driver + workers
without object-store pages (the memory the job's processes hold) and printed beside PSS (shared pages split between
the processes mapping them) and the plain RSS sum, which counts every shared page (object-store pages, libtorch)
once per process that maps it. Also printed: the peak of Ray's object store *in use* (live objects, sampled every
second from Ray's memory summary). The DCNN stage (about 5x faster than the CRF here) would run ahead and park its
output rows (~1 MiB each) there until Ray Data's default brake at half its budget (~3.5 GiB here);
``flow.bound_run_ahead`` brakes from the first block, so the figure stays near 150 MiB at 640 or 1280 images.

1x is 64 images by default: one Parquet part (``write.rows_per_file``), enough for every stage to run several
batches and its actors to reach their working-set size. At 20 images the job ends while the CRF actors' allocators
are still growing (~150 MiB each) and the 1x peak understates the steady state (ratio 1.26 where 64 gives the
figure in the README).

Model and scenes as bench/pipeline.py (VOC size 500x375, width-scaled DeepLab-LargeFOV unless ``--model``).

    python bench/scale.py [--images 64] [--factor 10] [--width 0.125] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import (  # noqa: E402
    bench_checkpoint,
    cmdline,
    job_config,
    model_classes,
    start_local_ray,
    uptime,
    wait_for_load,
    write_scenes,
)
from pipeline.cluster.localhead import descendants  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
# peak MiB reported: RSS of the driver, of Ray's worker processes, of Ray's daemons; driver + workers; the same
# without object-store pages ("private"); the largest object-store share of one process; PSS of everything.
# "object_store_live": Ray's object store in use (all live objects), from Ray's memory summary.
KEYS = (
    "driver",
    "workers",
    "daemons",
    "driver_plus_workers",
    "private",
    "object_store",
    "object_store_live",
    "pss_total",
)
MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def kib_field_bytes(pid: int, file: str, key: str) -> int:
    """A "Key:  N kB" line of /proc/<pid>/<file> in bytes; 0 when the process or the line is gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def shmem_bytes(pid: int) -> int:
    """Resident shared-memory pages (RssShmem): here the Ray object store's /dev/shm mapping, which every worker maps.

    A process's share covers the pages of every object it wrote or read that is still in the store; it follows the
    objects in use (``object_store_live``), not the process's own memory.
    """
    return kib_field_bytes(pid, "status", "RssShmem")


def pss_bytes(pid: int) -> int:
    return kib_field_bytes(pid, "smaps_rollup", "Pss")


def _name(pid: int) -> str:
    return (cmdline(pid) or "?")[:70]


def is_worker(pid: int) -> bool:
    """Ray worker processes (actors, tasks, idle workers) name themselves ``ray::...``."""
    return (cmdline(pid) or "").startswith("ray::")


def object_store_live_bytes() -> int:
    """Bytes of live objects in Ray's object store (ray's own memory summary; a private API, bench-only)."""
    from ray._private.internal_api import memory_summary

    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return int(m[1]) * MIB if m else 0


class MemorySampler(threading.Thread):
    """Peak memory of this process and everything it started, sampled every ``period_s``."""

    def __init__(self, period_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.peak = dict.fromkeys(KEYS, 0)
        self.max_workers = 0
        self.timeline: list[float] = []  # driver + workers without object-store pages, MiB, at every sample
        self.at_peak: list[tuple[int, int, str]] = []  # (RSS MiB, private MiB, name) of workers at peak
        self._done = threading.Event()
        self._ticks = 0

    def sample(self) -> None:
        me = os.getpid()
        procs = descendants(me)
        workers = [p for p in procs if is_worker(p)]
        # one reading per process, so the totals and at_peak agree
        rss = {p: rss_bytes(p) for p in [me, *workers]}
        shm = {p: shmem_bytes(p) for p in [me, *workers]}
        now = {
            "driver": rss[me],
            "workers": sum(rss[p] for p in workers),
            "daemons": sum(rss_bytes(p) for p in procs if p not in rss),
            "pss_total": pss_bytes(me) + sum(pss_bytes(p) for p in procs),
        }
        now["driver_plus_workers"] = now["driver"] + now["workers"]
        now["private"] = now["driver_plus_workers"] - sum(shm.values())
        now["object_store"] = max(shm.values())
        self._ticks += 1
        if self._ticks % 5 == 1:  # an RPC to Ray: once a second
            now["object_store_live"] = object_store_live_bytes()
        self.timeline.append(now["private"] / MIB)
        if now["driver_plus_workers"] > self.peak["driver_plus_workers"]:
            self.at_peak = sorted(
                ((rss[p] // MIB, (rss[p] - shm[p]) // MIB, _name(p)) for p in workers), reverse=True
            )
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        self.max_workers = max(self.max_workers, len(workers))

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.period_s)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        return {k: v / MIB for k, v in self.peak.items()}


def run_one(scenes: str, output: str, model: str) -> dict:
    """One job in this process: start Ray, sample memory while run_segment runs, return the figures."""
    import ray

    from pipeline.segment import run_segment

    cfg, crf_raw = job_config(scenes, output, model)
    start_local_ray()
    sampler = MemorySampler()
    sampler.sample()
    idle = {k: v / MIB for k, v in sampler.peak.items()}  # Ray started, no job yet
    sampler.start()
    t0 = time.monotonic()
    manifest = run_segment(cfg, crf_raw)
    wall = time.monotonic() - t0
    peak = sampler.stop()
    capacity = ray.cluster_resources().get("object_store_memory", 0) / MIB
    ray.shutdown()
    n = manifest["run"]["processed"]
    return {
        "images": n,
        "status": manifest["counts"]["status"],
        "wall_s": wall,
        "images_per_s": n / wall,
        "idle_mib": idle,
        "object_store_capacity_mib": capacity,
        "peak_mib": peak,
        "max_worker_processes": sampler.max_workers,
        "workers_at_peak": sampler.at_peak,
        # running peak of the private figure at each tenth of the run: flat = bounded, rising = accumulating
        "peak_by_tenth": [
            max(sampler.timeline[: max(1, len(sampler.timeline) * k // 10)]) for k in range(1, 11)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="images at 1x (default 64)")
    p.add_argument("--factor", type=int, default=10, help="the large run has factor x images (default 10)")
    p.add_argument("--width", type=float, default=0.125, help="channel scale of the built-in model")
    p.add_argument("--model", default=None, help="a checkpoint to use instead of the built-in model")
    p.add_argument("--wait-load", type=float, default=None, help="wait until the load average is below this")
    p.add_argument("--one", nargs=3, metavar=("SCENES", "OUTPUT", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:  # child mode: one job, figures as JSON on the last stdout line
        print(json.dumps(run_one(*args.one)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        model = args.model or bench_checkpoint(work, args.width)
        sizes = [args.images, args.images * args.factor]
        classes = model_classes(model)
        scenes = {n: write_scenes(work / f"scenes-{n}", n, num_classes=classes) for n in sizes}
        load = wait_for_load(args.wait_load)
        print(f"start: {uptime()}")
        results = {}
        for n in sizes:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", scenes[n], str(work / f"out-{n}"), model],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"end:   {uptime()}  (load average at start {load:.2f})")
        model_desc = args.model or f"deeplab-largefov width {args.width:g} (built in code)"
        print(f"\nmodel {model_desc}; peak MiB sampled every 0.2 s (RSS unless named otherwise)")
        keys = KEYS
        print(
            f"  {'images':>6}{'images/s':>10}{'wall s':>8}"
            + "".join(f"{k:>20}" for k in keys)
            + f"{'workers':>9}"
        )
        for n in sizes:
            r = results[n]
            print(
                f"  {n:>6}{r['images_per_s']:>10.2f}{r['wall_s']:>8.1f}"
                + "".join(f"{r['peak_mib'][k]:>20.0f}" for k in keys)
                + f"{r['max_worker_processes']:>9}"
            )
        small, large = (results[n] for n in sizes)
        print(f"\n  idle Ray (before the job), MiB: {small['idle_mib']}")
        for k in keys:
            print(f"  peak {k} at {args.factor}x / 1x: {large['peak_mib'][k] / small['peak_mib'][k]:.2f}")
        ratio = large["peak_mib"]["private"] / small["peak_mib"]["private"]
        rss_ratio = large["peak_mib"]["driver_plus_workers"] / small["peak_mib"]["driver_plus_workers"]
        pss_ratio = large["peak_mib"]["pss_total"] / small["peak_mib"]["pss_total"]
        print(
            f"\n  BAR peak driver+workers without object-store pages {args.factor}x / 1x = {ratio:.2f}  "
            f"(bar <= 1.25); PSS of everything {pss_ratio:.2f}; RSS summed over processes {rss_ratio:.2f}"
        )
        print(
            f"  object store: {small['object_store_capacity_mib']:.0f} MiB; the largest share one process had "
            f"touched: {small['peak_mib']['object_store']:.0f} MiB at 1x, {large['peak_mib']['object_store']:.0f} "
            f"MiB at {args.factor}x; in use (live objects): {small['peak_mib']['object_store_live']:.0f} MiB at 1x, "
            f"{large['peak_mib']['object_store_live']:.0f} MiB at {args.factor}x (rows waiting for the next stage; "
            "flow.bound_run_ahead caps the DCNN's run-ahead)"
        )
        print(f"  throughput {args.factor}x / 1x = {large['images_per_s'] / small['images_per_s']:.2f}")
        for n in sizes:
            print(f"  statuses at {n}: {results[n]['status']}")
            print(f"  workers at the peak ({n} images), (RSS, private) MiB: {results[n]['workers_at_peak']}")
            print(
                f"  running peak private MiB by tenth of the run ({n}): {[round(v) for v in results[n]['peak_by_tenth']]}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
