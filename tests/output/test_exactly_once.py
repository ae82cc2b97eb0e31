"""Exactly once under real operations (issue 29): nothing deleted on read errors, one run per output (the lease),
output identity, retryable = transient with an end, injective ids, listing in bounded tasks, duplicate repair."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.demo.scenes import write_voc_dataset
from pipeline.output.lease import LEASE, Lease, LeaseHeld
from pipeline.segment import JobError, StorageDown, run_segment
from pipeline.stages.encode import EncodeConfig, encode_batch
from pipeline.stages.plan import PlanSource, list_inputs, plan_unit
from pipeline.stages.read import fetch_batch
from pipeline.stages.write import IdIndex, RetryIndex, load_done, part_name, write_part
from pipeline.storage import StorageConfig, StorageError, StorageOutage, join, list_files, s3_client, split_s3
from tests.faultproxy import FaultProxy
from tests.stages.test_write import _rows
from tests.test_segment import job, read_output, tiny_checkpoint

LOCAL = StorageConfig()
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("model"), NUM_CLASSES)


def _scenes(uri: str, storage_cfg: StorageConfig, count: int = 6, seed: int = 3) -> str:
    write_voc_dataset(
        uri, count=count, size=(64, 48), num_classes=NUM_CLASSES, seed=seed, storage_cfg=storage_cfg
    )
    return uri


def _objects(prefix: str, storage_cfg: StorageConfig) -> dict[str, str]:
    """{key: etag} of every object under an s3:// prefix: 'unchanged' means this map is equal."""
    bucket, key = split_s3(prefix)
    pages = s3_client(storage_cfg).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


# --- ids ----------------------------------------------------------------------------------------------------------


def test_part_names_encode_the_id_set_unambiguously():
    assert part_name(["a\nb"]) != part_name(["a", "b"])
    assert part_name(["a", "b"]) == part_name(
        ["b", "a"]
    )  # order-independent: a retried block rewrites its part
    assert part_name(['a", "b']) != part_name(["a", "b"])


def test_colliding_stems_in_a_folder_keep_their_extensions(tmp_path):
    for name in ("x.jpg", "x.png", "x.jpg.png", "y.jpg", "z"):
        (tmp_path / name).write_bytes(b"not read")
    _, items = list_inputs(str(tmp_path), LOCAL, input_format="images")
    ids = sorted(i[S.ID] for i in items)
    assert ids == ["x.jpg", "x.jpg.png", "x.png", "y", "z"]  # unique: no image shares a row with another


# --- nothing deleted on read errors -------------------------------------------------------------------------------


def test_parts_that_cannot_be_read_are_kept_and_torn_ones_removed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_part(_rows(["a", "b"], [S.OK, S.OK], [False, False]), str(out), LOCAL)
    write_part(_rows(["c"], [S.OK], [False]), str(out), LOCAL)
    parts = sorted((out / "masks").iterdir())

    import pipeline.stages.write as W

    real_read_bytes, real_parquet_file = W.read_bytes, W.pq.ParquetFile

    def denied(uri, cfg, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", uri)

    def parquet_file(source, *a, **kw):  # pyarrow's own read of a path meets the same refusal
        if isinstance(source, str):
            raise PermissionError(errno.EACCES, "Permission denied", source)
        return real_parquet_file(source, *a, **kw)

    monkeypatch.setattr(W, "read_bytes", denied)
    monkeypatch.setattr(W.pq, "ParquetFile", parquet_file)
    with pytest.raises(StorageError, match="nothing was deleted") as err:
        load_done(str(out), LOCAL)
    assert not isinstance(err.value, StorageOutage)  # permission is permanent: exit 2 with the fix, not 75
    assert sorted((out / "masks").iterdir()) == parts
    monkeypatch.setattr(W, "read_bytes", real_read_bytes)
    monkeypatch.setattr(W.pq, "ParquetFile", real_parquet_file)

    parts[0].write_bytes(b"PAR1 torn by a kill")  # bytes read whole that do not parse: the one case removed
    done, summary = load_done(str(out), LOCAL)
    assert summary.unreadable == [str(parts[0])] and not parts[0].exists() and parts[1].exists()
    assert summary.rows == len(done) == (1 if pq.read_metadata(parts[1]).num_rows == 1 else 2)


def test_a_rerun_whose_part_reads_time_out_deletes_nothing(ray_local, local_s3, storage_cfg, bucket, ckpt):
    scenes = _scenes(f"{bucket}/voc", storage_cfg)
    out = f"{bucket}/out"
    first = run_segment(*job(scenes, out, ckpt, storage_cfg))
    parts = _objects(join(out, "masks"), storage_cfg)
    assert first["counts"]["rows"] == 6 and parts

    # GETs of committed parts stall past the client's timeout, every time: the index step must not judge them.
    with FaultProxy(
        local_s3.endpoint_url,
        delay_s=lambda method, path: 3.0 if method == "GET" and "/masks/part-" in path else 0.0,
    ) as proxy:
        cfg, crf_raw = job(scenes, out, ckpt, storage_cfg)
        slow = dataclasses.replace(
            cfg.storage, endpoint_url=proxy.endpoint_url, request_timeout_s=1.0, max_attempts=2
        )
        with pytest.raises(StorageDown, match="storage outage: cannot read the committed part") as err:
            run_segment(dataclasses.replace(cfg, storage=slow), crf_raw)
    assert len(str(err.value).splitlines()) == 1
    assert _objects(join(out, "masks"), storage_cfg) == parts  # nothing deleted, nothing rewritten

    again = run_segment(*job(scenes, out, ckpt, storage_cfg))
    assert again["counts"]["rows"] == 6 and again["counts"]["processed_this_run"] == 0
    assert len(read_output(out, storage_cfg)) == 6


# --- output identity ----------------------------------------------------------------------------------------------


def test_another_input_or_model_is_refused_and_the_output_unchanged(
    ray_local, storage_cfg, bucket, ckpt, tmp_path
):
    first = _scenes(f"{bucket}/a", storage_cfg, seed=3)
    second = _scenes(f"{bucket}/b", storage_cfg, seed=4)  # the same ids, other pixels
    out = f"{bucket}/out"
    run_segment(*job(first, out, ckpt, storage_cfg))
    before = _objects(out, storage_cfg)

    with pytest.raises(JobError, match="holds masks of another input") as err:
        run_segment(*job(second, out, ckpt, storage_cfg))
    message = str(err.value)
    assert first in message and second in message and len(message.splitlines()) == 1
    other_model = tiny_checkpoint(tmp_path, NUM_CLASSES + 1)
    with pytest.raises(JobError, match="holds masks of another model"):
        run_segment(*job(first, out, other_model, storage_cfg))
    with pytest.raises(JobError, match="another CRF settings"):
        run_segment(*job(first, out, ckpt, storage_cfg, crf={"iterations": 3}))
    assert _objects(out, storage_cfg) == before  # refused before anything was written

    manifest = run_segment(*job(first, out, ckpt, storage_cfg))  # the same command still resumes
    assert manifest["counts"]["processed_this_run"] == 0
    cfg, crf_raw = job(second, out, ckpt, storage_cfg)
    cfg = dataclasses.replace(cfg, write=dataclasses.replace(cfg.write, allow_identity_change=True))
    run_segment(cfg, crf_raw)
    identity = json.loads(
        s3_client(storage_cfg).get_object(Bucket=bucket[5:], Key="out/_identity.json")["Body"].read()
    )
    assert identity["input"] == second and identity["history"][0]["input"] == first


# --- the lease ----------------------------------------------------------------------------------------------------


def test_the_lease_admits_one_run_and_lapses_for_a_dead_holder(local_s3, storage_cfg, bucket, tmp_path):
    out = f"{bucket}/out"
    with Lease(out, storage_cfg, ttl_s=60) as held:
        assert held.exclusive  # moto honours If-None-Match / If-Match
        with pytest.raises(LeaseHeld) as err:
            Lease(out, storage_cfg).__enter__()
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and held.run_id in message and "--break-lease" in message
        taker = Lease(out, storage_cfg, break_stale=True).__enter__()  # the user says the run is gone
        taker.__exit__(None, None, None)
    assert LEASE.removesuffix(".json") not in "".join(_objects(out, storage_cfg))  # released

    # A holder on this host whose process is gone has lapsed at once; one elsewhere, after its ttl.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    bucket_name, key = split_s3(join(out, LEASE))
    holder = {"run_id": "r-dead", "host": os.uname().nodename, "pid": int(dead.stdout), "user": "u",
              "started": "2026-12-07T00:00:00+00:00", "ttl_s": 600}  # fmt: skip
    s3_client(storage_cfg).put_object(Bucket=bucket_name, Key=key, Body=json.dumps(holder).encode())
    with Lease(out, storage_cfg) as lease:
        assert lease.run_id != "r-dead"
    elsewhere = {**holder, "host": "another-host", "pid": 1, "ttl_s": 1}
    s3_client(storage_cfg).put_object(Bucket=bucket_name, Key=key, Body=json.dumps(elsewhere).encode())
    with pytest.raises(LeaseHeld, match="another-host"):
        Lease(out, storage_cfg).__enter__()
    time.sleep(2.2)  # past its ttl on the store's clock (Last-Modified has 1 s resolution)
    with Lease(out, storage_cfg):
        pass

    local = tmp_path / "local-out"
    with Lease(str(local), LOCAL), pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        Lease(str(local), LOCAL).__enter__()
    with Lease(str(local), LOCAL):  # flock: released at once with its holder
        pass


def test_two_cli_runs_at_once_then_the_larger_input_completes(
    ray_local, local_s3, storage_cfg, bucket, ckpt, tmp_path
):
    """Two operators start one output at once; the input gains an image in between (bar of issue 29). The runs are
    separate driver processes on one cluster (the test's Ray), as two operators submitting to one cluster."""
    scenes = _scenes(f"{bucket}/voc", storage_cfg, count=8)
    out = f"{bucket}/out"
    env = {**os.environ, "AWS_ENDPOINT_URL": storage_cfg.endpoint_url, "RAY_AUTH_MODE": "disabled"}
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", "--input", scenes, "--output", out, "--model", ckpt,
           "--no-evaluate", "--address", address]  # fmt: skip
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(k.endswith(LEASE) for k in _objects(out, storage_cfg)):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.2)
    # One more image arrives, and a second operator starts the same command while the first holds the output.
    s3 = s3_client(storage_cfg)
    b, k = split_s3(join(scenes, "JPEGImages"))
    s3.copy_object(Bucket=b, Key=f"{k}/extra.jpg", CopySource={"Bucket": b, "Key": sorted(
        o for o in _objects(join(scenes, "JPEGImages"), storage_cfg))[0]})  # fmt: skip
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is in use by run" in lines[0] and "started" in lines[0], second.stderr
    assert first.wait(timeout=600) == 0, first.communicate()
    last = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr
    rows = read_output(out, storage_cfg)  # asserts no id has two rows
    assert len(rows) == 9 and "extra" in rows


# --- duplicate repair, retries that end, byte cap ----------------------------------------------------------------


def test_duplicates_are_repaired_deterministically_by_the_final_check(ray_local, tmp_path, ckpt):
    scenes = _scenes(str(tmp_path / "voc"), LOCAL)
    out = str(tmp_path / "out")
    run_segment(*job(scenes, out, ckpt, LOCAL))
    ids = sorted(read_output(out, LOCAL))
    # What two runs grouping blocks differently leave (or an older version): other parts holding some ids again.
    write_part(_rows(ids[:2], [S.ErrorKind.READ, S.OK], [True, False]), out, LOCAL)
    write_part(_rows(ids[2:3], [S.OK], [False]), out, LOCAL)

    def holders(image_id: str) -> list[str]:
        return sorted(
            p.name for p in Path(out, "masks").iterdir() if image_id in pq.read_table(p)[S.ID].to_pylist()
        )

    assert all(len(holders(i)) == 2 for i in ids[:3])
    keeper = {i: holders(i)[0] for i in ids[1:3]}  # both rows ok: the part whose name sorts first stays
    manifest = run_segment(*job(scenes, out, ckpt, LOCAL))
    assert manifest["counts"]["duplicates_removed"] == 3
    rows = read_output(out, LOCAL)  # one row per id
    assert sorted(rows) == ids and rows[ids[0]][S.STATUS] == S.OK  # an ok row is kept before an error row
    assert {i: holders(i) for i in ids[1:3]} == {i: [keeper[i]] for i in ids[1:3]}
    assert run_segment(*job(scenes, out, ckpt, LOCAL))["counts"]["duplicates_removed"] == 0


def test_a_row_retried_max_retries_times_becomes_permanent():
    batch = {
        S.ID: np.array(["a", "b", "c"], dtype=object),
        S.SOURCE: np.array(["s/a", "s/b", "s/c"], dtype=object),
        S.STATUS: np.array([S.ErrorKind.READ] * 3, dtype=object),
        S.ERROR: np.array(["timeout"] * 3, dtype=object),
        S.RETRYABLE: np.array([True, True, False]),
        S.ATTEMPT: np.array([1, 3, 3], dtype=np.int32),
    }
    out = encode_batch(batch, EncodeConfig(num_classes=3, model_variant="v", model_digest="d", max_retries=3))
    assert out[S.RETRYABLE] == [True, False, False] and out[S.ATTEMPT] == [1, 3, 3]
    assert "attempt 3 of write.max_retries 3" in out[S.ERROR][1] and out[S.ERROR][2] == "timeout"


def test_the_plan_counts_each_retry_as_an_attempt(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "in" / name).write_bytes(b"x")
    done, _ = IdIndex.from_ids(["a", "b"])
    hi, lo = __import__("pipeline.stages.write", fromlist=["_hash_ids"])._hash_ids(["b"])
    retry = RetryIndex.build(hi, lo, np.array(["part-1.parquet"], dtype=object), np.array([2], np.int32))
    plan_uri = str(tmp_path / "_plan" / "run")
    result = plan_unit(
        PlanSource("images", str(tmp_path / "in")), ("dir", ""), done, plan_uri, LOCAL, None, retry
    )
    todo = pq.read_table(list_files(join(plan_uri, "todo"), LOCAL)[0]).to_pylist()
    assert (result.inputs, result.todo, result.retried) == (3, 2, 1)
    assert {r[S.ID]: (r[S.ATTEMPT], r[S.SUPERSEDES]) for r in todo} == {
        "b": (3, "part-1.parquet"),
        "c": (1, ""),
    }


def test_objects_over_max_bytes_are_too_large_rows_never_read(local_s3, storage_cfg, bucket, tmp_path):
    b, _ = split_s3(bucket)
    s3_client(storage_cfg).put_object(Bucket=b, Key="big.jpg", Body=os.urandom(5000))
    (tmp_path / "big.jpg").write_bytes(os.urandom(5000))
    (tmp_path / "small.jpg").write_bytes(b"tiny")
    sources = [f"{bucket}/big.jpg", str(tmp_path / "big.jpg"), str(tmp_path / "small.jpg")]
    batch = {
        S.ID: np.array(["s3big", "big", "small"], dtype=object),
        S.SOURCE: np.array(sources, dtype=object),
        S.LABEL_SOURCE: np.array([None] * 3, dtype=object),
        S.SHARD: np.array([""] * 3, dtype=object),
    }
    out = fetch_batch(batch, storage_cfg, max_bytes=1000)
    assert list(out[S.STATUS]) == [S.ErrorKind.TOO_LARGE, S.ErrorKind.TOO_LARGE, S.OK]
    assert "5,000 bytes, over read.max_bytes (1,000)" in out[S.ERROR][0]
    assert not out[S.RETRYABLE].any() and out[S.IMAGE_BYTES][0] is None and out[S.IMAGE_BYTES][2] == b"tiny"


# --- listing in bounded tasks, report failures ---------------------------------------------------------------------


def test_a_tree_of_one_image_folders_is_listed_in_few_tasks(ray_local, tmp_path, ckpt):
    from pipeline.flow import plan_job
    from pipeline.stages.plan import UNITS_PER_TASK

    root = tmp_path / "tree"
    for k in range(200):
        (root / f"f{k:04d}").mkdir(parents=True)
        (root / f"f{k:04d}" / "img.jpg").write_bytes(b"x")
    cfg, _ = job(str(root), str(tmp_path / "out"), ckpt, LOCAL)
    index = __import__("pipeline.flow", fromlist=["index_files"]).index_files([], LOCAL)
    plan = plan_job(cfg.read, cfg.write.output_uri, LOCAL, index.done, index.retry, run_id="r1")
    assert plan.inputs == plan.todo == 200
    assert plan.units == 1 + -(-200 // UNITS_PER_TASK)  # the root, then folders UNITS_PER_TASK at a time
    assert plan.uri.endswith("/_plan/r1")  # a plan folder per run


def test_a_failing_report_does_not_fail_a_finished_job(ray_local, tmp_path, ckpt, monkeypatch):
    import pipeline.metrics.evaluate as E

    def broken(*a, **kw):
        raise ValueError("Unknown symbol: \\foo in $x$")

    monkeypatch.setattr(E, "evaluate_output", broken)
    scenes = _scenes(str(tmp_path / "voc"), LOCAL)
    out = tmp_path / "out"
    manifest = run_segment(*job(scenes, str(out), ckpt, LOCAL))
    assert manifest["counts"]["rows"] == 6 and "Unknown symbol" in manifest["metrics"]["error"]
    written = json.loads((out / "_manifest.json").read_text())
    assert written["metrics"]["next"].startswith("deeplab evaluate --masks")


def test_crf_on_cuda_without_a_gpu_fails_at_start_up_in_one_line(ray_local, tmp_path, ckpt):
    scenes = _scenes(str(tmp_path / "voc"), LOCAL, count=2)
    cfg, crf_raw = job(scenes, str(tmp_path / "out"), ckpt, LOCAL, crf={"backend": "torch", "device": "cuda"})
    with pytest.raises(
        JobError, match="crf.device is 'cuda' but the DCNN actors are planned without GPUs"
    ) as err:
        run_segment(cfg, crf_raw)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "out" / "masks").exists()  # before any work
