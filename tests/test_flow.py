"""flow: the DCNN's run-ahead is capped from the first block (bound_run_ahead), on real Ray Data."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from ray.data import ActorPoolStrategy

from pipeline.cluster.pools import PoolPlan
from pipeline.flow import block_rows, bound_run_ahead

ROWS = 40
# 256 KiB per row: the count ahead is what is measured, and a small row is produced fast even on a loaded machine.
PAYLOAD = 1 << 18


def _max_run_ahead() -> int:
    """Rows a fast actor stage had produced but the slow one had not yet consumed, at the worst moment.

    Two actor stages, as the DCNN and CRF pools (Ray Data fuses a task stage into the actor after it, leaving no
    queue). The classes are local so that cloudpickle ships them by value: Ray workers can't import this module.
    The producer starts only once the consumer is up, as the DCNN (loading a model) does in the job: Ray applies no
    brake while its consumer has nothing in flight, so a consumer slow to start on a loaded machine would measure
    start-up, not the brake.
    """
    import ray

    @ray.remote(num_cpus=0)
    class Started:
        def __init__(self) -> None:
            self.up = False

        def set(self) -> None:
            self.up = True

        def get(self) -> bool:
            return self.up

    # A name per call: a killed actor frees its name only after a while.
    name = f"run-ahead-consumer-started-{uuid.uuid4().hex}"
    started = Started.options(name=name).remote()

    class Produce:  # the DCNN: a row in no time
        def __init__(self) -> None:
            signal = ray.get_actor(name)
            while not ray.get(signal.get.remote()):
                time.sleep(0.05)

        def __call__(self, batch: dict) -> dict:
            n = len(batch["item"])
            return {
                "item": batch["item"],
                "payload": np.zeros((n, PAYLOAD), np.uint8),
                "produced": np.full(n, time.time()),
            }

    class SlowConsumer:  # the CRF: ~40x slower
        def __init__(self) -> None:
            ray.get(ray.get_actor(name).set.remote())

        def __call__(self, batch: dict) -> dict:
            time.sleep(0.4)
            return {"item": batch["item"], "produced": batch["produced"], "consumed": np.full(1, time.time())}

    ds = ray.data.from_items([{"item": i} for i in range(ROWS)], override_num_blocks=ROWS)
    ds = ds.map_batches(Produce, batch_size=None, compute=ActorPoolStrategy(size=1), num_cpus=1)
    ds = ds.map_batches(SlowConsumer, batch_size=1, compute=ActorPoolStrategy(size=1), num_cpus=1)
    try:
        rows = ds.take_all()
    finally:
        ray.kill(started)
    assert sorted(r["item"] for r in rows) == list(range(ROWS))
    produced = np.sort([r["produced"] for r in rows])
    consumed = np.sort([r["consumed"] for r in rows])
    return int(max(np.searchsorted(produced, t, side="right") - k for k, t in enumerate(consumed)))


def test_bound_run_ahead_caps_a_fast_stage_ahead_of_a_slow_one(ray_local, monkeypatch):
    from ray.data._internal.execution.backpressure_policy import DownstreamCapacityBackpressurePolicy

    monkeypatch.delenv("RAY_DATA_DOWNSTREAM_CAPACITY_OBJECT_STORE_BUDGET_UTIL_THRESHOLD", raising=False)
    # Ray's default: the cap engages only at half the stage's object-store budget, so nearly every row runs ahead.
    monkeypatch.setattr(DownstreamCapacityBackpressurePolicy, "OBJECT_STORE_BUDGET_UTIL_THRESHOLD", 0.5)
    unbounded = _max_run_ahead()
    bound_run_ahead()
    assert DownstreamCapacityBackpressurePolicy.OBJECT_STORE_BUDGET_UTIL_THRESHOLD == 0.0
    bounded = _max_run_ahead()
    # Measured here, idle or with both cores busy: 30 rows unbounded, 8 bounded (the consumer's 2 blocks in flight,
    # 2x that queued, the producer's own).
    print(f"\nFIGURES run-ahead: unbounded {unbounded}, bounded {bounded}")
    assert unbounded >= 20, unbounded
    assert bounded <= 12, bounded


def test_an_explicit_environment_setting_wins(monkeypatch):
    """Ray read the variable into the attribute at import: bound_run_ahead must leave the user's value alone."""
    from ray.data._internal.execution.backpressure_policy import DownstreamCapacityBackpressurePolicy

    monkeypatch.setattr(DownstreamCapacityBackpressurePolicy, "OBJECT_STORE_BUDGET_UTIL_THRESHOLD", 0.3)
    monkeypatch.setenv("RAY_DATA_DOWNSTREAM_CAPACITY_OBJECT_STORE_BUDGET_UTIL_THRESHOLD", "0.3")
    bound_run_ahead()
    assert DownstreamCapacityBackpressurePolicy.OBJECT_STORE_BUDGET_UTIL_THRESHOLD == 0.3


def test_a_part_storage_refuses_stops_the_job_with_a_storage_outage():
    """A commit that fails past the client's retries (here: nothing listens) is an outage, not a traceback."""
    from pipeline.flow import write_rows
    from pipeline.storage import StorageConfig, StorageOutage
    from tests.stages.test_write import _rows

    down = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout_s=1)
    with pytest.raises(StorageOutage, match=r"^storage outage: cannot commit a part under s3://nowhere/out"):
        write_rows(_rows(["a"], ["ok"], [False], [""]), "s3://nowhere/out", down)


def test_block_rows_cut_a_small_job_into_16_blocks_per_actor():
    plan = PoolPlan(dcnn_num_gpus=0.0, dcnn_num_cpus=1.0, dcnn_size=(1, 1), crf_size=(2, 2), crf_resources={})
    assert block_rows(200, plan, 250) == 7  # 29 blocks: the first CRF block waits for 7 DCNN rows, not 25
    assert block_rows(3, plan, 250) == 1
    assert block_rows(1_000_000, plan, 250) == 250  # large jobs keep the configured block size
    big = PoolPlan(
        dcnn_num_gpus=1.0, dcnn_num_cpus=1.0, dcnn_size=(8, 8), crf_size=(64, 64), crf_resources={}
    )
    assert block_rows(100_000, big, 250) == 98
