"""The segment job under faults and attack (issue 9): killed actors, throttled and resetting storage, bad configs,
secrets, pickled code, hostile keys and listening sockets. Every run must account for every input exactly once.

Storage faults come from tests/faultproxy.py, a proxy on 127.0.0.1 in front of the moto server. Each test prints a
``FIGURES`` line (faults injected and survived, rows lost/duplicated); run with ``-s`` to see them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import schema as S
from pipeline.cluster.localhead import LocalHead, descendants
from pipeline.cluster.services import LocalS3
from pipeline.config import ConfigError, load_job_config, resolve_crf
from pipeline.demo.scenes import class_names, encode_label_png, write_voc_dataset
from pipeline.flow import run_single_process
from pipeline.model.deeplab import build_model
from pipeline.model.weights import CheckpointError, load_checkpoint_bytes, save_checkpoint
from pipeline.segment import JobError, load_model_meta, run_segment
from pipeline.stages.encode import EncodeConfig
from pipeline.stages.plan import list_inputs
from pipeline.stages.write import load_done, write_part
from pipeline.storage import StorageConfig, join, list_files, s3_client, split_s3
from tests.faultproxy import FaultProxy

NUM_CLASSES = 4
# Set in every process of this module's Ray (workers inherit the driver's environment at ray.init).
SECRET = f"s3cr3t-{uuid.uuid4().hex}"


@pytest.fixture(scope="module", autouse=True)
def distinctive_secret(local_s3):
    """Runs before ray_local (autouse fixtures come first in their scope), so the Ray workers hold SECRET too."""
    saved = os.environ["AWS_SECRET_ACCESS_KEY"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
    yield SECRET
    os.environ["AWS_SECRET_ACCESS_KEY"] = saved


def _checkpoint(directory: Path, *, width: float) -> Path:
    torch.manual_seed(0)
    model = build_model("deeplab-largefov", num_classes=NUM_CLASSES, width=width)
    path = directory / f"largefov-{NUM_CLASSES}-w{round(1 / width)}.pt"
    save_checkpoint(model, str(path), class_names=class_names(NUM_CLASSES), provenance={"source": "test"})
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("model"), width=1 / 16)


def _job(input_uri: str, output_uri: str, model: str, endpoint_url: str, **extra):
    sections = {
        "storage": {"endpoint_url": endpoint_url, "max_attempts": 8},
        "dcnn": {"batch_size": 2, "min_input_size": 97},
        "write": {"rows_per_file": 3},
        "read": {"items_per_block": 2},
    }
    for key, value in extra.pop("sections", {}).items():
        sections[key] = {**sections.get(key, {}), **value}
    return load_job_config(
        input=input_uri, output=output_uri, model=model, evaluate=False, **sections, **extra
    )


def _rows(output_uri: str, storage_cfg: StorageConfig) -> dict[str, dict]:
    """Every output row by image_id; fails on a duplicate (read straight from moto, not through a proxy)."""
    from pipeline.storage import filesystem

    fs, path = filesystem(join(output_uri, "masks"), storage_cfg)
    rows = pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()
    counts = Counter(r[S.ID] for r in rows)
    assert not [i for i, c in counts.items() if c > 1], f"duplicated rows: {counts.most_common(3)}"
    return {r[S.ID]: r for r in rows}


def _upload(storage_cfg: StorageConfig, uri: str, data: bytes) -> None:
    bucket, key = split_s3(uri)
    s3_client(storage_cfg).put_object(Bucket=bucket, Key=key, Body=data)


class _Background:
    """run_segment in a thread of the test process (same Ray), so the test can kill its actors meanwhile."""

    def __init__(self, cfg, crf_raw) -> None:
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cfg, crf_raw), daemon=True)
        self.thread.start()

    def _run(self, cfg, crf_raw) -> None:
        try:
            self.result = run_segment(cfg, crf_raw)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def running(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout_s: float) -> dict:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the job did not finish within {timeout_s:.0f}s"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


# ---------------------------------------------------------------------------------------------- process faults
def _actors(fragment: str) -> dict[str, dict]:
    """This cluster's actors whose class name contains ``fragment`` (GCS table: pid, state, restarts)."""
    from ray._private import state as ray_state

    return {aid: a for aid, a in ray_state.actors().items() if fragment in a["ActorClassName"]}


def _alive(pid: int) -> bool:
    # The GCS table keeps dead actors' pids: check the process too.
    return bool(pid) and Path(f"/proc/{pid}").exists()


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _busy_actor(fragment: str, exclude_pids: set[int], sample_s: float = 0.7) -> dict | None:
    """A constructed actor (GCS state ALIVE: __init__ is done) that burns CPU right now (in a batch), or None."""
    alive = [
        a
        for a in _actors(fragment).values()
        if a["State"] == "ALIVE" and _alive(a["Pid"]) and a["Pid"] not in exclude_pids
    ]
    try:
        before = {a["Pid"]: _cpu_ticks(a["Pid"]) for a in alive}
        time.sleep(sample_s)
        return next((a for a in alive if _cpu_ticks(a["Pid"]) > before[a["Pid"]]), None)
    except (OSError, KeyError):
        return None


def test_killed_dcnn_and_crf_actors_lose_and_duplicate_nothing(
    ray_local, local_s3, storage_cfg, bucket, tmp_path
):
    """SIGKILL the DCNN actor while it computes, then a CRF actor: actors restart, tasks retry, each image once."""
    count = 12
    write_voc_dataset(
        f"{bucket}/voc", count=count, size=(96, 72), num_classes=NUM_CLASSES, seed=11, storage_cfg=storage_cfg
    )
    # A wider model and a large padded input make the DCNN actor (which also fetches and decodes: Ray Data fuses
    # those stages into it) the bottleneck. Through the proxy, every image fetch and every model load (actor
    # start or restart) is visible as a GET.
    model_uri = f"{bucket}/model/largefov-w2.pt"
    _upload(storage_cfg, model_uri, _checkpoint(tmp_path, width=1 / 2).read_bytes())
    gets: Counter = Counter()

    def on_request(method: str, path: str) -> None:
        if method == "GET" and (path.endswith("/model/largefov-w2.pt") or "/JPEGImages/" in path):
            gets[path] += 1

    def fetched() -> int:
        return sum(1 for path in list(gets) if "/JPEGImages/" in path)

    masks = join(bucket, "out", "masks")
    with FaultProxy(local_s3.endpoint_url, on_request=on_request) as proxy:
        cfg, crf_raw = _job(
            f"{bucket}/voc",
            f"{bucket}/out",
            model_uri,
            proxy.endpoint_url,
            sections={"dcnn": {"batch_size": 1, "min_input_size": 289, "num_threads": 1}},
        )
        job = _Background(cfg, crf_raw)
        killed: dict[str, dict] = {}
        at_kill: dict[str, tuple[int, int]] = {}  # stage -> (images fetched, parts committed)
        deadline = time.monotonic() + 420
        for stage, fragment in (("dcnn", "DeepLabPredictor"), ("crf", "CRFRefiner")):
            while job.running() and time.monotonic() < deadline:
                # DCNN: constructed (GCS state ALIVE), rows flowing, and burning CPU now, i.e. inside a batch.
                # CRF: right after the DCNN kill, while the DCNN actor restarts with images still to go.
                ready = stage == "crf" or 2 <= fetched() < count
                victim = _busy_actor(fragment, {k["Pid"] for k in killed.values()}) if ready else None
                if victim is None and stage == "crf":
                    victim = next((a for a in _actors(fragment).values() if a["State"] == "ALIVE"), None)
                if victim is not None:
                    os.kill(victim["Pid"], signal.SIGKILL)
                    killed[stage] = victim
                    at_kill[stage] = (fetched(), len(list_files(masks, storage_cfg)))
                    break
                time.sleep(0.2)
            assert stage in killed, f"no {fragment} actor could be killed mid-run ({job.error!r})"
        manifest = job.join(timeout_s=max(60.0, deadline - time.monotonic()))
        model_loads = sum(n for path, n in gets.items() if path.endswith(".pt"))

    rows = _rows(f"{bucket}/out", storage_cfg)
    expected = [f"scene_{i:06d}" for i in range(count)]
    assert sorted(rows) == expected, "rows lost"
    assert {r[S.STATUS] for r in rows.values()} == {S.OK}
    assert manifest["counts"]["rows"] == manifest["counts"]["processed_this_run"] == count
    total_parts = len(list_files(masks, storage_cfg))
    assert at_kill["dcnn"][0] < count, "the DCNN kill came after the last fetch: not mid-run"
    assert at_kill["crf"][1] < total_parts, "the CRF kill came after the last part: not mid-run"
    for stage, actor in killed.items():  # Ray restarted the very actor we killed (max_restarts=-1) ...
        now = _actors("")[actor["ActorID"]]
        assert now["NumRestarts"] >= 1, (stage, now)
    # ... and the restarted DCNN actor loaded the model again: driver + first actor + restarted actor.
    assert model_loads >= 3, gets
    print(
        f"\nFIGURES actor-kills: killed {sorted(killed)} at (images fetched, parts) {at_kill} of "
        f"({count}, {total_parts}); model loads {model_loads}; rows {len(rows)}/{count}, lost 0, duplicated 0"
    )


# ---------------------------------------------------------------------------------------------- storage faults
def test_load_done_keeps_committed_parts_through_throttled_reads(local_s3, storage_cfg, bucket):
    """A committed part whose reads are throttled is kept: resume must not delete it as "unreadable".

    (pyarrow's small ranged reads even fail at once on a 503 with a body; write.load_done re-reads via boto3.)"""
    table = pq.read_table(io.BytesIO(_part_bytes(["a", "b"])))
    write_part(table, f"{bucket}/out", storage_cfg)
    attempts = storage_cfg.max_attempts
    for kind in ("slowdown", "internal", "reset"):
        # As many faults in a row on the part's reads as one request may take: pyarrow's read gives up.
        with FaultProxy(
            local_s3.endpoint_url,
            every=1,
            kinds=(kind,),
            max_faults=attempts,
            eligible=lambda method, path: method == "GET" and "/masks/part-" in path,
        ) as proxy:
            done, summary = load_done(
                f"{bucket}/out", dataclasses.replace(storage_cfg, endpoint_url=proxy.endpoint_url)
            )
            assert proxy.injected[kind] == attempts
        assert len(done) == 2 and done.contains(["a", "b", "c"]).tolist() == [True, True, False], kind
        assert summary.rows == 2 and not summary.duplicates and not summary.unreadable, kind
        assert len(list_files(join(bucket, "out", "masks"), storage_cfg)) == 1, f"{kind}: a part was deleted"


def _part_bytes(ids: list[str]) -> bytes:
    import pyarrow as pa

    n = len(ids)
    columns = {f.name: pa.nulls(n, f.type) for f in S.OUTPUT_SCHEMA}
    columns.update(
        {
            S.ID: pa.array(ids),
            S.SOURCE: pa.array([f"s3://x/{i}" for i in ids]),
            S.STATUS: pa.array([S.OK] * n),
            S.RETRYABLE: pa.array([False] * n),
            # Big masks, as in real parts: the footer prefetch no longer covers the file, so the id column is
            # read by a small ranged GET (the one pyarrow cannot retry on a 503 with a body).
            "mask_png": pa.array([os.urandom(100_000) for _ in ids], pa.binary()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(pa.table(columns, schema=S.OUTPUT_SCHEMA), buf)
    return buf.getvalue()


def test_storage_faults_are_retried_and_output_is_identical(
    ray_local, local_s3, storage_cfg, bucket, tiny_ckpt, tmp_path
):
    """Every 3rd request answers 503 SlowDown / 500 InternalError / a reset: same masks as a fault-free run.
    An object deleted after listing becomes a read_error row; labels beyond the model's classes label_error rows."""
    count, victim = 10, "scene_000003"
    voc = f"{bucket}/voc"
    write_voc_dataset(
        voc, count=count, size=(96, 72), num_classes=NUM_CLASSES, seed=5, storage_cfg=storage_cfg
    )
    over = np.zeros((72, 96), np.uint8)
    over[20:50, 30:70] = 7  # a VOC class, but beyond this 4-class checkpoint
    image = io.BytesIO()
    Image.fromarray(np.full((72, 96, 3), 120, np.uint8)).save(image, "JPEG")
    for name in ("over_classes_a", "over_classes_b"):
        _upload(storage_cfg, f"{voc}/JPEGImages/{name}.jpg", image.getvalue())
        _upload(storage_cfg, f"{voc}/SegmentationClass/{name}.png", encode_label_png(over))

    # Fault-free reference: the same stages in one process, straight to moto.
    ref_cfg, crf_raw = _job(voc, str(tmp_path / "ref"), str(tiny_ckpt), storage_cfg.endpoint_url)
    meta, digest = load_model_meta(ref_cfg)
    ref_cfg = resolve_crf(ref_cfg, meta["variant"], crf_raw)
    ref_cfg = dataclasses.replace(
        ref_cfg, decode=dataclasses.replace(ref_cfg.decode, num_classes=NUM_CLASSES)
    )
    _, items = list_inputs(voc, storage_cfg)
    run_single_process(items, ref_cfg, EncodeConfig(NUM_CLASSES, meta["variant"], digest))
    reference = _rows(str(tmp_path / "ref"), storage_cfg)

    deleted = threading.Event()

    def delete_victim_after_listing(method: str, path: str) -> None:
        # The first image GET comes after the driver listed the inputs: the victim is listed but gone.
        if method == "GET" and "/JPEGImages/" in path and not deleted.is_set():
            deleted.set()
            s3_client(storage_cfg).delete_object(Bucket=split_s3(voc)[0], Key=f"voc/JPEGImages/{victim}.jpg")

    with FaultProxy(
        local_s3.endpoint_url, every=3, max_faults=90, on_request=delete_victim_after_listing
    ) as proxy:
        # Several rows per part: write batches join blocks whose error/label_problem columns are all-null in some
        # and strings in others (schema.clean_text_columns keeps that from becoming a float + string merge error).
        cfg, crf_raw = _job(
            voc, f"{bucket}/out", str(tiny_ckpt), proxy.endpoint_url, sections={"write": {"rows_per_file": 3}}
        )
        manifest = run_segment(cfg, crf_raw)
        injected, requests = dict(proxy.injected), proxy.requests
    assert deleted.is_set()
    assert set(injected) == {"slowdown", "internal", "reset"} and sum(injected.values()) >= 10, injected

    rows = _rows(f"{bucket}/out", storage_cfg)
    assert sorted(rows) == sorted(reference) and len(rows) == count + 2, "rows lost"
    assert manifest["counts"]["rows"] == count + 2
    row = rows[victim]
    assert row[S.STATUS] == S.ErrorKind.READ and "object not found" in row[S.ERROR], row[S.ERROR]
    assert row["mask_png"] is None
    for name in ("over_classes_a", "over_classes_b"):
        assert rows[name][S.STATUS] == S.ErrorKind.LABEL and "values outside 0..3" in rows[name][S.ERROR]
        assert rows[name]["mask_png"] is not None  # the image is still segmented
    for image_id, ref in reference.items():
        if image_id == victim:
            continue
        got = rows[image_id]
        assert got[S.STATUS] == ref[S.STATUS], image_id
        for column in ("mask_png", "raw_mask_png", "confusion_raw", "confusion_crf", "height", "width"):
            assert got[column] == ref[column], (image_id, column)
    print(
        f"\nFIGURES storage-faults: injected and survived {injected} "
        f"(total {sum(injected.values())} of {requests} requests); missing object -> 1 read_error row; "
        f"over-range labels -> 2 label_error rows; rows {len(rows)}/{count + 2}, lost 0, duplicated 0"
    )


# ---------------------------------------------------------------------------------------------- transient failures
def _scene_ids(voc: str, storage_cfg: StorageConfig) -> list[str]:
    return sorted(u.rsplit("/", 1)[1][:-4] for u in list_files(f"{voc}/JPEGImages", storage_cfg, (".jpg",)))


def test_transient_errors_are_retried_by_a_rerun_exactly_once(
    ray_local, local_s3, storage_cfg, bucket, tiny_ckpt, tmp_path, capsys
):
    """Issue 17's bar through the CLI: every GET of 10 of 30 images answers 503 SlowDown in run 1 -> 10 retryable
    rows, exit 75; run 2 on healthy storage -> 30 ok rows, 30 distinct ids, exit 0. A corrupt image's row is
    permanent: not retried by default, retried (and still corrupt) with --retry-errors all."""
    from pipeline.cli import main

    voc = f"{bucket}/voc"
    write_voc_dataset(voc, count=30, size=(48, 36), num_classes=NUM_CLASSES, seed=3, storage_cfg=storage_cfg)
    refused = _scene_ids(voc, storage_cfg)[::3]
    _upload(storage_cfg, f"{voc}/JPEGImages/corrupt.jpg", b"\xff\xd8 not really a jpeg")
    config = tmp_path / "job.yaml"  # the endpoint comes from the flag: the file's other storage keys stay
    config.write_text(
        json.dumps(
            {
                "storage": {"max_attempts": 2},
                "dcnn": {"batch_size": 4, "min_input_size": 49},
                "read": {"items_per_block": 4},
                "write": {"rows_per_file": 8},
            }
        )
    )
    out = f"{bucket}/out"

    def segment(endpoint: str, *extra: str) -> tuple[int, dict]:
        argv = [
            "segment",
            "--config",
            str(config),
            "--input",
            voc,
            "--output",
            out,
            "--model",
            str(tiny_ckpt),
        ]
        code = main([*argv, "--endpoint-url", endpoint, "--no-evaluate", *extra])
        manifest = json.loads(s3_client(storage_cfg).get_object(
            Bucket=split_s3(bucket)[0], Key="out/_manifest.json")["Body"].read())  # fmt: skip
        return code, manifest

    with FaultProxy(
        local_s3.endpoint_url, persistent={f"/JPEGImages/{i}.jpg": "slowdown" for i in refused}
    ) as proxy:
        code, manifest = segment(proxy.endpoint_url)
        refusals = proxy.persistent_injected["slowdown"]
    printed = capsys.readouterr().out
    rows = _rows(out, storage_cfg)
    assert code == 75 and len(rows) == 31 and refusals >= 2 * len(refused) == 20
    failed = {i for i, r in rows.items() if r[S.STATUS] != S.OK}
    assert failed == {*refused, "corrupt"}
    assert all(rows[i][S.RETRYABLE] and "SlowDown" in rows[i][S.ERROR] for i in refused)
    assert rows["corrupt"][S.STATUS] == S.ErrorKind.DECODE and not rows["corrupt"][S.RETRYABLE]
    assert manifest["counts"]["retryable"] == 10 and "retryable     10" in printed
    assert "re-run the same command" in manifest["next"]

    code, manifest = segment(local_s3.endpoint_url)
    rows = _rows(out, storage_cfg)
    assert code == 0 and len(rows) == 31
    assert {i for i, r in rows.items() if r[S.STATUS] != S.OK} == {"corrupt"}
    assert not any(r[S.RETRYABLE] for r in rows.values())
    counts = manifest["counts"]
    assert (counts["retried_this_run"], counts["processed_this_run"], counts["retryable"]) == (10, 10, 0)
    assert not list_files(f"{out}/_supersede", storage_cfg)

    code, manifest = segment(local_s3.endpoint_url, "--retry-errors", "all")
    rows = _rows(out, storage_cfg)
    assert code == 0 and len(rows) == 31 and manifest["counts"]["retried_this_run"] == 1
    assert rows["corrupt"][S.STATUS] == S.ErrorKind.DECODE
    print(f"\nFIGURES retry: run 1 {refusals} SlowDown refusals -> 10 retryable rows (exit 75); run 2: 31 rows, "
          "30 ok + 1 permanent decode_error, 10 retried, exit 0; --retry-errors all: 1 retried")  # fmt: skip


def test_a_storage_outage_stops_the_job_with_its_cause_and_a_rerun_completes(
    ray_local, local_s3, storage_cfg, bucket, tiny_ckpt
):
    """After a few images every image GET answers 503: the job backs off, stops with one line, and what it
    committed is right (ok rows, or rows marked retryable); healthy storage again -> a re-run completes once."""
    from pipeline.segment import StorageDown

    voc, out, count = f"{bucket}/voc", f"{bucket}/out", 24
    write_voc_dataset(
        voc, count=count, size=(48, 36), num_classes=NUM_CLASSES, seed=4, storage_cfg=storage_cfg
    )
    gets: Counter = Counter()
    proxy = FaultProxy(local_s3.endpoint_url)

    def outage_after_four_images(method: str, path: str) -> None:
        if method == "GET" and "/JPEGImages/" in path:
            gets["images"] += 1
            if gets["images"] == 4:
                proxy.persistent["/JPEGImages/"] = "slowdown"

    proxy.on_request = outage_after_four_images
    # The reads of the first images (and their labels) succeeded: half of the window failing is the outage here.
    outage = {
        "max_attempts": 2,
        "outage_min_failures": 3,
        "outage_rate": 0.5,
        "outage_window_s": 60,
        "outage_wait_s": 3,
    }
    with proxy:
        cfg, crf_raw = _job(voc, out, str(tiny_ckpt), proxy.endpoint_url, sections={"storage": outage})
        t0 = time.monotonic()
        with pytest.raises(StorageDown) as raised:
            run_segment(cfg, crf_raw)
        stopped_s = time.monotonic() - t0
    message = str(raised.value)
    assert message.startswith("storage outage: ") and "\n" not in message and "SlowDown" in message
    assert "re-run the same command" in message
    committed = _rows(out, storage_cfg) if list_files(f"{out}/masks", storage_cfg) else {}
    assert len(committed) < count
    assert all(r[S.STATUS] == S.OK or r[S.RETRYABLE] for r in committed.values()), "a wrong row was committed"

    cfg, crf_raw = _job(voc, out, str(tiny_ckpt), local_s3.endpoint_url)
    manifest = run_segment(cfg, crf_raw)
    rows = _rows(out, storage_cfg)
    assert len(rows) == count and {r[S.STATUS] for r in rows.values()} == {S.OK}
    assert manifest["counts"]["retryable"] == 0
    print(f"\nFIGURES outage: stopped after {stopped_s:.1f} s with {len(committed)} rows committed "
          f"({sum(r[S.STATUS] != S.OK for r in committed.values())} retryable); re-run: {len(rows)} ok")  # fmt: skip


def test_sigkill_while_a_row_is_superseded_leaves_exactly_one_row(
    ray_local, local_s3, storage_cfg, bucket, tiny_ckpt, tmp_path
):
    """Run 1 leaves 3 retryable rows; run 2 (a CLI process) is SIGKILLed while the rewrite of their part is in
    flight: masks/ still holds one (old) row per image; run 3 applies the rows run 2 left aside and is done."""
    voc, out, count = f"{bucket}/voc", f"{bucket}/out", 6
    write_voc_dataset(
        voc, count=count, size=(48, 36), num_classes=NUM_CLASSES, seed=6, storage_cfg=storage_cfg
    )
    refused = _scene_ids(voc, storage_cfg)[:3]
    with FaultProxy(
        local_s3.endpoint_url, persistent={f"/JPEGImages/{i}.jpg": "slowdown" for i in refused}
    ) as p:
        cfg, crf_raw = _job(
            voc, out, str(tiny_ckpt), p.endpoint_url, sections={"storage": {"max_attempts": 2}}
        )
        assert run_segment(cfg, crf_raw)["counts"]["retryable"] == 3

    with FaultProxy(
        local_s3.endpoint_url, hold=lambda method, path: method in ("PUT", "POST") and "/out/masks/" in path
    ) as proxy:
        config = tmp_path / "job.yaml"
        job = {"input": voc, "output": out, "model": str(tiny_ckpt), "dcnn": {"batch_size": 2, "min_input_size": 49},
               "storage": {"endpoint_url": proxy.endpoint_url}}  # fmt: skip
        config.write_text(json.dumps(job))
        address = ray_local.get_runtime_context().gcs_address
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "segment", "--config", str(config), "--address", address,
             "--no-evaluate"],
            env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not proxy.held and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proxy.held, f"the rewrite never started: {proc.poll()} {proc.stderr.read()[-2000:]!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proxy.persistent["/out/masks/"] = "reset"  # the held PUT dies with its sender
        rows = _rows(out, storage_cfg)  # straight from moto
        assert sorted(rows) == _scene_ids(voc, storage_cfg)
        assert {i for i, r in rows.items() if r[S.STATUS] != S.OK} == set(refused)
        assert list_files(f"{out}/_supersede", storage_cfg), "run 2 wrote the new rows aside first"

    cfg, crf_raw = _job(voc, out, str(tiny_ckpt), local_s3.endpoint_url)
    manifest = run_segment(cfg, crf_raw)
    rows = _rows(out, storage_cfg)
    assert len(rows) == count and {r[S.STATUS] for r in rows.values()} == {S.OK}
    assert manifest["counts"]["processed_this_run"] == 0  # run 2's rows were applied, not processed again
    assert not list_files(f"{out}/_supersede", storage_cfg)


# ---------------------------------------------------------------------------------------------- bad configs
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from pipeline.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_bad_configs_fail_in_one_line(local_s3, storage_cfg, bucket, tiny_ckpt, tmp_path, capsys):
    write_voc_dataset(
        f"{bucket}/voc", count=1, size=(32, 24), num_classes=NUM_CLASSES, seed=1, storage_cfg=storage_cfg
    )
    base = {
        "input": f"{bucket}/voc",
        "output": f"{bucket}/out",
        "model": str(tiny_ckpt),
        "storage": {"endpoint_url": storage_cfg.endpoint_url},
    }
    cases = {  # config -> a substring the one-line error must hold
        "zero_spatial_sigma": ({**base, "crf": {"bi_xy_std": 0}}, "bi_xy_std"),
        "negative_colour_sigma": ({**base, "crf": {"bi_rgb_std": -5.0}}, "bi_rgb_std"),
        "zero_gaussian_sigma": ({**base, "crf": {"pos_xy_std": 0.0}}, "pos_xy_std"),
        "negative_weight": ({**base, "crf": {"bi_w": -1}}, "bi_w"),
        "unknown_variant": ({**base, "variant": "deeplab-9x9"}, "deeplab-9x9"),
        "variant_mismatch": ({**base, "variant": "deeplab-msc"}, "holds variant 'deeplab-largefov'"),
        "num_classes_not_int": ({**base, "decode": {"num_classes": "four"}}, "decode.num_classes"),
        "zero_attempts": ({**base, "storage": {"max_attempts": 0}}, "max_attempts"),
    }
    for name, (config, needle) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(config))
        code, err = _cli(["segment", "--config", str(path)], capsys)
        assert code == 2, (name, err)
        assert needle in err and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)

    # Unreadable config files: a directory, a missing file, a file we may not read, not YAML.
    unreadable = tmp_path / "secret.yaml"
    unreadable.write_text("input: a\n")
    unreadable.chmod(0)
    not_yaml = tmp_path / "bad.yaml"
    not_yaml.write_text("input: [unclosed\n")
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes("input: caf\xe9\n".encode("latin-1"))
    files = [tmp_path, tmp_path / "missing.yaml", not_yaml, not_utf8]
    if os.geteuid() != 0:  # root reads anything
        files.append(unreadable)
    for path in files:
        code, err = _cli(["segment", "--config", str(path)], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and "Traceback" not in err, (path, err)
        assert lines[0].startswith("deeplab segment: error: ") and "config file" in lines[0], (path, err)
        assert len(lines) == 1, (path, err)
        with pytest.raises(ConfigError, match="config file"):
            load_job_config(str(path))

    # The library raises the same causes as typed errors (no Ray is started for any of them).
    cfg, _ = load_job_config(**base)
    with pytest.raises(ConfigError, match="bi_rgb_std"):
        run_segment(cfg, {"bi_rgb_std": 0})
    cfg, crf_raw = load_job_config(**{**base, "variant": "deeplab"})
    with pytest.raises(JobError, match="expected 'deeplab'"):
        run_segment(cfg, crf_raw)


# ---------------------------------------------------------------------------------------------- security
class _Marker:
    """Unpickling this would create ``path`` (stands for any code a malicious checkpoint runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_checkpoint_loading_refuses_pickled_code(local_s3, storage_cfg, bucket, tiny_ckpt, tmp_path):
    marker = tmp_path / "pwned"
    good = torch.load(tiny_ckpt, weights_only=True)
    payloads = {
        "object_as_checkpoint": _Marker(marker),
        "object_in_meta": {"state_dict": good["state_dict"], "meta": {**good["meta"], "x": _Marker(marker)}},
        "object_in_state_dict": {"state_dict": {"w": _Marker(marker)}, "meta": good["meta"]},
    }
    blobs = {}
    for name, obj in payloads.items():
        for legacy in (False, True):  # zip (torch >= 1.6) and legacy pickle container
            buf = io.BytesIO()
            torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
            blobs[f"{name}{'_legacy' if legacy else ''}"] = buf.getvalue()
    blobs["raw_pickle"] = pickle.dumps(_Marker(marker))
    for name, data in blobs.items():
        with pytest.raises(CheckpointError, match="weights_only|not a readable"):
            load_checkpoint_bytes(data)
        assert not marker.exists(), f"{name}: unpickling ran code"
    # Through the job: the driver refuses it before any worker could load it.
    _upload(storage_cfg, f"{bucket}/evil.pt", blobs["object_in_meta"])
    cfg, crf_raw = _job(f"{bucket}/in", f"{bucket}/out", f"{bucket}/evil.pt", storage_cfg.endpoint_url)
    _upload(storage_cfg, f"{bucket}/in/a.png", b"not read")
    with pytest.raises(JobError, match="not a usable checkpoint"):
        run_segment(cfg, crf_raw)
    assert not marker.exists()


def test_cli_run_leaks_no_secret_and_writes_only_under_output(
    ray_local, local_s3, storage_cfg, bucket, tmp_path
):
    """A whole `deeplab -v segment` (debug logs on) with hostile keys and a failing object, on this module's Ray:
    SECRET is in no log line, manifest, report or error row, and every write the job sends is under OUTPUT/."""
    from tests.hostile import HOSTILE_KEYS

    name = split_s3(bucket)[0]
    write_voc_dataset(
        f"{bucket}/src", count=4, size=(64, 48), num_classes=NUM_CLASSES, seed=2, storage_cfg=storage_cfg
    )
    for uri in list_files(f"{bucket}/src/JPEGImages", storage_cfg):  # an image prefix with a label prefix
        stem = uri.rsplit("/", 1)[1].rsplit(".", 1)[0]
        s3_client(storage_cfg).copy_object(
            Bucket=name, Key=f"in/{stem}.jpg", CopySource={"Bucket": name, "Key": split_s3(uri)[1]}
        )
        s3_client(storage_cfg).copy_object(
            Bucket=name,
            Key=f"labels/{stem}.png",
            CopySource={"Bucket": name, "Key": f"src/SegmentationClass/{stem}.png"},
        )
    for case in HOSTILE_KEYS:  # spaces, unicode, '../' and 'nested/../../'
        _upload(storage_cfg, f"{bucket}/in/{case.name}", case.data)
    _upload(storage_cfg, f"{bucket}/in/broken-object.png", HOSTILE_KEYS[0].data)
    model = tmp_path / "model.pt"
    model.write_bytes(_checkpoint(tmp_path, width=1 / 16).read_bytes())

    # The failing object's connection is reset on every attempt: its error names the endpoint and the key.
    with FaultProxy(local_s3.endpoint_url, persistent={"/in/broken-": "reset"}) as proxy:
        config = tmp_path / "job.yaml"
        config.write_text(
            json.dumps(
                {
                    "input": f"{bucket}/in",
                    "labels": f"{bucket}/labels",
                    "output": f"{bucket}/out",
                    "model": str(model),
                    "storage": {"endpoint_url": proxy.endpoint_url, "max_attempts": 2},
                    "dcnn": {"batch_size": 2, "min_input_size": 65},
                    "write": {"rows_per_file": 4},
                }
            )
        )
        address = ray_local.get_runtime_context().gcs_address
        env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "RAY_ADDRESS": ""}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "-v",
                "segment",
                "--config",
                str(config),
                "--address",
                address,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        writes, endpoint = list(proxy.writes), proxy.endpoint_url
    # 75 (EX_TEMPFAIL): every image has its row, one failed for a reason a re-run may not meet (resets).
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert proc.stdout and proc.stderr  # the run did log (debug level): there was something to leak

    # Secret: not in the CLI's output, the Ray session logs, or any object the job wrote.
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"secret in Ray logs: {leaked}"
    outputs = list_files(f"{bucket}/out", storage_cfg)
    assert any(u.endswith("_manifest.json") for u in outputs) and any("/report/" in u for u in outputs)
    client = s3_client(storage_cfg)
    for uri in outputs:
        data = client.get_object(Bucket=name, Key=split_s3(uri)[1])["Body"].read()
        assert SECRET.encode() not in data, uri
    rows = _rows(f"{bucket}/out", storage_cfg)
    broken = rows["broken-object"]
    assert broken[S.STATUS] == S.ErrorKind.READ and broken[S.RETRYABLE]
    assert endpoint in broken[S.ERROR], broken[S.ERROR]  # the message does carry the endpoint
    assert all(SECRET not in (r[S.ERROR] or "") for r in rows.values())
    assert SECRET not in json.dumps(
        json.loads(client.get_object(Bucket=name, Key="out/_manifest.json")["Body"].read())
    )

    # Paths: every image is a row, and every write the job sent (driver and workers) is under OUTPUT/.
    assert len(rows) == 4 + len(HOSTILE_KEYS) + 1
    assert {r[S.STATUS] for i, r in rows.items() if not i.startswith("broken-")} == {S.OK}
    assert writes and all(path.startswith(f"/{name}/out/") for _, path in writes), writes
    assert all(".." not in path.split("/") for _, path in writes)
    print(
        f"\nFIGURES security: {len(writes)} writes, all under OUTPUT/; secret found in 0 of "
        f"{len(outputs)} outputs, {sum(1 for p in logs.rglob('*') if p.is_file())} Ray log files, CLI output; "
        f"hostile keys {len(HOSTILE_KEYS)}; rows {len(rows)}, lost 0, duplicated 0"
    )


# ---------------------------------------------------------------------------------------------- listening sockets
def _listening() -> dict[str, tuple[str, int]]:
    """socket inode -> (IP, port) of every TCP socket in LISTEN state (IPv4 and IPv6), from /proc/net."""
    out = {}
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words)
            out[fields[9]] = (ip.removeprefix("::ffff:"), int(port, 16))
    return out


def _listeners(pids: set[int]) -> dict[int, list[tuple[str, int]]]:
    table = _listening()
    out: dict[int, list[tuple[str, int]]] = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue
        inodes = [link[len("socket:[") : -1] for link in links if link.startswith("socket:[")]
        out[pid] = sorted(table[i] for i in inodes if i in table)
    return out


def _external_ip() -> str | None:
    """A non-loopback address of this machine (the one a default route would use), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _refused(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((ip, port)) != 0


def test_local_services_listen_on_loopback_only(tmp_path):
    external = _external_ip()
    with LocalS3() as s3:
        port = int(s3.endpoint_url.rsplit(":", 1)[1])
        sockets = _listeners({s3._proc.pid, *descendants(s3._proc.pid)})
        bound = [addr for addrs in sockets.values() for addr in addrs]
        assert ("127.0.0.1", port) in bound and all(ip == "127.0.0.1" for ip, _ in bound), bound
        if external:
            assert _refused(external, port), f"moto answers on {external}:{port}"

    with LocalHead(tmp_path / "head", num_cpus=1) as head:
        dash_port = int(head.dashboard_url.rsplit(":", 1)[1])
        pids = {p for p, _ in head.info.pids}
        pids |= {d for p in list(pids) for d in descendants(p)}
        sockets = _listeners(pids)
        bound = [addr for addrs in sockets.values() for addr in addrs]
        # What LocalHead chooses, the dashboard and Jobs API, is loopback only.
        assert [ip for ip, port in bound if port == dash_port] == ["127.0.0.1"], bound
        if external:
            assert _refused(external, dash_port), f"the dashboard answers on {external}:{dash_port}"
        # Ray 2.60's own gRPC servers ignore --node-ip-address and listen on every interface (fixed upstream in
        # ray-project/ray#59852): listed here for the closing note, not asserted.
        wide = sorted({(ip, port) for ip, port in bound if not ip.startswith("127.")})
        print(
            f"\nFIGURES sockets: LocalS3 loopback only; LocalHead dashboard loopback only; Ray-internal wide: {wide}"
        )
