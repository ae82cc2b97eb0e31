"""The README's first command, `deeplab demo`, end to end: local S3 + local Ray + shipped model, then cleanup."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline.demo.scenes import scene_class_names
from pipeline.model.weights import DEMO_CHECKPOINT, load_checkpoint

# Every test here starts a subprocess job, a Ray head or the demo: the integration tier.
pytestmark = pytest.mark.integration


def test_shipped_checkpoint_is_small_and_loads():
    assert DEMO_CHECKPOINT.stat().st_size <= 5 * 1024 * 1024
    model, meta = load_checkpoint(str(DEMO_CHECKPOINT))
    assert meta["variant"] == "deeplab-largefov" and model.num_classes == meta["num_classes"]
    assert meta["provenance"], "the checkpoint must say how it was made"
    # Classes are named after what the scene generator draws for each index (reports say "pole", not "class_2").
    assert meta["class_names"] == scene_class_names(meta["num_classes"])
    assert meta["class_names"] == ["background", "blob", "pole", "rect", "ring", "ellipse"]
    assert (
        meta["provenance"]["class_names_renamed_from"] == "background,class_1,class_2,class_3,class_4,class_5"
    )
    assert meta["digest"].startswith("91b0205c57ca")  # docs/demo-model.md quotes it


def test_shipped_checkpoint_beats_chance_and_crf_beats_raw_on_unseen_scenes():
    """The issue's bar: on generated scenes it never trained on (seed 1000 on), raw mIoU well above chance and the
    paper's LargeFOV CRF above raw: the 100 scenes docs/demo-model.md reports on (~12 s, deterministic on 1 thread)."""
    from jobs.train_demo_model import evaluate

    figures = evaluate(threads=1, quiet=True)
    assert figures["test_scenes"] == 100
    chance = max(figures["chance_uniform_miou"], figures["all_background_miou"])  # 0.05 and 0.14
    assert chance < 0.2
    assert figures["raw_miou"] > 0.6 and figures["raw_miou"] > chance + 0.4
    assert figures["crf_miou"] > figures["raw_miou"] + 0.01


def test_demo_runs_end_to_end_and_stops_what_it_started(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "demo",
            "--count",
            "6",
            "--size",
            "160x120",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^images\s+6 \(6 rows", out, re.M), out
    assert re.search(r"^errors\s+0$", out, re.M), out
    raw, crf = (float(x) for x in re.search(r"mean IoU\s+raw ([\d.]+)\s+CRF ([\d.]+)", out).groups())
    assert 0 < raw <= 100 and 0 < crf <= 100

    output = tmp_path / "output"
    table = pq.read_table(output / "masks")
    assert table.num_rows == 6 and set(table.column("status").to_pylist()) == {"ok"}
    metrics = json.loads((output / "report" / "metrics.json").read_text())
    assert round(100 * metrics["raw"]["mean_iou"], 2) == raw
    page = (output / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    # The report a person opens names the folder they have, not only the bucket that went away with the demo.
    assert f"Read from {output}, a copy of the output s3://" in page
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 6
    # Only the project's own lines (issue 18): none of Ray's warnings or internals on the terminal; they went to
    # the log file the summary names, beside the outputs.
    said = out + proc.stderr
    for internal in ("core_worker", "Progress bars", "Warning", "token", "Execution plan", "streaming_executor",
                     "worker.py", "warnings.warn", "ray-data", "Started a local Ray"):  # fmt: skip
        assert internal not in said, (internal, said)
    own = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) (pipeline|deeplab|jobs)[\w.]*: ")
    assert all(own.match(line) for line in proc.stderr.splitlines()), proc.stderr
    assert re.search(r"progress: 6/6 images \([\d.]+ images/s, done, 0 errors\)", proc.stderr), proc.stderr
    logs_line = re.search(r"^logs\s+(\S+) \(Ray session logs: (\S+)\)$", out, re.M)
    assert logs_line and logs_line.group(1) == str(tmp_path / "deeplab.log"), out
    logged = (tmp_path / "deeplab.log").read_text()
    assert "Started a local Ray instance" in logged and "streaming_executor" in logged  # Ray's, routed here
    assert "pipeline.segment: 6 inputs" in logged  # and ours as well: the file is the whole story

    # The moto server was stopped: nothing listens on its port any more.
    port = int(re.search(r"127\.0\.0\.1:(\d+)", proc.stderr).group(1))
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
