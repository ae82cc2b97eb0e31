"""A simulated cluster on one machine: is the driver the bottleneck when many DCNN and CRF nodes stream?

    python bench/cluster.py [--gpu-nodes 3] [--crf-nodes 2] [--images 3000] [--size 40x30]

``ray.cluster_utils.Cluster``: a head with 1 CPU (the driver's node), ``--gpu-nodes`` nodes with a logical GPU and 2
CPUs each (one DCNN actor per GPU), ``--crf-nodes`` nodes with 3 CPUs marked ``crf`` (CRF actors only there). Every
node shares this machine's cores, so the job's rate is the machine's, not a cluster's; what this measures is the
driver: its CPU (all threads) while the job streams, as a share of one core and per image, and the job's rate per
DCNN actor. A driver at a small share of a core while every node is busy is not what limits the job; its cost per
image tells how many images/s one driver core could schedule (1 / that cost).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overhead import DEMO_MODEL, run_job  # noqa: E402
from bench.pipeline import model_classes, write_scenes  # noqa: E402

NODE_STORE = 200 << 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-nodes", type=int, default=3)
    ap.add_argument("--crf-nodes", type=int, default=2)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", default="40x30")
    ap.add_argument("--model", default=str(DEMO_MODEL))
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray.cluster_utils import Cluster

    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "object_store_memory": NODE_STORE}
    )
    try:
        for _ in range(args.gpu_nodes):
            cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=NODE_STORE)
        for _ in range(args.crf_nodes):
            cluster.add_node(num_cpus=3, resources={"crf": 3}, object_store_memory=NODE_STORE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        scenes = write_scenes(
            work / "scenes", args.images, size=(w, h), seed=5, num_classes=model_classes(args.model)
        )
        # Logical GPUs on this CPU-only torch: the DCNN runs on the CPU of the GPU nodes (dcnn.device cpu).
        dcnn = {"device": "cpu"}
        pools = {"crf_resource": "crf"}
        r = run_job(scenes, str(work / "out"), args.model, dcnn, pools=pools)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    share = r["driver_stream_cpu_s"] / r["stream_wall_s"]
    per_image_ms = r["driver_stream_cpu_s"] / r["images"] * 1e3
    rate = r["images"] / r["stream_wall_s"]
    print(
        f"{args.gpu_nodes} logical-GPU nodes (1 DCNN actor each), {args.crf_nodes} CRF nodes x 3, head 1 CPU; "
        f"{r['images']} scenes {w}x{h}; status {r['status']}"
    )
    print(
        f"streaming: {rate:.0f} images/s ({rate / args.gpu_nodes:.0f} per DCNN actor) in {r['stream_wall_s']:.1f} s"
    )
    print(
        f"driver while streaming: {r['driver_stream_cpu_s']:.2f} CPU s = {share * 100:.1f} % of one core, "
        f"{per_image_ms:.3f} ms per image (so one driver core schedules at least ~{1e3 / per_image_ms:.0f} "
        "images/s: part of its cost is per second, not per image)"
    )
    print("CPU by process (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["by_kind"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
