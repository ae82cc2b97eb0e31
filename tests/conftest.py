"""Shared fixtures: a real moto S3 server and s3rver (a second S3 implementation) on 127.0.0.1, a local Ray."""

from __future__ import annotations

import os
import uuid
from collections import Counter

import pytest

from pipeline.cluster.services import LOCAL_S3_ENV, LocalS3
from pipeline.storage import StorageConfig, s3_client


@pytest.fixture
def fresh_clients():
    """This process's cached boto3 session (and its credentials), clients and pyarrow filesystems, dropped before
    and after the test: for a test that changes the credentials or endpoint in os.environ."""
    from pipeline import storage

    def clear() -> None:
        storage._boto_session.cache_clear()
        storage.s3_client.cache_clear()
        storage.bucket_region.cache_clear()
        storage._filesystems.clear()

    clear()
    yield
    clear()


@pytest.fixture(scope="session")
def s3rver():
    """s3rver (npm) on 127.0.0.1 with a free port and one bucket, ``data``; its credentials are in
    ``s3compat.S3RVER_ENV``. Nothing goes into os.environ: tests hand the endpoint to a subprocess or a config."""
    from tests.s3compat import S3rver

    with S3rver(buckets=("data",)) as server:
        yield server


@pytest.fixture(scope="session")
def local_s3():
    """A moto server (HTTP, 127.0.0.1, free port). Credentials go into os.environ so Ray workers inherit them."""
    saved = {k: os.environ.get(k) for k in (*LOCAL_S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(LOCAL_S3_ENV)
    with LocalS3() as s3:
        yield s3
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def storage_cfg(local_s3) -> StorageConfig:
    return StorageConfig(endpoint_url=local_s3.endpoint_url, max_attempts=3)


@pytest.fixture
def bucket(storage_cfg) -> str:
    """A fresh, empty bucket; returns its s3:// URI."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(storage_cfg).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def ray_local(local_s3):
    """A local Ray cluster with more logical CPUs than cores (avoids the actor-pool CPU deadlock on 2 cores), per
    test module: a module's tests share it, and tests outside Ray never see one left running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Explicit, like the multi-node tests: ~/.ray/auth_token (Ray writes one) must not switch token auth on for a
    # GCS this process starts while its client, configured by an earlier test, expects none.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


# A test that uses one of these fixtures needs a server or a cluster: it is in the integration tier whatever its
# file says (`make test-fast` = -m "not integration"). Tests that start a subprocess job, a browser or a
# multi-node cluster without them carry @pytest.mark.integration themselves.
INTEGRATION_FIXTURES = frozenset({"ray_local", "local_s3", "storage_cfg", "bucket", "s3rver"})


# Serial seconds of the slow modules (`pytest -m integration --durations=0`, 2026-12-07, this 2-core VM): only their
# order matters. A module missing here goes after them, by its count of integration tests.
MODULE_SECONDS = {
    "tests/test_reliability.py": 193,
    "tests/output/test_exactly_once.py": 129,
    "tests/test_segment.py": 123,
    "tests/cluster/test_cluster.py": 112,
    "tests/tune/test_tune.py": 61,
    "tests/test_flow.py": 44,
    "tests/test_s3rver.py": 42,
    "tests/demo/test_demo.py": 40,
    "tests/cluster/test_pools.py": 38,
    "tests/test_trust.py": 35,
    "tests/cluster/test_submit.py": 34,
    "tests/train/test_train.py": 27,
    "tests/test_storage.py": 21,
    "tests/metrics/test_evaluate.py": 18,
    "tests/export/test_export.py": 18,
    "tests/stages/test_dcnn.py": 13,
    "tests/cluster/test_localhead.py": 11,
    "tests/stages/test_plan.py": 8,
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)

    # Longest modules first (MODULE_SECONDS, else their count of integration tests), each module's
    # tests in their order: `make test` hands whole modules to two xdist workers in this order, so no long module
    # starts last and the unit modules fill the end (longest-first keeps the two workers' totals close).
    def module(item) -> str:
        return item.nodeid.split("::")[0]

    weight = Counter(module(it) for it in items if it.get_closest_marker("integration") is not None)
    items.sort(key=lambda it: (-MODULE_SECONDS.get(module(it), 0), -weight[module(it)]))  # stable
