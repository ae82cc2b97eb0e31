"""Pools, before the flow starts: what the cluster has and may grow to, sized into actor pools (flow.build_dataset).

Where each number comes from (in this order):

- **present**: ``ray.cluster_resources()``, the nodes up now.
- **may grow to**: the autoscaler's node types and maxima, which the autoscaler reports to the GCS (the same
  ``ClusterConfig`` Ray Data 2.60 sizes its own autoscaling from: ``ray._private.state.state.get_cluster_config``);
  raised by ``pools.max_gpus`` when set (a cluster whose autoscaler does not report node types, or an operator who
  knows better). Without either, the cluster may grow to what is present.
- **expected GPUs**: ``pools.require_gpu`` (True: fail unless a GPU comes; False: plan from the GPUs present, never
  wait), else whether the cluster has or may grow to a GPU.

The pool maxima follow what the cluster may grow to and the minima what it has. Ray Data gets them through
``PoolPlan.ray_pools``: pools on GPUs or on ``crf_resource`` nodes are fixed at their maximum (capped at one actor per
block), so the actors that do not fit wait as pending actors, the Ray autoscaler launches nodes for them and each
starts as its node joins; Ray Data's own actor autoscaler did not add actors on nodes that joined mid-job
(docs/operations.md, "Autoscaling"). A CRF pool on any CPU stays elastic. When the minimum does not fit what
is present (a fresh head with ``CPU: 0``, the GPU node still booting), ``plan_cluster_pools`` asks the autoscaler
for that minimum and waits up to ``pools.resource_wait_s``, then fails with the cause in one line. It never falls
back to the CPU plan when GPUs are expected.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import PoolConfig

__all__ = ["PoolPlan", "cluster_maxima", "plan_pools", "plan_cluster_pools", "request_pool_resources"]

log = logging.getLogger(__name__)

_REQUESTER_ID = "deeplab-pipeline.cluster.pools"
_POLL_S = 1.0


@dataclass(frozen=True)
class PoolPlan:
    dcnn_num_gpus: float
    dcnn_num_cpus: float
    dcnn_size: tuple[int, int]  # (min, max) actors
    crf_size: tuple[int, int]
    crf_resources: dict[str, float]
    task_cpus: float = 0.0  # CPU slots the tasks (read/decode/encode/write) need beside the minimum pools
    maxima_source: str = "present"  # where "may grow to" came from: autoscaler | config | present

    def missing(self, present: dict[str, float], *, crf_enabled: bool = True) -> dict[str, float]:
        """Resources the pools' minima plus the task slots need that ``present`` lacks (empty: the job can start)."""
        crf_min = self.crf_size[0] if crf_enabled else 0
        need = {
            "CPU": self.dcnn_size[0] * self.dcnn_num_cpus + crf_min + self.task_cpus,
            "GPU": self.dcnn_size[0] * self.dcnn_num_gpus,
        }
        for name in self.crf_resources:
            need[name] = need.get(name, 0.0) + crf_min
        return {k: v - float(present.get(k, 0)) for k, v in need.items() if float(present.get(k, 0)) < v}

    def bundles(self, *, crf_enabled: bool = True) -> list[dict[str, float]]:
        """The resource shapes the job needs to start: the pools' minimum actors and the task slots.

        Not the maxima: this request only gets the job started. The fixed pools' pending actors (ray_pools) are
        what makes the autoscaler launch nodes up to the pools' maxima, and only for a job that has the blocks.
        """
        dcnn = {"CPU": self.dcnn_num_cpus, **({"GPU": self.dcnn_num_gpus} if self.dcnn_num_gpus else {})}
        crf = {"CPU": 1.0, **self.crf_resources}
        out = [dict(dcnn) for _ in range(self.dcnn_size[0])]
        out += [dict(crf) for _ in range(self.crf_size[0] if crf_enabled else 0)]
        return out + [{"CPU": 1.0} for _ in range(math.ceil(self.task_cpus))]

    def ray_pools(self, num_blocks: int) -> tuple[dict[str, int], dict[str, int]]:
        """The DCNN's and the CRF's ``ActorPoolStrategy`` arguments for a job of ``num_blocks`` blocks.

        A pool on resources only some nodes have (GPUs, ``crf_resource``) is fixed at its maximum, at most one actor
        per block: Ray Data 2.60's actor autoscaler adds an actor only when the operator's CPU budget holds one, and
        that budget follows what the cluster had when the job started, so an elastic pool never grew into nodes
        that joined mid-job. The actors of a fixed pool that do not fit yet wait as pending actors: the Ray
        autoscaler launches nodes for them (up to the node types' maxima) and each starts when its node joins.
        A pool on any CPU stays elastic (``crf_size``): fixed at its maximum, its pending actors would take the CPU
        slots the tasks free between blocks (the actor-pool deadlock).
        """

        def fixed(size: tuple[int, int]) -> dict[str, int]:
            n = max(size[0], min(size[1], num_blocks))
            return {"min_size": n, "max_size": n}

        # The DCNN keeps Ray Data's default blocks in flight per actor (the next block arrives while one runs).
        dcnn = (
            fixed(self.dcnn_size)
            if self.dcnn_num_gpus
            else {"min_size": self.dcnn_size[0], "max_size": self.dcnn_size[1]}
        )
        if self.crf_resources or self.crf_size[0] == self.crf_size[1]:
            crf = fixed(self.crf_size) | {"max_tasks_in_flight_per_actor": 1}
        else:  # Ray Data adds actors only to a pool with more tasks in flight per actor (_tasks_to_upscale)
            crf = {"min_size": self.crf_size[0], "max_size": self.crf_size[1]}
            crf["max_tasks_in_flight_per_actor"] = _tasks_to_upscale()
        return dcnn, crf


def cluster_maxima() -> dict[str, float] | None:
    """What the autoscaler may grow the cluster to, per resource (None: no autoscaler reports node types).

    Read from the ``ClusterConfig`` the autoscaler keeps in the GCS (node groups with resources and max counts).
    A node group without a maximum counts as unbounded (``sys.maxsize``).
    """
    import ray._private.state

    try:
        maxima = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception as e:  # noqa: BLE001 - a private API: any failure means "not known", never a failed job
        log.debug("no autoscaler cluster config: %s", e)
        return None
    return {k: float(v) for k, v in maxima.items()} if maxima else None


# One function on purpose (~90 lines): the pool-sizing rules in the order they apply (docs/operations.md lists them).
def plan_pools(
    resources: dict[str, float],
    pools: PoolConfig,
    *,
    crf_enabled: bool = True,
    maxima: dict[str, float] | None = None,
) -> PoolPlan:
    """Size the actor pools: maxima from what the cluster may grow to, minima and the CRF start from what it has.

    Never raises for what is merely not present yet ({"CPU": 0} on a fresh head): the caller waits for
    ``plan.missing(present)``. Raises ConfigError only when the cluster can never hold the minimum pools (known
    autoscaler maxima too small, or GPUs required on a cluster that has and may grow to none).
    """
    from pipeline.config import ConfigError

    present = {k: float(v) for k, v in resources.items()}
    grow = dict(present)
    source = "present"
    if maxima:
        source = "autoscaler"
        for k, v in maxima.items():
            grow[k] = max(grow.get(k, 0.0), float(v))
    if pools.max_gpus is not None and pools.max_gpus > grow.get("GPU", 0.0):
        grow["GPU"], source = float(pools.max_gpus), "config"
    gpus_now, gpus_max = int(present.get("GPU", 0)), int(min(grow.get("GPU", 0), 1 << 20))
    if pools.require_gpu is False:
        use_gpu, gpus_max = gpus_now >= 1, gpus_now
    else:
        use_gpu = gpus_max >= 1
        if pools.require_gpu and not use_gpu:
            raise ConfigError(
                "pools.require_gpu is set but the cluster has no GPU and no node type with one: "
                "add a GPU node type (or set pools.max_gpus), or unset pools.require_gpu"
            )

    if use_gpu:
        dcnn_gpus, dcnn_cpus = 1.0, pools.dcnn_num_cpus_with_gpu
        dcnn_max = pools.dcnn_max_actors or gpus_max
        dcnn_now = min(dcnn_max, max(pools.dcnn_min_actors, gpus_now))
        # Read and decode run as tasks beside each GPU actor (on CPUs they are fused into the DCNN actor).
        per_dcnn = pools.task_cpus_per_gpu
    else:
        dcnn_gpus, dcnn_cpus = 0.0, pools.dcnn_num_cpus
        dcnn_max = dcnn_now = pools.dcnn_max_actors or pools.dcnn_min_actors
        per_dcnn = 0.0

    def tasks(num_dcnn: int) -> float:  # task slots reserved cluster-wide beside num_dcnn DCNN actors
        return pools.task_cpus + per_dcnn * num_dcnn

    crf_min = pools.crf_min_actors if crf_enabled else 0
    cpus_max = min(grow.get("CPU", 0.0), float(1 << 20))
    need = pools.dcnn_min_actors * dcnn_cpus + crf_min + tasks(pools.dcnn_min_actors)
    if maxima and need > cpus_max:  # the autoscaler's ceiling: waiting would not help
        raise ConfigError(
            f"the cluster may grow to {cpus_max:g} CPU slots but the pools need {need:g} "
            f"({pools.dcnn_min_actors} DCNN x {dcnn_cpus:g} + {crf_min} CRF + "
            f"{tasks(pools.dcnn_min_actors):g} for tasks): lower pools.*_min_actors, pools.dcnn_num_cpus or "
            "pools.task_cpus*, or allow more CPU nodes"
        )

    crf_resources = {pools.crf_resource: 1.0} if pools.crf_resource else {}
    if pools.crf_resource:
        crf_room_max = int(min(grow.get(pools.crf_resource, 0.0), float(1 << 20)))
        # ... and CPU slots the DCNN actors and the tasks leave free (a crf node's CPUs may be all there is yet).
        cpu_room_now = present.get("CPU", 0.0) - dcnn_now * dcnn_cpus - tasks(dcnn_now)
        crf_room_now = int(min(present.get(pools.crf_resource, 0.0), cpu_room_now))
        if crf_enabled and maxima and crf_room_max < crf_min:
            raise ConfigError(
                f"pools.crf_resource={pools.crf_resource!r} but the cluster may grow to {crf_room_max} of it"
            )
    else:
        crf_room_max = int(cpus_max - dcnn_max * dcnn_cpus - tasks(dcnn_max))
        crf_room_now = int(present.get("CPU", 0.0) - dcnn_now * dcnn_cpus - tasks(dcnn_now))
    crf_max = pools.crf_max_actors or max(crf_min, crf_room_max)
    # The CRF is the bottleneck: start every actor the *present* CPUs hold instead of letting Ray Data add them one
    # by one (each start costs seconds); Ray Data adds the rest as CRF nodes join. Only when whole-CPU actors pack
    # exactly (no fractional DCNN slots), so a fractional slot never leaves the tasks without a CPU.
    if pools.crf_max_actors is None and float(dcnn_cpus).is_integer():
        crf_start = min(crf_max, max(crf_min, crf_room_now))
    else:
        crf_start = crf_min
    return PoolPlan(
        dcnn_gpus,
        dcnn_cpus,
        (pools.dcnn_min_actors, dcnn_max),
        (crf_start, crf_max),
        crf_resources,
        tasks(pools.dcnn_min_actors),
        source,
    )


def _tasks_to_upscale() -> int:
    """Tasks in flight per actor that let Ray Data grow a pool: its actor autoscaler adds actors only once a pool's
    in-flight tasks per actor reach ``autoscaling_config.actor_pool_util_upscaling_threshold`` (1.75 in Ray 2.60),
    so a pool of one-task actors never grows (Ray warns "will not allow it to scale up")."""
    try:
        from ray.data import DataContext

        threshold = DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
    except (ImportError, AttributeError):
        threshold = 1.75
    return max(1, math.ceil(threshold))


def request_pool_resources(bundles: list[dict[str, float]], expire_after_s: float) -> None:
    """Ask the autoscaler for the pools' resources (a hint; a local cluster ignores it).

    Through Ray Data's autoscaling coordinator when this Ray has it: the coordinator re-sends its merged requests
    every 20 s with ``ray.autoscaler.sdk.request_resources``, which replaces any earlier request, so a request made
    beside it would be dropped within seconds on a cluster where a Ray Data job ran before.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            DefaultAutoscalingCoordinator,
        )
    except ImportError:
        DefaultAutoscalingCoordinator = None
    if DefaultAutoscalingCoordinator is not None:
        DefaultAutoscalingCoordinator(_REQUESTER_ID).request_resources(bundles, expire_after_s=expire_after_s)
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def plan_cluster_pools(
    pools: PoolConfig,
    *,
    crf_enabled: bool = True,
    resources: Callable[[], dict[str, float]] | None = None,
    maxima: Callable[[], dict[str, float] | None] = cluster_maxima,
    request: Callable[[list[dict[str, float]], float], None] = request_pool_resources,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> PoolPlan:
    """plan_pools on the connected cluster; when its minimum is not present, request it and wait (bounded).

    The plan is made again once the resources are there, so the CRF pool starts with what is present then.
    """
    from pipeline.config import ConfigError

    if resources is None:
        import ray

        resources = ray.cluster_resources
    plan = plan_pools(resources(), pools, crf_enabled=crf_enabled, maxima=maxima())
    missing = plan.missing(resources(), crf_enabled=crf_enabled)
    if not missing:
        return plan
    bundles = plan.bundles(crf_enabled=crf_enabled)
    log.info(
        "waiting up to %gs for %s (the pools need them; may grow to them: %s); requested %d bundles",
        pools.resource_wait_s, _fmt(missing), plan.maxima_source, len(bundles),
    )  # fmt: skip
    request(bundles, pools.resource_wait_s)
    deadline = clock() + pools.resource_wait_s
    while missing and clock() < deadline:
        sleep(_POLL_S)
        plan = plan_pools(resources(), pools, crf_enabled=crf_enabled, maxima=maxima())
        missing = plan.missing(resources(), crf_enabled=crf_enabled)
    if not missing:  # a joining node is in the resource view a moment before it takes work: let it settle
        sleep(_POLL_S)
        plan = plan_pools(resources(), pools, crf_enabled=crf_enabled, maxima=maxima())
    if missing:
        what = "no GPU" if "GPU" in missing else _fmt(missing) + " missing"
        raise ConfigError(
            f"{what} after waiting {pools.resource_wait_s:g}s for the pools "
            f"(DCNN {plan.dcnn_size}, CRF {plan.crf_size}, {plan.task_cpus:g} task CPUs): check the autoscaler "
            "(`ray status`: pending or failed nodes), or raise pools.resource_wait_s"
            + ("; pools.require_gpu: false runs on CPUs" if "GPU" in missing else "")
        )
    return plan


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))
