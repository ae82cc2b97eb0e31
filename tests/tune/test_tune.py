"""tune-crf (pipeline/tune/): search files, a tiny grid on real Ray Tune + a real S3 endpoint (moto server), a
killed run resumed, the best trial reproduced by ``segment --config OUT/crf.yaml``, cached logits equal to the
segment job's, a failing trial recorded while the search goes on."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.config import ConfigError, load_job_config
from pipeline.demo.scenes import class_names, write_voc_dataset
from pipeline.model.deeplab import build_model
from pipeline.model.weights import save_checkpoint
from pipeline.stages.crf import CRFConfig
from pipeline.storage import filesystem, join, list_files, read_bytes, s3_client
from pipeline.tune.rounds import _Recorder, _Rounds, make_trainable, run_search
from pipeline.tune.space import grid_of, parse_search, refine_values, trial_key
from pipeline.tune.trials import cache_rows, crf_masks

NUM_CLASSES = 4
# 2 x 2 = 4 grid trials + the default, then one refine round of 3 x 3 = 9 (8 new): 13 trials.
SEARCH = "bi_w: [3, 6]\nbi_xy_std: [30, 60]\nbi_rgb_std: 5\nrefine_rounds: 1\n"
EXPECTED_TRIALS = 4 + 1 + 8


def _tiny_checkpoint(directory: Path) -> str:
    import torch

    torch.manual_seed(0)
    model = build_model("deeplab-largefov", num_classes=NUM_CLASSES, width=1 / 16)
    path = directory / "tiny.pt"
    save_checkpoint(model, str(path), class_names=class_names(NUM_CLASSES), provenance={"source": "test"})
    return str(path)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _records(out_uri: str, storage_cfg) -> dict[str, bytes]:
    files = [f for f in list_files(join(out_uri, "cache"), storage_cfg, (".json",)) if "/trials/" in f]
    return {f: read_bytes(f, storage_cfg) for f in files}


# -- search files (no Ray) ---------------------------------------------------------------------------------------


def test_default_search_is_the_papers_coarse_grid():
    spec = parse_search(None, CRFConfig())
    assert spec.values["bi_w"] == (5.0, 10.0)
    assert spec.values["bi_xy_std"] == (50.0, 60.0, 70.0, 80.0, 90.0, 100.0)
    assert spec.values["bi_rgb_std"] == tuple(float(v) for v in range(3, 11))
    assert (spec.values["pos_w"], spec.values["pos_xy_std"], spec.values["iterations"]) == (
        (3.0,),
        (3.0,),
        (10,),
    )
    assert spec.refine_rounds == 1
    assert len(grid_of(spec.values)) == 2 * 6 * 8
    # The finer step around the best: half the spacing next to it, on both sides.
    assert refine_values(spec.values["bi_w"], 5.0) == (2.5, 5.0, 7.5)
    assert refine_values(spec.values["bi_xy_std"], 100.0) == (95.0, 100.0, 105.0)
    assert refine_values((3.0,), 3.0) == (3.0,)
    assert trial_key({**grid_of(spec.values)[0], "iterations": 10.0}) == trial_key(grid_of(spec.values)[0])


def test_search_file_sets_ranges_lists_and_fixed_values():
    spec = parse_search(
        {"bi_w": 4, "bi_xy_std": {"min": 20, "max": 40, "step": 10}, "pos_w": [1, 3], "iterations": 5},
        CRFConfig(),
    )
    assert spec.values["bi_w"] == (4.0,)
    assert spec.values["bi_xy_std"] == (20.0, 30.0, 40.0)
    assert spec.values["bi_rgb_std"] == tuple(float(v) for v in range(3, 11))  # not named: the default search
    assert spec.values["pos_w"] == (1.0, 3.0)
    assert spec.values["iterations"] == (5,)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("bi_ww: [5, 10]\n", "bi_ww"),
        ("bi_xy_std: '100:10:50'\n", "bi_xy_std"),
        ("bi_rgb_std: {min: 3, max: 10, step: 0}\n", "bi_rgb_std"),
        ("bi_rgb_std: {min: 3, max: 10}\n", "bi_rgb_std"),
        ("pos_xy_std: 0\n", "pos_xy_std"),
        ("bi_w: [5, nan]\n", "bi_w"),
        ("normalization: nope\n", "normalization"),
        ("iterations: 2.5\n", "iterations"),
        ("refine_rounds: -1\n", "refine_rounds"),
        ("bi_xy_std: '1:0.001:1000'\n", "bi_xy_std"),
        ("- bi_w\n", "mapping"),
        ("bi_w: [5, 10\n", "YAML"),
    ],
)
def test_bad_search_file_fails_in_one_line_naming_it(tmp_path, text, named):
    from pipeline.tune.space import load_search

    path = tmp_path / "search.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_search(str(path), CRFConfig())
    message = str(info.value)
    assert named in message and str(path) in message
    assert "\n" not in message


@pytest.mark.integration  # a CLI subprocess
def test_cli_rejects_a_bad_search_file_before_loading_anything(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("bi_xy_std: {min: 50, max: 100, step: -10}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "tune-crf", "--input", str(tmp_path / "none"),
         "--output", str(tmp_path / "out"), "--model", str(tmp_path / "none.pt"), "--search", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "bi_xy_std" in proc.stderr and "step" in proc.stderr and "Traceback" not in proc.stderr


# -- on Ray Tune -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(ray_local, local_s3, storage_cfg, tmp_path_factory):
    """7 scenes, 6 of them labelled; `deeplab tune-crf` SIGKILLed part way, then the same command run again."""
    import ray

    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("tune")
    s3_client(storage_cfg).create_bucket(Bucket="tune-scenes")
    voc, out = "s3://tune-scenes/voc", "s3://tune-scenes/out"
    write_voc_dataset(voc, count=7, size=(96, 72), num_classes=NUM_CLASSES, seed=11, storage_cfg=storage_cfg)
    s3_client(storage_cfg).delete_object(Bucket="tune-scenes", Key="voc/SegmentationClass/scene_000003.png")
    checkpoint = _tiny_checkpoint(tmp)
    job = tmp / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "storage": {"endpoint_url": storage_cfg.endpoint_url},
                "dcnn": {"batch_size": 2, "min_input_size": 97},
            }
        )
    )
    search = tmp / "search.yaml"
    search.write_text(SEARCH)
    args = ["tune-crf", "--input", voc, "--model", checkpoint, "--output", out, "--images", "100",
            "--config", str(job), "--search", str(search)]  # fmt: skip
    address = ray.get_runtime_context().gcs_address  # the killed run joins the test cluster: no Ray start-up
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args, "--address", address],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(_records(out, storage_cfg)) < 2:
        time.sleep(0.1)
    assert proc.poll() is None, (
        f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _records(out, storage_cfg)
    assert 2 <= len(before) < EXPECTED_TRIALS
    assert main(args) == 0  # the same command again (in this process, on the same cluster)
    doc = json.loads(read_bytes(join(out, "tuning.json"), storage_cfg))
    return {"voc": voc, "out": out, "checkpoint": checkpoint, "job": job, "before": before, "doc": doc}


def test_killed_run_resumes_without_redoing_finished_trials(tuned, storage_cfg):
    doc, before = tuned["doc"], tuned["before"]
    after = _records(tuned["out"], storage_cfg)
    assert all(after[uri] == data for uri, data in before.items())  # recorded trials were not run again
    assert len(doc["trials"]) == len(after) == EXPECTED_TRIALS
    assert doc["timing"]["trials_done_before"] == len(before)
    assert doc["timing"]["trials_run"] == EXPECTED_TRIALS - len(before)
    assert doc["timing"]["logits_cache_reused"] is True  # the DCNN did not run again either
    old_runs = {json.loads(v)["run_id"] for v in before.values()}
    assert len(old_runs) == 1 and doc["timing"]["run_id"] not in old_runs
    assert sum(t["run_id"] == doc["timing"]["run_id"] for t in doc["trials"]) == doc["timing"]["trials_run"]


def test_tiny_grid_scores_every_trial_and_picks_the_best(tuned):
    doc = tuned["doc"]
    assert doc["images"]["ids"] == [f"scene_{i:06d}" for i in range(7) if i != 3]  # labelled only, id order
    assert [r["num_trials"] for r in doc["rounds"]] == [5, 9]
    assert {t["status"] for t in doc["trials"]} == {"ok"}
    scores = [t["mean_iou"] for t in doc["trials"]]
    assert doc["best"]["mean_iou"] == max(scores) and len(set(scores)) > 1
    assert doc["best"]["mean_iou"] >= doc["default"]["mean_iou"]
    default = next(t for t in doc["trials"] if t["is_default"])
    assert default["params"]["bi_xy_std"] == 121.0 and default["mean_iou"] == doc["default"]["mean_iou"]
    best = doc["best"]["crf"]
    refined = doc["rounds"][1]["values"]
    assert all(len(refined[f]) == 3 and best[f] in refined[f] for f in ("bi_w", "bi_xy_std"))
    assert refined["bi_rgb_std"] == [5.0]  # fixed in the search file: not refined
    assert len(doc["trimap"]["best"]) == 40 and doc["trimap"]["best"][-1] is not None


@pytest.fixture(scope="module")
def segmented(tuned, storage_cfg, ray_local):
    """`deeplab segment --config OUT/crf.yaml` on the same scenes."""
    from pipeline.segment import run_segment

    crf_yaml = tuned["job"].parent / "crf.yaml"
    crf_yaml.write_bytes(read_bytes(join(tuned["out"], "crf.yaml"), storage_cfg))
    cfg, crf_raw = load_job_config(
        str(crf_yaml),
        input=tuned["voc"],
        output=join(tuned["out"], "segment"),
        model=tuned["checkpoint"],
        storage={"endpoint_url": storage_cfg.endpoint_url},
    )
    run_segment(cfg, crf_raw)
    metrics = json.loads(read_bytes(join(tuned["out"], "segment", "report", "metrics.json"), storage_cfg))
    fs, path = filesystem(join(tuned["out"], "segment", "masks"), storage_cfg)
    import pyarrow.dataset as pads

    rows = {r[S.ID]: r for r in pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()}
    return {"metrics": metrics, "rows": rows, "cfg": cfg, "storage_cfg": storage_cfg}


def test_best_trial_reproduces_through_segment_config(tuned, segmented):
    best = tuned["doc"]["best"]
    import yaml

    fragment = yaml.safe_load(read_bytes(join(tuned["out"], "crf.yaml"), segmented["storage_cfg"]))
    assert fragment["crf"] == best["crf"] and fragment["dcnn"] == {"batch_size": 2, "min_input_size": 97}
    assert segmented["metrics"]["num_images"] == 6 and segmented["metrics"]["num_unlabelled"] == 1
    assert abs(segmented["metrics"]["crf"]["mean_iou"] - best["mean_iou"]) <= 1e-12
    assert segmented["metrics"]["crf"]["pixel_accuracy"] == pytest.approx(best["pixel_accuracy"], abs=1e-12)


def test_cached_logits_equal_the_segment_jobs(tuned, segmented, storage_cfg, ray_local):
    import ray

    from pipeline.tune.trials import compute_logits

    fs, path = filesystem(tuned["doc"]["logits_cache"], storage_cfg)
    rows = cache_rows(pq.read_table(path, filesystem=fs))
    out = segmented["rows"]
    for row, mask in zip(rows, crf_masks(tuned["doc"]["best"]["crf"], rows), strict=True):
        np.testing.assert_array_equal(row[S.RAW_MASK], _png(out[row[S.ID]]["raw_mask_png"]))
        np.testing.assert_array_equal(mask, _png(out[row[S.ID]]["mask_png"]))
    # The segment job's DCNN stage (DeepLabPredictor in a one-CPU Ray worker, the same config) run again on the
    # same batches gives the cached float16 logits bit for bit. In another grouping (one image per batch, reverse
    # order) oneDNN picks other kernels: float32 sums differ by ~1e-6, which moves a few float16 roundings (measured:
    # 2 of 520 values, 7.6e-6 and 4.8e-7 apart); the masks stay equal.
    from pipeline.stages.plan import list_inputs

    cfg = segmented["cfg"]
    _, items = list_inputs(tuned["voc"], storage_cfg)
    items = [it for it in items if it[S.LABEL_SOURCE]]
    decode = dataclasses.replace(cfg.decode, num_classes=NUM_CLASSES)
    task = ray.remote(num_cpus=1)(compute_logits)
    same, single = ray.get(
        [
            task.remote(items, cfg.dcnn, decode, storage_cfg),
            task.remote(items[::-1], dataclasses.replace(cfg.dcnn, batch_size=1), decode, storage_cfg),
        ]
    )
    assert not same[1] and not single[1]
    same_rows = {r[S.ID]: r for r in cache_rows(same[0])}
    single_rows = {r[S.ID]: r for r in cache_rows(single[0])}
    for row in rows:
        cached = row[S.LOGITS]
        assert cached.dtype == np.float16 and cached.ndim == 3
        np.testing.assert_array_equal(same_rows[row[S.ID]][S.LOGITS], cached)
        other = single_rows[row[S.ID]][S.LOGITS].astype(np.float32)
        np.testing.assert_allclose(other, cached.astype(np.float32), rtol=2**-10, atol=1e-5)
        np.testing.assert_array_equal(single_rows[row[S.ID]][S.RAW_MASK], row[S.RAW_MASK])


def test_a_failing_trial_is_recorded_and_the_search_goes_on(ray_local, tmp_path):
    """pos_xy_std 0.01 on a 10001-pixel-wide image exceeds the CRF's feature bound: that trial fails, not the search."""
    from pipeline.model.inference import logits_size
    from pipeline.storage import StorageConfig

    rng = np.random.default_rng(0)

    def row(image_id: str, height: int, width: int) -> dict:
        lh, lw = logits_size(height, width, offset=0)
        return {
            S.ID: image_id,
            S.IMAGE: rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            S.LABEL: rng.integers(0, NUM_CLASSES, (height, width), dtype=np.uint8),
            S.RAW_MASK: np.zeros((height, width), dtype=np.uint8),
            S.LOGITS: rng.normal(0, 2, (NUM_CLASSES, lh, lw)).astype(np.float16),
            S.UPSAMPLE_OFFSET: 0,
        }

    rows = [row("a", 24, 32), row("long", 1, 10001)]
    base = CRFConfig()
    spec = parse_search(
        {"bi_w": 4, "bi_xy_std": 50, "bi_rgb_std": 5, "pos_xy_std": [0.01, 3], "refine_rounds": 0}, base
    )
    recorder = _Recorder(str(tmp_path / "cache"), StorageConfig(), run_id="test")
    default = {f: getattr(base, f) for f in spec.values}
    plan = _Rounds(spec, default, recorder)
    run_search(make_trainable(rows, NUM_CLASSES), plan)
    by_sigma = {}
    for rec in recorder.records.values():
        by_sigma.setdefault(rec["crf"]["pos_xy_std"], []).append(rec)
    assert len(recorder.records) == 3  # two grid points + the default
    (failed,) = by_sigma[0.01]
    assert failed["status"] == "error" and "pos_xy_std" in failed["error"] and failed["mean_iou"] is None
    assert all(r["status"] == "ok" and r["mean_iou"] is not None for r in by_sigma[3.0])
    on_disk = list_files(str(tmp_path / "cache" / "trials"), StorageConfig(), (".json",))
    assert len(on_disk) == 3


def test_render_reports_answer_first_same_order_and_escaped():
    """The tune-crf report from a tuning.json made in code: headline numbers first, report.md in the page's order,
    untrusted text (an error message, the input URI) escaped."""
    import re

    from pipeline.tune.report import render_reports
    from tests.metrics.test_report_browser import make_tune_doc

    doc, rounds = make_tune_doc()
    doc["input"] = "s3://b/<img src=x onerror=alert(1)>"
    doc["trials"].append({**doc["trials"][0], "key": "bad", "status": "error", "mean_iou": None,
                          "error": "ValueError: <script>x</script> | *y*"})  # fmt: skip
    md, page, figures = render_reports(doc, rounds)
    assert set(figures) == {"heatmap_round0", "heatmap_round1", "trimap"}
    header = page[page.index("<header") : page.index("</header>")]
    for element_id, value in (("miou-raw", doc["raw"]["mean_iou"]), ("miou-default", doc["default"]["mean_iou"]),
                              ("miou-tuned", doc["best"]["mean_iou"])):  # fmt: skip
        assert f'<span id="{element_id}">{100 * value:.2f}</span>' in header
    assert "<script>" not in page and "<img src=x" not in page and "&lt;script&gt;" in page
    assert "<script>" not in md and "\\| \\*y\\*" in md
    html_titles = re.findall(r"<h2>([^<]+)</h2>", page)
    md_titles = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert md_titles == html_titles == ["Default vs tuned", "Search rounds", "Run", "Failed trials"]
    # Each heatmap beside its table.
    search = page[page.index('<section id="search">') : page.index('<section id="run">')]
    assert search.count('class="pair"') == 2 and 'id="fig-heatmap_round1"' in search
