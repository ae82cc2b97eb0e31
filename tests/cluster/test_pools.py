"""Pools for a cluster that grows: plan_pools on present resources plus the autoscaler's maxima or config, the
bounded wait for the pools' minimum, and a job on a ray.cluster_utils.Cluster that waits for its GPU node to join.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline import schema as S
from pipeline.cluster.pools import PoolPlan, plan_cluster_pools, plan_pools
from pipeline.config import ConfigError, PoolConfig

ROOT = Path(__file__).resolve().parents[2]


def _cluster_config(node_types: dict[str, tuple[dict, int, int]]):
    """The autoscaler's ClusterConfig (what it reports to the GCS): {name: (resources, min, max)}."""
    from ray.core.generated import autoscaler_pb2

    return autoscaler_pb2.ClusterConfig(
        node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name=n, resources=r, min_count=lo, max_count=hi)
            for n, (r, lo, hi) in node_types.items()
        ]
    )


def _maxima(config) -> dict[str, float]:
    """What Ray makes of a ClusterConfig (GlobalState.get_max_resources_from_cluster_config, without a GCS)."""
    from ray._private.state import GlobalState

    keys = {k for g in config.node_group_configs for k in g.resources}
    return {k: float(GlobalState._calculate_max_resource_from_cluster_config(config, k) or 0) for k in keys}


def _ray_up_types() -> dict[str, tuple[dict, int, int]]:
    doc = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    types = doc["available_node_types"]
    head = doc["head_node_type"]
    return {
        n: (t["resources"], t.get("min_workers", 1), 1 if n == head else t["max_workers"])
        for n, t in types.items()
    }


RAY_UP_MAXIMA = _maxima(_cluster_config(_ray_up_types()))  # 4 x {CPU 4, GPU 1} + 8 x {CPU 16, crf 16} + head
CLUSTER_JOB = PoolConfig(crf_resource="crf")


def test_ray_up_maxima_are_the_node_types_times_their_maxima():
    assert RAY_UP_MAXIMA == {"CPU": 4 * 4 + 8 * 16, "GPU": 4, "crf": 8 * 16}


def test_fresh_head_without_cpus_plans_from_the_node_types_and_waits():
    # `ray up` head (CPU 0) before any worker joined: no "0 CPU slots" error, the GPU plan sized to the maxima.
    plan = plan_pools({"CPU": 0}, CLUSTER_JOB, maxima=RAY_UP_MAXIMA)
    assert (plan.dcnn_num_gpus, plan.dcnn_size, plan.crf_size) == (1.0, (1, 4), (1, 128))
    assert plan.maxima_source == "autoscaler"
    assert plan.missing({"CPU": 0}) == {"CPU": 1 + 1 + 3, "GPU": 1, "crf": 1}


def test_fresh_head_without_cpus_and_no_autoscaler_view_waits_for_cpus():
    plan = plan_pools({"CPU": 0}, PoolConfig())  # nothing known: no raise, the caller waits for the minimum
    assert plan.dcnn_num_gpus == 0.0 and plan.maxima_source == "present"
    assert plan.missing({"CPU": 0}) == {"CPU": 4.0}
    assert plan.missing({"CPU": 4}) == {}


def test_cpu_node_up_gpu_node_booting_is_not_the_cpu_plan():
    present = {"CPU": 16, "crf": 16}
    plan = plan_pools(present, CLUSTER_JOB, maxima=RAY_UP_MAXIMA)
    # Sized to every node the GPU node type may have, not to the 0 GPUs present.
    assert plan.dcnn_num_gpus == 1.0 and plan.dcnn_size == (1, 4)
    assert plan.missing(present) == {"GPU": 1}
    # Start what the present CPUs hold beside the DCNN minimum and the tasks; grow into CPU nodes that join.
    assert plan.crf_size == (16 - 1 - 3, 128)
    # The same without an autoscaler view, from explicit config.
    plan = plan_pools(present, PoolConfig(crf_resource="crf", max_gpus=4))
    assert (plan.dcnn_num_gpus, plan.dcnn_size, plan.maxima_source) == (1.0, (1, 4), "config")
    assert plan.missing(present) == {"GPU": 1}


def test_present_gpus_do_not_cap_the_dcnn_pool():
    present = {"CPU": 20, "GPU": 1, "crf": 16}  # one node of each worker type, as right after `ray up`
    plan = plan_pools(present, CLUSTER_JOB, maxima=RAY_UP_MAXIMA)
    assert plan.dcnn_size == (1, 4) and plan.crf_size == (16, 128) and plan.crf_resources == {"crf": 1.0}
    assert plan.missing(present) == {}


def test_task_slots_are_reserved_cluster_wide():
    # No crf resource: CRF actors take any CPU. Beyond pools.task_cpus every GPU's DCNN actor keeps a slot for its
    # read/decode tasks, at the maxima as now.
    pools = PoolConfig(task_cpus=2, task_cpus_per_gpu=2)
    plan = plan_pools({"CPU": 8, "GPU": 1}, pools, maxima={"CPU": 40, "GPU": 4})
    assert plan.dcnn_size == (1, 4)
    assert plan.crf_size == (8 - 1 - (2 + 2 * 1), 40 - 4 - (2 + 2 * 4))  # (3, 26)
    assert plan.task_cpus == 2 + 2 * 1
    # On CPUs the read and decode are fused into the DCNN actor: only task_cpus stay free.
    plan = plan_pools({"CPU": 8}, pools)
    assert plan.crf_size == (8 - 1 - 2, 8 - 1 - 2) and plan.task_cpus == 2


def test_require_gpu():
    with pytest.raises(ConfigError, match="no GPU and no node type with one") as e:
        plan_pools({"CPU": 16}, PoolConfig(require_gpu=True), maxima={"CPU": 64})
    assert "\n" not in str(e.value)
    # Opt out: only the GPUs present count, nothing is waited for.
    plan = plan_pools({"CPU": 16}, PoolConfig(require_gpu=False), maxima=RAY_UP_MAXIMA)
    assert plan.dcnn_num_gpus == 0.0 and "GPU" not in plan.missing({"CPU": 16})
    plan = plan_pools({"CPU": 16, "GPU": 2}, PoolConfig(require_gpu=False), maxima=RAY_UP_MAXIMA)
    assert plan.dcnn_size == (1, 2)


def test_a_known_ceiling_too_small_fails_at_planning():
    with pytest.raises(ConfigError, match="may grow to 4 CPU slots but the pools need 5"):
        plan_pools({"CPU": 0}, PoolConfig(), maxima={"CPU": 4, "GPU": 1})
    with pytest.raises(ConfigError, match="may grow to 0 of it"):
        plan_pools({"CPU": 8}, PoolConfig(crf_resource="crf"), maxima={"CPU": 8})
    assert plan_pools({"CPU": 8}, PoolConfig(crf_resource="crf"), crf_enabled=False).crf_size == (0, 0)


def test_cluster_job_config_expects_the_gpu_node_types():
    from pipeline.config import load_job_config

    cfg, _ = load_job_config(
        str(ROOT / "infra" / "cluster-job.yaml"), input="s3://b/in", output="s3://b/out", model="s3://b/m.pt"
    )
    gpu_max = _ray_up_types()["gpu_worker"][2]
    k8s = []
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load((ROOT / "infra" / "k8s" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        k8s += [g["maxReplicas"] for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    assert cfg.pools.require_gpu is True and cfg.pools.max_gpus == gpu_max == 4 and k8s == [4, 4]
    # A fresh `ray up` head whose autoscaler reports no node types: still the GPU plan over every GPU node.
    plan = plan_pools({"CPU": 0}, cfg.pools)
    assert (plan.dcnn_num_gpus, plan.dcnn_size, plan.maxima_source) == (1.0, (1, 4), "config")
    assert plan.missing({"CPU": 0})["GPU"] == 1


class _FakeCluster:
    """Resources that change after a number of polls; a clock the waits advance."""

    def __init__(self, steps: list[dict]):
        self.steps, self.now, self.requests = steps, 0.0, []

    def resources(self) -> dict:
        return self.steps[min(int(self.now), len(self.steps) - 1)]

    def sleep(self, s: float) -> None:
        self.now += s


def _plan_on(fake: _FakeCluster, pools: PoolConfig, maxima) -> PoolPlan:
    return plan_cluster_pools(
        pools,
        resources=fake.resources,
        maxima=lambda: maxima,
        request=lambda bundles, expire_s: fake.requests.append((bundles, expire_s)),
        clock=lambda: fake.now,
        sleep=fake.sleep,
    )


def test_waits_for_the_first_gpu_then_plans_from_what_joined():
    booting, up = {"CPU": 16, "crf": 16}, {"CPU": 20, "GPU": 1, "crf": 16}
    fake = _FakeCluster([booting, booting, booting, up])
    plan = _plan_on(fake, PoolConfig(crf_resource="crf", resource_wait_s=10), RAY_UP_MAXIMA)
    assert fake.now == 4 and plan.dcnn_num_gpus == 1.0 and plan.missing(up) == {}  # 3 polls + 1 to settle
    ((bundles, expire_s),) = fake.requests  # one request: what the pools need to start, planned while booting
    assert expire_s == 10
    assert sorted(map(sorted, map(dict.items, bundles))) == sorted(
        [[("CPU", 1.0), ("GPU", 1.0)]] + [[("CPU", 1.0), ("crf", 1.0)]] * 12 + [[("CPU", 1.0)]] * 3
    )


def test_no_gpu_in_time_fails_with_a_one_line_cause():
    fake = _FakeCluster([{"CPU": 16, "crf": 16}])
    with pytest.raises(ConfigError) as e:
        _plan_on(fake, PoolConfig(crf_resource="crf", resource_wait_s=5), RAY_UP_MAXIMA)
    msg = str(e.value)
    assert msg.startswith("no GPU after waiting 5s") and "pools.resource_wait_s" in msg and "\n" not in msg
    assert fake.now == 5


def test_nothing_present_is_nothing_to_wait_for():
    fake = _FakeCluster([{"CPU": 8}])
    assert _plan_on(fake, PoolConfig(), None).crf_size == (5, 5)
    assert fake.requests == [] and fake.now == 0


def test_ray_pools_fix_the_pools_on_gpus_and_crf_nodes_at_their_maximum():
    plan = plan_pools({"CPU": 20, "GPU": 1, "crf": 16}, CLUSTER_JOB, maxima=RAY_UP_MAXIMA)
    one_each = {"max_tasks_in_flight_per_actor": 1}
    # Capped at one actor per block; the actors beyond what is present wait pending for their nodes.
    assert plan.ray_pools(3) == (
        {"min_size": 3, "max_size": 3},
        {"min_size": 16, "max_size": 16, **one_each},
    )
    assert plan.ray_pools(1000) == (
        {"min_size": 4, "max_size": 4}, {"min_size": 128, "max_size": 128, **one_each}
    )  # fmt: skip
    # A CRF pool on any CPU stays elastic, with the tasks in flight that let Ray Data grow it; on CPUs the DCNN
    # pool is what the plan says.
    plan = plan_pools({"CPU": 8, "GPU": 1}, PoolConfig(), maxima={"CPU": 40, "GPU": 4})
    dcnn, crf = plan.ray_pools(1000)
    assert dcnn == {"min_size": 4, "max_size": 4}
    assert crf == {"min_size": 4, "max_size": 40 - 4 - (2 + 4), "max_tasks_in_flight_per_actor": 2}
    plan = plan_pools({"CPU": 8}, PoolConfig())
    assert plan.ray_pools(1000) == (
        {"min_size": 1, "max_size": 1},
        {"min_size": 5, "max_size": 5, **one_each},
    )


# --- a real cluster: GPU and CRF nodes join while the job runs ------------------------------------------------------


class _Seen(logging.Handler):
    def __init__(self, text: str):
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@contextlib.contextmanager
def _autoscaling_cluster(monkeypatch, node_types: dict, nodes: list[dict]):
    """A Cluster (head: 2 CPUs) with ``nodes`` up and ``node_types`` published as an autoscaler would; connected."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.experimental.internal_kv import _internal_kv_put

    from tests.cluster.test_cluster import NODE_MEMORY

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        ray.shutdown()
    head = {"num_cpus": 2, "num_gpus": 0, "object_store_memory": NODE_MEMORY}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        up = [cluster.add_node(object_store_memory=NODE_MEMORY, **n) for n in nodes]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        _internal_kv_put(
            ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, _cluster_config(node_types).SerializeToString(),
            namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE,
        )  # fmt: skip
        yield cluster, up
    finally:
        ray.shutdown()
        cluster.shutdown()


def _run_while(cfg, crf_overrides: dict, steps: list[tuple[str, str, Callable[[], object]]]) -> dict:
    """run_segment in a thread; for each (logger, text, then) in turn, once ``logger`` logs ``text`` call ``then()``
    (add nodes). Returns {"manifest": ..., "then": [what each then() returned]}."""
    from pipeline.segment import run_segment

    seen = [(logging.getLogger(name), _Seen(text), then) for name, text, then in steps]
    for log, handler, _ in seen:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    result: dict = {"then": []}

    def run() -> None:
        try:
            result["manifest"] = run_segment(cfg, crf_overrides)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread below
            result["error"] = e

    try:
        job = threading.Thread(target=run, daemon=True)
        job.start()
        for _, handler, then in seen:
            assert handler.event.wait(120), f"the job did not log {handler.text!r}: {result}"
            result["then"].append(then())
        job.join(timeout=240)
    finally:
        for log, handler, _ in seen:
            log.removeHandler(handler)
    assert not job.is_alive(), "the job did not finish"
    if "error" in result:
        raise result["error"]
    return result


def test_nodes_join_a_waiting_then_a_running_job(monkeypatch, local_s3, storage_cfg, bucket, tmp_path):
    from pipeline.cluster.pools import cluster_maxima
    from pipeline.demo.scenes import write_voc_dataset
    from tests.cluster.test_cluster import NODE_MEMORY, NUM_CLASSES, _checkpoint, _job, _output_rows

    count = 16
    write_voc_dataset(f"{bucket}/voc", count=count, size=(160, 120), num_classes=NUM_CLASSES, seed=3,
                      storage_cfg=storage_cfg)  # fmt: skip
    # Head (planning, read/decode, encode/write tasks) + one CRF node; the GPU node type has none yet.
    types = {
        "head": ({"CPU": 2}, 1, 1),
        "gpu": ({"CPU": 2, "GPU": 1}, 0, 2),
        "crf": ({"CPU": 1, "crf": 1}, 1, 2),
    }
    with _autoscaling_cluster(monkeypatch, types, [{"num_cpus": 1, "resources": {"crf": 1}}]) as (
        cluster,
        up,
    ):
        assert cluster_maxima() == {"CPU": 8.0, "GPU": 2.0, "crf": 2.0}
        cfg, _ = _job(f"{bucket}/voc", f"{bucket}/out", _checkpoint(tmp_path), storage_cfg,
                      crf_resource="crf", resource_wait_s=120)  # fmt: skip

        def gpu() -> object:
            return cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=NODE_MEMORY)

        def crf() -> object:
            return cluster.add_node(num_cpus=1, resources={"crf": 1}, object_store_memory=NODE_MEMORY)

        # A GPU node joins the job waiting for its first GPU; once it runs, a second GPU node and a second CRF
        # node join. 30 mean-field iterations, not stopped early (adaptive: false): seconds of CRF work per block,
        # so the job outlasts their start.
        result = _run_while(cfg, {"iterations": 30, "adaptive": False}, [
            ("pipeline.cluster.pools", "waiting up to", gpu), ("pipeline.flow", "blocks of", lambda: (gpu(), crf())),
        ])  # fmt: skip

    rows = _output_rows(f"{bucket}/out", storage_cfg)
    assert sorted(r[S.ID] for r in rows) == [f"scene_{i:06d}" for i in range(count)]
    assert {r[S.STATUS] for r in rows} == {S.OK}
    gpu_a, (gpu_b, crf_b) = result["then"]
    # The DCNN ran only on GPU nodes that joined after the start (no CPU plan), the CRF only on CRF nodes, and the
    # nodes that joined the running job took blocks. Which of a pool's two actors gets which block is Ray Data's
    # choice: on a quiet machine one warm actor of a stage may take them all, so each stage is not asked for both.
    dcnn_nodes, crf_nodes = {r["dcnn_node"] for r in rows}, {r["crf_node"] for r in rows}
    assert dcnn_nodes and dcnn_nodes <= {gpu_a.node_id, gpu_b.node_id}
    assert crf_nodes and crf_nodes <= {up[0].node_id, crf_b.node_id}
    assert gpu_b.node_id in dcnn_nodes or crf_b.node_id in crf_nodes, (dcnn_nodes, crf_nodes)
    pools = result["manifest"]["run"]["pools"]
    assert pools["dcnn_num_gpus"] == 1.0 and pools["maxima_source"] == "autoscaler"
    assert tuple(pools["dcnn_size"]) == (1, 2) and tuple(pools["crf_size"]) == (1, 2)
