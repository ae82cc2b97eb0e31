"""Benchmark of the machine itself: what a CRF costs on one busy vCPU alone vs with every vCPU busy, side by side.

The pipeline's ideal (``bench/pipeline.py``) is cores / (sum of the stages' core-seconds measured in one process),
which assumes that N busy vCPUs do N times the work of one. On a cloud VM the vCPUs share the host's cores, caches
and memory bandwidth (on many instance types two vCPUs are one physical core's hyperthreads; the guest cannot tell,
``lscpu`` here says 1 thread per core), so each may do less when the others are busy too. This measures it with the
job's dominant work, ``pipeline.stages.crf.refine`` on generated 500x375 scenes: rounds alternate one process alone and
one process per vCPU at once (ABBA order, so the VM's drift cancels), each process timing its CRFs with its thread's
CPU clock.

Prints core-seconds per image alone and side by side, their ratio (the busy factor: > 1 means a busy neighbour
slows each vCPU down) and what all vCPUs together deliver as a multiple of one.

    python bench/cores.py [--rounds 4] [--seconds 20]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CORES = os.cpu_count() or 1
HEIGHT, WIDTH = 375, 500
NUM_CLASSES = 21


def crf_worker(seconds: float, results: mp.Queue) -> None:
    """CRFs on a few generated scenes for ``seconds`` of wall time; put (images, CPU seconds) on ``results``."""
    from pipeline.demo.scenes import make_scene, simulate_scores
    from pipeline.stages.crf import crf_config_for, refine

    cfg = crf_config_for("deeplab-largefov")
    data = []
    for seed in range(6):
        image, label = make_scene(HEIGHT, WIDTH, seed=seed, num_classes=NUM_CLASSES)
        data.append((image, simulate_scores(label, NUM_CLASSES, seed=seed)))
    refine(*data[0], cfg)  # first call outside the clock
    n, cpu, end = 0, 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        c0 = time.thread_time()
        refine(*data[n % len(data)], cfg)
        cpu += time.thread_time() - c0
        n += 1
    results.put((n, cpu))


def crf_phase(processes: int, seconds: float) -> float:
    """Core-seconds per image with ``processes`` CRF processes running at once."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=crf_worker, args=(seconds, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    done = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(cpu for _, cpu in done) / sum(n for n, _ in done)


def busy_factor(*, rounds: int = 4, seconds: float = 20.0) -> dict:
    """Core-seconds per CRF alone and with every vCPU busy, rounds in ABBA order; their ratio."""
    alone: list[float] = []
    busy: list[float] = []
    for r in range(rounds):
        order = ((1, alone), (CORES, busy)) if r % 2 == 0 else ((CORES, busy), (1, alone))
        for processes, out in order:
            out.append(crf_phase(processes, seconds))
            print(f"  round {r}: {processes} process(es): {out[-1]:.4f} core-s per CRF", flush=True)
    a, b = sum(alone) / len(alone), sum(busy) / len(busy)
    return {
        "cores": CORES,
        "alone_core_s": a,
        "busy_core_s": b,
        "rounds_ratio": [y / x for x, y in zip(alone, busy, strict=True)],
        "factor": b / a,
        "delivered": CORES * a / b,  # what all vCPUs deliver, in units of one vCPU alone
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="alone / side-by-side rounds (default 4)")
    p.add_argument("--seconds", type=float, default=20.0, help="wall seconds per phase (default 20)")
    args = p.parse_args(argv)
    print(f"{CORES} vCPUs; CRF (deeplab-largefov) on {WIDTH}x{HEIGHT} scenes, {args.seconds:g} s per phase")
    f = busy_factor(rounds=args.rounds, seconds=args.seconds)
    print(
        f"\n  alone {f['alone_core_s']:.4f} core-s per CRF; {CORES} at once {f['busy_core_s']:.4f}: busy factor "
        f"{f['factor']:.3f} (per round: {', '.join(f'{x:.3f}' for x in f['rounds_ratio'])})"
    )
    print(
        f"  {CORES} busy vCPUs deliver {f['delivered']:.2f}x one vCPU alone (ideal arithmetic assumes {CORES}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
