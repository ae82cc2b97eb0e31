"""Planning, resume and the final check at 100k / 1M (/ 10M) inputs: time and the driver's peak memory.

    python bench/plan.py                       # 100k and 1M inputs, resume against 0 / 100 / 1000 parts
    python bench/plan.py --sizes 100000,1000000,10000000 --parts 0,100,1000,10000
    python bench/plan.py --folders 20000,100000   # a tree of one-image folders (the folder-per-image layout)

Inputs are a synthetic manifest (10 Parquet files of image URIs under a scratch folder; nothing is downloaded: the
job never reads an image while planning). Each size runs the segment job's own driver steps on a local Ray:
``flow.index_output`` (the done index, built in tasks), ``flow.plan_job`` (listing units in tasks, plan files under
OUTPUT/_plan) and ``flow.verify_output`` (the final check). Committed parts are simulated by Parquet files holding
the two columns the index reads (``image_id``, ``status``) for 1000 inputs each. Printed: seconds per step, the
driver's peak RSS (this process; it only grows) and the ratios between sizes.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ReadConfig  # noqa: E402
from pipeline.flow import index_output, plan_job, verify_output  # noqa: E402
from pipeline.storage import StorageConfig  # noqa: E402

MANIFEST_FILES = 10
ROWS_PER_PART = 1000


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_manifest(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n // MANIFEST_FILES)
    for k in range(MANIFEST_FILES):
        ids = range(k * per, min(n, (k + 1) * per))
        table = pa.table(
            {
                "image_uri": [f"s3://photos/{i % 1000:03d}/{i:010d}.jpg" for i in ids],
                "image_id": [f"{i % 1000:03d}/{i:010d}" for i in ids],
            }
        )
        pq.write_table(table, folder / f"list-{k:02d}.parquet")


def write_parts(masks: Path, n_parts: int) -> None:
    masks.mkdir(parents=True, exist_ok=True)
    for p in range(n_parts):
        ids = [f"{i % 1000:03d}/{i:010d}" for i in range(p * ROWS_PER_PART, (p + 1) * ROWS_PER_PART)]
        pq.write_table(
            pa.table({"image_id": ids, "status": ["ok"] * len(ids)}), masks / f"part-{p:08d}.parquet"
        )


def write_tree(root: Path, n: int) -> None:
    """n folders of one (empty) image each: nothing is read while planning."""
    for k in range(n):
        folder = root / f"{k // 1000:04d}" / f"{k:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "img.jpg").touch()


def bench_folders(sizes: list[int], work: Path, storage: StorageConfig) -> None:
    """Plan a folder-per-image tree: listing tasks of UNITS_PER_TASK folders, LIST_TASKS_IN_FLIGHT at once."""
    print(f"{'folders':>10} {'tasks':>7} {'plan s':>8} {'peak RSS MiB':>13}")
    rows = []
    for n in sizes:
        tree = work / f"tree{n}"
        ray.get(ray.remote(write_tree).remote(tree, n))
        index = index_output(str(work / f"tout{n}"), storage)
        t0 = time.perf_counter()
        job = plan_job(ReadConfig(input_uri=str(tree), input_format="images"), str(work / f"tout{n}"), storage,
                       index.done)  # fmt: skip
        seconds = time.perf_counter() - t0
        assert job.inputs == n, job
        rows.append((n, job.units, seconds, peak_rss_mib()))
        print(f"{n:>10} {job.units:>7} {seconds:>8.2f} {peak_rss_mib():>13.0f}")
        shutil.rmtree(tree)
        shutil.rmtree(work / f"tout{n}")
    if len(rows) > 1:
        (a, _, sa, ra), (b, _, sb, rb) = rows[0], rows[-1]
        per_folder_mib, per_folder_s = (rb - ra) / (b - a), (sb - sa) / (b - a)
        print(
            f"{b // a}x the folders: {sb / sa:.2f}x the time, driver +{rb - ra:.0f} MiB; extrapolated along that "
            f"slope to 1M folders: {sb + per_folder_s * (1e6 - b):.0f} s, driver peak "
            f"{rb + per_folder_mib * (1e6 - b):.0f} MiB"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated input counts")
    ap.add_argument(
        "--parts", default="0,100,1000", help="committed parts to resume against (at the largest size)"
    )
    ap.add_argument(
        "--workdir", default=None, help="scratch folder (default: a temp dir, removed at the end)"
    )
    ap.add_argument(
        "--folders", default=None, help="comma-separated folder counts: plan a one-image-folder tree"
    )
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    part_counts = [int(p) for p in args.parts.split(",")]

    ray.init(num_cpus=max(5, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    storage = StorageConfig()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-plan-"))
    base_rss = peak_rss_mib()
    print(f"driver peak RSS after ray.init: {base_rss:.0f} MiB")
    print(
        f"{'inputs':>10} {'parts':>6} {'index s':>8} {'plan s':>8} {'check s':>8} {'todo':>10} {'peak RSS MiB':>13}"
    )
    results = {}
    if args.folders:
        try:
            bench_folders([int(n) for n in args.folders.split(",")], work, storage)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            ray.shutdown()
        return 0
    try:
        for n in sizes:
            manifest = work / f"m{n}"
            ray.get(ray.remote(write_manifest).remote(manifest, n))  # not in the driver: its RSS is the job's
            for n_parts in part_counts if n == max(sizes) else [0]:
                out = work / f"out{n}-{n_parts}"
                ray.get(ray.remote(write_parts).remote(out / "masks", min(n_parts, n // ROWS_PER_PART)))
                t0 = time.perf_counter()
                index = index_output(str(out), storage)
                t1 = time.perf_counter()
                job = plan_job(
                    ReadConfig(input_uri=str(manifest), input_format="manifest"),
                    str(out),
                    storage,
                    index.done,
                )
                t2 = time.perf_counter()
                check = verify_output(job, str(out), storage)
                t3 = time.perf_counter()
                assert check["inputs"] == n and check["missing"] == job.todo, (check, job)
                results[(n, n_parts)] = (t1 - t0, t2 - t1, t3 - t2, peak_rss_mib())
                print(
                    f"{n:>10} {n_parts:>6} {t1 - t0:>8.2f} {t2 - t1:>8.2f} {t3 - t2:>8.2f} {job.todo:>10} "
                    f"{peak_rss_mib():>13.0f}"
                )
                shutil.rmtree(out)
            shutil.rmtree(manifest)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    small, large = min(sizes), max(sizes)
    if small != large:
        a, b = results[(small, 0)], results[(large, 0)]
        print(
            f"{large // small}x the inputs: plan {b[1] / a[1]:.2f}x the time, check {b[2] / a[2]:.2f}x; "
            f"driver peak RSS {b[3]:.0f} vs {a[3]:.0f} MiB (+{b[3] - a[3]:.0f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
