"""The segment job end to end on real Ray + a real S3 endpoint (moto server): rows, schema, reference equality,
resume after a kill, hostile inputs, fail-fast causes."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.config import load_job_config, resolve_crf
from pipeline.demo.scenes import class_names, write_voc_dataset
from pipeline.flow import run_single_process
from pipeline.model.deeplab import build_model
from pipeline.model.weights import save_checkpoint
from pipeline.segment import JobError, load_model_meta, run_segment
from pipeline.stages.encode import EncodeConfig
from pipeline.stages.plan import list_inputs
from pipeline.storage import filesystem, join, list_files

NUM_CLASSES = 4


def tiny_checkpoint(directory: Path, num_classes: int) -> str:
    import torch

    torch.manual_seed(0)
    model = build_model("deeplab-largefov", num_classes=num_classes, width=1 / 16)
    path = directory / f"tiny-{num_classes}.pt"
    save_checkpoint(
        model, str(path), class_names=class_names(num_classes), provenance={"source": "test: random init"}
    )
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("model"), NUM_CLASSES)


@pytest.fixture(scope="module")
def scenes(local_s3, storage_cfg) -> str:
    from pipeline.storage import s3_client

    s3_client(storage_cfg).create_bucket(Bucket="segment-scenes")
    uri = "s3://segment-scenes/voc"
    write_voc_dataset(uri, count=10, size=(96, 72), num_classes=NUM_CLASSES, seed=7, storage_cfg=storage_cfg)
    return uri


def job(input_uri: str, output_uri: str, model: str, storage_cfg, **extra):
    cfg, crf_raw = load_job_config(
        input=input_uri,
        output=output_uri,
        model=model,
        storage={"endpoint_url": storage_cfg.endpoint_url, "max_attempts": 3},
        dcnn={"batch_size": 2, "min_input_size": 97},
        write={"rows_per_file": 3},
        **extra,
    )
    return cfg, crf_raw


def read_output(output_uri: str, storage_cfg) -> dict[str, dict]:
    fs, path = filesystem(join(output_uri, "masks"), storage_cfg)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    rows = table.to_pylist()
    ids = [r[S.ID] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate rows"
    return {r[S.ID]: r for r in rows}


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_rows_schema_and_equal_to_single_process_reference(
    ray_local, scenes, checkpoint, storage_cfg, bucket, tmp_path
):
    cfg, crf_raw = job(scenes, f"{bucket}/out", checkpoint, storage_cfg)
    manifest = run_segment(cfg, crf_raw)

    fs, path = filesystem(join(bucket, "out", "masks"), storage_cfg)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert table.schema.equals(S.OUTPUT_SCHEMA, check_metadata=False)
    rows = read_output(f"{bucket}/out", storage_cfg)
    assert sorted(rows) == [f"scene_{i:06d}" for i in range(10)]
    assert {r[S.STATUS] for r in rows.values()} == {S.OK}
    assert manifest["counts"]["inputs"] == manifest["counts"]["rows"] == 10
    assert manifest["metrics"]["mean_iou_raw"] is not None
    # The job capped the DCNN's run-ahead from the first block (flow.bound_run_ahead), not at half the store.
    from ray.data._internal.execution.backpressure_policy import DownstreamCapacityBackpressurePolicy

    assert DownstreamCapacityBackpressurePolicy.OBJECT_STORE_BUDGET_UTIL_THRESHOLD == 0.0

    # The same stages in one process, no Ray, same images: masks must be identical.
    meta, digest = load_model_meta(cfg)
    ref_cfg, _ = job(scenes, str(tmp_path / "ref"), checkpoint, storage_cfg)
    ref_cfg = resolve_crf(ref_cfg, meta["variant"], crf_raw)
    _, items = list_inputs(scenes, storage_cfg)
    run_single_process(items, ref_cfg, EncodeConfig(NUM_CLASSES, meta["variant"], digest))
    ref = read_output(str(tmp_path / "ref"), storage_cfg)
    assert sorted(ref) == sorted(rows)
    for image_id, row in rows.items():
        mask, raw = png(row["mask_png"]), png(row["raw_mask_png"])
        assert mask.shape == (72, 96) and raw.shape == (72, 96)
        np.testing.assert_array_equal(mask, png(ref[image_id]["mask_png"]))
        np.testing.assert_array_equal(raw, png(ref[image_id]["raw_mask_png"]))
        assert row["confusion_crf"] == ref[image_id]["confusion_crf"]
        assert sum(row["confusion_raw"]) > 0

    # Manifest: counts, versions, and no secret anywhere in it.
    text = json.dumps(manifest)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text
    assert manifest["versions"]["ray"]

    # Metrics recomputed independently (one process, from the Parquet masks + ground truth PNGs) equal the
    # metrics.json the job wrote, to the last digit.
    from pipeline.metrics.evaluate import evaluate_output
    from pipeline.storage import read_bytes

    written = json.loads(read_bytes(join(bucket, "out", "report", "metrics.json"), storage_cfg))
    again_metrics = evaluate_output(
        f"{bucket}/out", storage_cfg=storage_cfg, use_ray=False, write_report=False
    )
    assert json.loads(json.dumps(again_metrics)) == written
    assert written["num_images"] == 10 and written["crf"]["mean_iou"] is not None

    # A re-run of the same command finds everything done and writes nothing new.
    parts_before = list_files(join(bucket, "out", "masks"), storage_cfg)
    again = run_segment(cfg, crf_raw)
    assert again["counts"]["processed_this_run"] == 0 and again["counts"]["done_before"] == 10
    assert list_files(join(bucket, "out", "masks"), storage_cfg) == parts_before


def test_no_crf_masks_equal_raw(ray_local, scenes, checkpoint, storage_cfg, bucket):
    cfg, _ = job(scenes, f"{bucket}/nocrf", checkpoint, storage_cfg)
    run_segment(cfg, {"enabled": False})
    rows = read_output(f"{bucket}/nocrf", storage_cfg)
    assert len(rows) == 10
    for row in rows.values():
        assert row["mask_png"] == row["raw_mask_png"]


def test_hostile_inputs_each_end_as_one_correct_row(ray_local, storage_cfg, bucket, tmp_path):
    """Every hostile image and label (tests/hostile.py) ends as exactly one row with the expected status."""
    from pipeline.storage import s3_client, split_s3
    from tests.hostile import HOSTILE_IMAGES, HOSTILE_KEYS, HOSTILE_LABELS

    client, name = s3_client(storage_cfg), split_s3(bucket)[0]
    expected: dict[str, object] = {}
    for case in [*HOSTILE_IMAGES, *HOSTILE_KEYS]:  # raw keys: spaces, unicode and '../' stay as given
        client.put_object(Bucket=name, Key=f"in/{case.name}", Body=case.data)
        expected[case.name.rsplit(".", 1)[0]] = case.expected
    for case in HOSTILE_LABELS:
        client.put_object(Bucket=name, Key=f"in/{case.image_name}", Body=case.image)
        client.put_object(Bucket=name, Key=f"labels/{case.image_name.rsplit('.', 1)[0]}.png", Body=case.label)
        expected[case.image_name.rsplit(".", 1)[0]] = case.expected
    checkpoint = tiny_checkpoint(tmp_path, 21)  # the hostile labels use VOC's 21 classes
    cfg, crf_raw = job(f"{bucket}/in", f"{bucket}/out", checkpoint, storage_cfg, labels=f"{bucket}/labels")
    manifest = run_segment(cfg, crf_raw)
    rows = read_output(f"{bucket}/out", storage_cfg)
    assert sorted(rows) == sorted(expected)
    assert manifest["counts"]["rows"] == len(expected) >= 15
    for image_id, want in expected.items():
        row = rows[image_id]
        assert row[S.STATUS] == want.status, (image_id, row[S.ERROR])
        if want.status in (S.OK, S.ErrorKind.LABEL):  # a label error still carries both masks
            assert png(row["mask_png"]).shape == (row["height"], row["width"]), image_id
            if want.shape:
                assert (row["height"], row["width"]) == want.shape, image_id
        else:
            assert row[S.ERROR] and row["mask_png"] is None, image_id
        if want.status != S.OK:
            assert row[S.ERROR], image_id
    # Output object names never derive from image keys, so no key can escape the output prefix.
    assert all(uri.startswith(f"{bucket}/out/") for uri in list_files(bucket, storage_cfg) if "/out" in uri)


def test_fail_fast_with_the_cause(local_s3, scenes, checkpoint, storage_cfg, bucket, tmp_path):
    cfg, crf_raw = job(scenes, f"{bucket}/out", str(tmp_path / "missing.pt"), storage_cfg)
    with pytest.raises(JobError, match="cannot read the model"):
        run_segment(cfg, crf_raw)
    cfg, crf_raw = job("s3://no-such-bucket-x/voc", f"{bucket}/out", checkpoint, storage_cfg)
    with pytest.raises(JobError, match="does not exist"):
        run_segment(cfg, crf_raw)
    dead = {"endpoint_url": "http://127.0.0.1:9", "max_attempts": 1, "connect_timeout_s": 1.0}
    cfg, crf_raw = load_job_config(input=scenes, output=f"{bucket}/o", model=checkpoint, storage=dead)
    t0 = time.monotonic()
    with pytest.raises(JobError, match="cannot reach the S3 endpoint"):
        run_segment(cfg, crf_raw)
    assert time.monotonic() - t0 < 30


@pytest.mark.integration  # a CLI subprocess
def test_cli_reports_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("input: a\noutput: b\nmodel: c\ndcnn: {batch_sise: 3}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "segment", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "batch_sise" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_resume_after_kill_has_no_gaps_and_no_duplicates(
    ray_local, local_s3, checkpoint, storage_cfg, bucket, tmp_path
):
    """SIGKILL the whole driver (and its local Ray) part way, re-run the same command: exactly one row each. The
    re-run joins the test's Ray (what it resumes from is in the output, not in Ray): one Ray start fewer."""
    write_voc_dataset(
        f"{bucket}/voc", count=24, size=(96, 72), num_classes=NUM_CLASSES, seed=3, storage_cfg=storage_cfg
    )
    config = tmp_path / "job.yaml"
    config.write_text(
        json.dumps(
            {
                "input": f"{bucket}/voc",
                "output": f"{bucket}/out",
                "model": checkpoint,
                "storage": {"endpoint_url": storage_cfg.endpoint_url},
                "dcnn": {"batch_size": 1, "min_input_size": 97},
                "write": {"rows_per_file": 2},
                "read": {"items_per_block": 2},
                "evaluate": False,
            }
        )
    )
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", "--config", str(config)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    masks = join(bucket, "out", "masks")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(list_files(masks, storage_cfg)) < 2:
        time.sleep(0.5)
    assert proc.poll() is None, (
        f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_output(f"{bucket}/out", storage_cfg)
    assert 0 < len(partial) < 24

    address = ray_local.get_runtime_context().gcs_address
    done = subprocess.run([*cmd, "--address", address], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_output(f"{bucket}/out", storage_cfg)
    assert sorted(rows) == [f"scene_{i:06d}" for i in range(24)]
    assert "done before" in done.stdout
    for image_id, row in partial.items():  # rows committed before the kill are kept, not recomputed
        assert rows[image_id]["mask_png"] == row["mask_png"]
    assert not any(Path(p).name.startswith(".") for p in list_files(masks, storage_cfg))


def test_dry_run_reports_found_done_todo_and_pools_and_writes_nothing(
    ray_local, scenes, checkpoint, storage_cfg, bucket
):
    """``segment --dry-run`` on an output that holds the train split: the counts a run would see, nothing written
    (not the plan, not the output), none of Ray's lines by default; --verbose shows them."""
    from pipeline.storage import s3_client, split_s3

    cfg, _ = job(scenes, f"{bucket}/out", checkpoint, storage_cfg, split="train", evaluate=False)
    done = run_segment(cfg, {})["counts"]["rows"]  # the CRF on, as in the dry run: one identity
    assert 0 < done < 10
    client, name = s3_client(storage_cfg), split_s3(bucket)[0]

    def objects() -> dict:  # every object of the bucket with its ETag and time: a rewrite shows too
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=name)
        return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}

    before = objects()
    assert any(k.startswith("out/_plan/") for k in before) and any(k.startswith("out/masks/") for k in before)
    address = ray_local.get_runtime_context().gcs_address  # join the test cluster: no Ray start-up
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", "--input", scenes, "--model", checkpoint,
           "--endpoint-url", storage_cfg.endpoint_url, "--address", address, "--dry-run"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [*cmd, "--output", f"{bucket}/out"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(
        rf"^inputs\s+10 found under {scenes} \(voc, 10 labelled, \d+ listing tasks\)$", out, re.M
    ), out
    assert re.search(rf"^done\s+{done} \({done} rows under {bucket}/out/masks/\)$", out, re.M), out
    assert re.search(rf"^to do\s+{10 - done}$", out, re.M), out
    assert re.search(
        r"^pools\s+DCNN 1-\d+ actors x \(1 CPU, 0 GPU\); CRF \d+-\d+ actors x 1 CPU \(cluster: 4 CPU",
        out,
        re.M,
    )
    assert "nothing was run or written" in out
    assert "worker.py" not in proc.stderr and "Connecting to existing Ray cluster" not in proc.stderr
    assert objects() == before

    proc = subprocess.run(
        [*cmd, "--output", f"{bucket}/fresh", "--verbose"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^done\s+0 \(0 rows", proc.stdout, re.M) and re.search(
        r"^to do\s+10$", proc.stdout, re.M
    )
    assert "Connecting to existing Ray cluster" in proc.stderr  # Ray's own lines, shown under --verbose
    assert objects() == before
