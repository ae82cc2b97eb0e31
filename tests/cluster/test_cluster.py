"""The segment job on real multi-process Ray clusters: `deeplab submit` to a `ray start --head` (token auth), GPU/CRF
placement on a `ray.cluster_utils.Cluster`, and a CRF node killed mid-job.

The head and the multi-node cluster are started and stopped by this module; nothing stays connected for others.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.cluster.localhead import LocalHead
from pipeline.cluster.services import LOCAL_S3_ENV
from pipeline.config import load_job_config
from pipeline.demo.scenes import class_names, write_voc_dataset
from pipeline.model.deeplab import build_model
from pipeline.model.weights import save_checkpoint
from pipeline.segment import run_segment
from pipeline.storage import filesystem, join, list_files, write_bytes

NUM_CLASSES = 4
SIZE = (96, 72)  # (W, H) of the generated scenes
NODE_MEMORY = 100 << 20  # object store per node


def _checkpoint(directory: Path) -> str:
    import torch

    torch.manual_seed(0)
    model = build_model("deeplab-largefov", num_classes=NUM_CLASSES, width=1 / 16)
    path = directory / "tiny.pt"
    save_checkpoint(
        model, str(path), class_names=class_names(NUM_CLASSES), provenance={"source": "test: random"}
    )
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return _checkpoint(tmp_path_factory.mktemp("model"))


def _output_rows(output_uri: str, storage_cfg) -> list[dict]:
    fs, path = filesystem(join(output_uri, "masks"), storage_cfg)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


def _check_rows(rows: list[dict], count: int) -> None:
    """Exactly one row per scene, all ok, both masks decode to the image size."""
    ids = Counter(r[S.ID] for r in rows)
    assert sorted(ids) == [f"scene_{i:06d}" for i in range(count)]
    assert set(ids.values()) == {1}, f"duplicated rows: {[k for k, v in ids.items() if v > 1]}"
    for row in rows:
        assert row[S.STATUS] == S.OK, (row[S.ID], row[S.ERROR])
        for column in ("mask_png", "raw_mask_png"):
            mask = np.asarray(Image.open(io.BytesIO(row[column])))
            assert mask.shape == (SIZE[1], SIZE[0]) and mask.dtype == np.uint8, (row[S.ID], column)
            assert int(mask.max()) < NUM_CLASSES


def _job(input_uri: str, output_uri: str, model: str, storage_cfg, **pools):
    return load_job_config(
        input=input_uri,
        output=output_uri,
        model=model,
        storage={"endpoint_url": storage_cfg.endpoint_url, "max_attempts": 3},
        # Logical GPUs on a CPU-only torch: "auto" would (rightly) refuse the GPU it cannot use; "cpu" runs there.
        dcnn={"batch_size": 1, "min_input_size": 97, "device": "cpu"},
        read={"items_per_block": 2},
        write={"rows_per_file": 2},
        pools=pools,
        evaluate=False,
    )


@contextlib.contextmanager
def _cluster(monkeypatch, *, crf_nodes: int):
    """Head (1 CPU) + one node with a logical GPU + ``crf_nodes`` CPU-only nodes marked {"crf": 2}; connected.

    Yields (cluster, gpu_node, [crf_node, ...]). Logical CPUs exceed the 2 cores on purpose (deadlock guard).
    """
    import ray
    from ray.cluster_utils import Cluster

    # ~/.ray/auth_token may exist on the machine and would switch token auth on behind our back.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "object_store_memory": NODE_MEMORY},
    )
    try:
        gpu = cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=NODE_MEMORY)
        crf = [
            cluster.add_node(num_cpus=2, resources={"crf": 2}, object_store_memory=NODE_MEMORY)
            for _ in range(crf_nodes)
        ]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, gpu, crf
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def multinode(local_s3):
    """One cluster for (b) and (c), which each start a job on it: (b) runs first, (c) then removes a CRF node."""
    with pytest.MonkeyPatch.context() as mp, _cluster(mp, crf_nodes=2) as nodes:
        yield nodes


# --- (a) deeplab submit to a real `ray start --head` ---------------------------------------------------------------


def test_submit_segment_to_local_head(local_s3, storage_cfg, bucket, checkpoint, tmp_path):
    count = 6
    write_voc_dataset(
        f"{bucket}/voc", count=count, size=SIZE, num_classes=NUM_CLASSES, seed=11, storage_cfg=storage_cfg
    )
    write_bytes(f"{bucket}/model/tiny.pt", Path(checkpoint).read_bytes(), storage_cfg)
    config = tmp_path / "job.yaml"  # the head runs on this machine, so it can read the file by absolute path
    config.write_text(
        json.dumps(
            {
                "storage": {"endpoint_url": storage_cfg.endpoint_url},
                "dcnn": {"batch_size": 2, "min_input_size": 97},
                "write": {"rows_per_file": 2},
                "read": {"items_per_block": 2},
            }
        )
    )
    # Credentials reach the job through the head's environment (as an instance role would), not via --env.
    with LocalHead(tmp_path / "head", num_cpus=4, auth_mode="token", extra_env=dict(LOCAL_S3_ENV)) as head:
        assert head.info is not None and head.info.token_file
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        proc = subprocess.run(
            [
                sys.executable, "-m", "pipeline.cli", "submit",
                "--address", head.dashboard_url, "--token-file", head.info.token_file,
                "segment", "--config", str(config), "--input", f"{bucket}/voc",
                "--output", f"{bucket}/out", "--model", f"{bucket}/model/tiny.pt", "--no-evaluate",
            ],
            env={**env, "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "submitted raysubmit_" in out and "SUCCEEDED" in out
    assert LOCAL_S3_ENV["AWS_SECRET_ACCESS_KEY"] not in out
    assert Path(head.base_dir, "auth_token").read_text() not in out
    _check_rows(_output_rows(f"{bucket}/out", storage_cfg), count)


# --- (b) placement on a heterogeneous cluster ------------------------------------------------------------------------


def test_dcnn_on_gpu_node_and_crf_on_crf_nodes(multinode, storage_cfg, bucket, checkpoint):
    import ray

    from pipeline.stages.dcnn import DCNNConfig, DeepLabPredictor

    count = 8
    write_voc_dataset(
        f"{bucket}/voc", count=count, size=SIZE, num_classes=NUM_CLASSES, seed=5, storage_cfg=storage_cfg
    )
    cluster, gpu, crf_nodes = multinode

    @ray.remote(num_gpus=1, num_cpus=0)
    class Probe:
        # A logical GPU on a machine without CUDA: Ray sets CUDA_VISIBLE_DEVICES, torch still sees no device.
        def run(self, device: str) -> tuple[str, str | None, str]:
            try:
                predictor = DeepLabPredictor(DCNNConfig(model_uri=checkpoint, device=device))
            except RuntimeError as e:
                return f"error: {e}", None, ""
            node = ray.get_runtime_context().get_node_id()
            return str(predictor.device), os.environ.get("CUDA_VISIBLE_DEVICES"), node

    probe = Probe.remote()
    device, _, _ = ray.get(probe.run.remote("auto"), timeout=120)
    assert "Ray assigned GPUs" in device and "CPU-only build" in device, device
    device, visible, node = ray.get(probe.run.remote("cpu"), timeout=120)
    assert (device, visible, node) == ("cpu", "0", gpu.node_id)
    ray.kill(probe)

    cfg, crf_raw = _job(f"{bucket}/voc", f"{bucket}/out", checkpoint, storage_cfg, crf_resource="crf")
    manifest = run_segment(cfg, crf_raw)
    rows = _output_rows(f"{bucket}/out", storage_cfg)
    _check_rows(rows, count)
    assert {r["dcnn_node"] for r in rows} == {gpu.node_id}
    used = {r["crf_node"] for r in rows}
    assert used and used <= {n.node_id for n in crf_nodes}
    assert manifest["run"]["nodes"] == {"dcnn_node": [gpu.node_id], "crf_node": sorted(used)}
    assert manifest["run"]["pools"]["dcnn_num_gpus"] == 1.0
    assert manifest["run"]["pools"]["crf_resources"] == {"crf": 1.0}
    assert cluster.head_node.node_id not in {r["dcnn_node"] for r in rows} | {r["crf_node"] for r in rows}


# --- (c) a CRF node lost mid-job -------------------------------------------------------------------------------------


def test_crf_node_killed_mid_job_every_row_once(multinode, storage_cfg, bucket, checkpoint):
    count = 30
    write_voc_dataset(
        f"{bucket}/voc", count=count, size=SIZE, num_classes=NUM_CLASSES, seed=9, storage_cfg=storage_cfg
    )
    masks = join(bucket, "out", "masks")
    cluster, gpu, crf_nodes = multinode
    # Up to 2 CRF actors, and each CRF node alone has room for 2: the survivor can host every restarted actor.
    cfg, crf_raw = _job(
        f"{bucket}/voc", f"{bucket}/out", checkpoint, storage_cfg, crf_resource="crf", crf_max_actors=2
    )
    result: dict = {}

    def run() -> None:
        try:
            result["manifest"] = run_segment(cfg, crf_raw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread below
            result["error"] = e

    job = threading.Thread(target=run, daemon=True)
    job.start()
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
        if not list_files(masks, storage_cfg):
            continue
        # Kill a CRF node that has done work, so its actors and in-flight tasks are really lost.
        used = {r["crf_node"] for r in _output_rows(f"{bucket}/out", storage_cfg)}
        victim = next((n for n in crf_nodes if n.node_id in used), None)
    assert victim is not None and job.is_alive(), f"no node removed mid-job: {result}"
    committed_before = len(_output_rows(f"{bucket}/out", storage_cfg))
    cluster.remove_node(victim, allow_graceful=False)
    job.join(timeout=300)
    assert not job.is_alive(), "the job did not finish after the node loss"
    if "error" in result:
        raise result["error"]

    assert committed_before < count
    rows = _output_rows(f"{bucket}/out", storage_cfg)
    _check_rows(rows, count)  # every row exactly once, none lost with the node
    manifest = result["manifest"]
    assert manifest["counts"]["rows"] == count and manifest["counts"]["processed_this_run"] >= count
    survivor = next(n for n in crf_nodes if n is not victim)
    assert {r["crf_node"] for r in rows} <= {victim.node_id, survivor.node_id}
    assert survivor.node_id in {r["crf_node"] for r in rows}  # the work went on without the lost node
    assert {r["dcnn_node"] for r in rows} == {gpu.node_id}
