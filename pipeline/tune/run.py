"""CRF tuning (beside the segment flow): cross-validate the dense CRF's parameters on Ray Tune, ``deeplab tune-crf``.

DeepLab v1 fixes the Gaussian kernel (pos_w = pos_xy_std = 3) and cross-validates the bilateral kernel per model on
100 val images, coarse then fine (reference section 3). Here:

1. **Logits once.** The first N labelled inputs (image_id order, ``plan.list_inputs``) go through the segment job's
   own read, decode and DCNN stages (``fetch_batch``, ``decode_batch``, ``DeepLabPredictor``) in one Ray task.
   Their stride-8 float16 logits, image, label and raw mask are cached as Parquet under
   ``OUT/cache/<key>/logits.parquet`` (the key digests the model, the image ids and the DCNN/decode settings) and
   put in Ray's object store once for every trial.
2. **Trials run only the CRF**, one Ray Tune trial per parameter set and one CPU slot per trial: each image goes
   through ``CRFRefiner`` (the segment job's CRF stage, the same upsampling, softmax, pruning and pydensecrf call),
   its mask is scored with ``metrics.confusion_matrix`` (what ``encode`` stores) and the summed confusion with
   ``metrics.summarize`` (what ``metrics.json`` reports). The best trial therefore reproduces exactly in
   ``deeplab segment --config OUT/crf.yaml`` on the same images.
3. **Rounds.** Round 0 is the grid of the search (by default the paper's coarse grid: bi_w in [5, 10],
   bi_xy_std in 50:10:100, bi_rgb_std in 3:1:10) plus the variant's default parameters; each refine round searches
   best +- half the previous spacing for every parameter that was searched (3 values each), the rest fixed at the
   best.
4. **Resume.** Every finished trial (result or error) is recorded at once as
   ``OUT/cache/<key>/trials/<trial>.json``. A re-run of the same command skips recorded trials and reuses the
   cached logits, so a killed run continues where it stopped. A failing trial is a record with its error; the
   search goes on.

Outputs: ``OUT/tuning.json`` (every trial, the best, the default, timing), ``OUT/crf.yaml`` (a job-config fragment
for ``deeplab segment --config``), ``OUT/report.md`` and ``OUT/report.html`` (``pipeline/tune/report.py``: the
answer first, heatmaps, default vs tuned, trimap).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline import schema as S
from pipeline import storage
from pipeline.metrics.confusion import MetricsAccumulator, summarize
from pipeline.stages.crf import CRFConfig
from pipeline.tune.report import render_reports
from pipeline.tune.rounds import _best, _Recorder, _Rounds, make_trainable, run_search
from pipeline.tune.space import (
    _SCHEMA_VERSION,
    TRIMAP_WIDTHS,
    SearchSpec,
    _canonical,
    _config_error,
    grid_of,
    load_search,
    trial_key,
)
from pipeline.tune.trials import _table_bytes, cache_rows, compute_logits, evaluate_params

__all__ = ["TuneResult", "tune_crf", "crf_yaml", "tune_main"]

log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    document: dict  # tuning.json
    outputs: dict[str, str]


def _dcnn_fragment(dcnn_cfg: Any) -> dict:
    """The DCNN settings that differ from the defaults (the model itself excluded): they shape the logits."""
    from pipeline.stages.dcnn import DCNNConfig

    default = DCNNConfig(model_uri="x")
    skip = ("model_uri", "expected_variant")
    return {
        f.name: getattr(dcnn_cfg, f.name)
        for f in dataclasses.fields(dcnn_cfg)
        if f.name not in skip and getattr(dcnn_cfg, f.name) != getattr(default, f.name)
    }


@dataclass(frozen=True)
class _Setup:
    """What tune_crf settles before any Ray work: the config completed from the checkpoint, the search, the images."""

    cfg: Any
    meta: dict
    digest: str
    default_params: dict
    spec: SearchSpec
    fmt: str
    labelled: list
    chosen: list


def _prepare(cfg: Any, crf_raw: dict | None, num_images: int, search_path: str | None) -> _Setup:
    """Fail fast (search file, storage, model, labels) and pick the first ``num_images`` labelled inputs."""
    from pipeline.config import resolve_crf
    from pipeline.segment import JobError, load_model_meta
    from pipeline.stages.plan import list_inputs

    if num_images < 1:
        raise _config_error(f"--images must be >= 1, got {num_images}")
    load_search(search_path, CRFConfig(), cfg.storage)  # a bad search file fails before anything is loaded
    try:
        storage.check_access(cfg.read.input_uri, cfg.storage, what="input")
        storage.check_access(cfg.write.output_uri, cfg.storage, what="output")
    except storage.StorageError as e:
        raise JobError(str(e)) from e
    meta, digest = load_model_meta(cfg)
    cfg = resolve_crf(cfg, meta["variant"], crf_raw or {})
    if cfg.crf is None:
        raise _config_error("tune-crf needs the CRF: remove 'crf: false' / crf.enabled from the config")
    default_params = _canonical(dataclasses.asdict(cfg.crf))
    spec = load_search(
        search_path, cfg.crf, cfg.storage
    )  # fields the search leaves out: the variant's values
    cfg = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, num_classes=meta["num_classes"]))
    fmt, items = list_inputs(
        cfg.read.input_uri, cfg.storage, input_format=cfg.read.input_format,
        labels_uri=cfg.read.labels_uri, split=cfg.read.split,
    )  # fmt: skip
    labelled = [it for it in items if it[S.LABEL_SOURCE]]
    if not labelled:
        raise JobError(f"no labelled images under {cfg.read.input_uri} (format {fmt}): tuning needs labels")
    return _Setup(cfg, meta, digest, default_params, spec, fmt, labelled, labelled[:num_images])


def _cache_uri(setup: _Setup) -> str:
    """OUT/cache/<key>: the key digests the model, the images and the DCNN/decode settings (a change = new logits)."""
    key_doc = {
        "version": 1,
        "model_digest": setup.digest,
        "ids": [it[S.ID] for it in setup.chosen],
        "sources": [it[S.SOURCE] for it in setup.chosen],
        "dcnn": {
            k: v
            for k, v in dataclasses.asdict(setup.cfg.dcnn).items()
            if k not in ("model_uri", "expected_variant")
        },
        "decode": dataclasses.asdict(setup.cfg.decode),
    }
    cache_key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    return storage.join(setup.cfg.write.output_uri, "cache", cache_key)


def _logits(setup: _Setup, cache_uri: str, use_gpu: bool) -> tuple[pa.Table, list, bool, float]:
    """(logits table, excluded images, whether the cache was reused, DCNN seconds): from the cache, or one Ray task."""
    import ray

    cfg = setup.cfg
    logits_uri, excluded_uri = (
        storage.join(cache_uri, "logits.parquet"),
        storage.join(cache_uri, "excluded.json"),
    )
    start = time.monotonic()
    if storage.exists(logits_uri, cfg.storage):
        fs, path = storage.filesystem(logits_uri, cfg.storage)
        table = pq.read_table(path, filesystem=fs)
        excluded = json.loads(storage.read_bytes(excluded_uri, cfg.storage))
        log.info("logits cache found: %d images, DCNN skipped", table.num_rows)
        return table, excluded, True, time.monotonic() - start
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(compute_logits)
    table, excluded = ray.get(task.remote(setup.chosen, cfg.dcnn, cfg.decode, cfg.storage))
    # excluded.json first: the Parquet file's presence is what marks the cache complete.
    storage.write_bytes(excluded_uri, json.dumps(excluded).encode(), cfg.storage)
    storage.write_bytes(logits_uri, _table_bytes(table), cfg.storage)
    seconds = time.monotonic() - start
    log.info("DCNN: %d images in %.1f s, %d left out", table.num_rows, seconds, len(excluded))
    return table, excluded, False, seconds


def _check_again(records: dict, default_key: str, default_acc, best: dict, best_acc) -> None:
    """The default and the best trial, re-scored in this process, must give the trials' mean IoU exactly."""
    from pipeline.segment import JobError

    for name, acc, rec in (("default", default_acc, records.get(default_key)), ("best", best_acc, best)):
        again = summarize(acc.confusion["crf"])["mean_iou"]
        if rec is not None and rec["status"] == "ok" and again != rec["mean_iou"]:
            raise JobError(
                f"the {name} parameters scored {again} on re-evaluation but {rec['mean_iou']} in the trial"
            )


def _trial_rows(rounds: list[dict], records: dict, default_key: str) -> list[dict]:
    """tuning.json's trials: every planned trial with a record, in round order."""
    round_of: dict = {}
    for rd in rounds:
        for k in rd["keys"]:
            round_of.setdefault(k, rd["round"])
    trials = []
    for k in dict.fromkeys(k for rd in rounds for k in rd["keys"]):
        rec = records.get(k)
        if rec is None:
            continue
        trials.append(
            {
                "key": k,
                "round": round_of[k],
                "params": rec["crf"],
                "status": rec["status"],
                "mean_iou": rec["mean_iou"],
                "pixel_accuracy": rec["pixel_accuracy"],
                "seconds": rec["seconds"],
                "error": rec["error"],
                "is_default": k == default_key,
                "run_id": rec["run_id"],
            }  # fmt: skip
        )
    return trials


def _scores(default_acc, best_acc) -> dict:
    """The metrics part of tuning.json: default vs best (CRF), raw, per class, trimap curves."""
    band_source = best_acc.band_source("auto")

    def curve(acc: MetricsAccumulator, which: str) -> list:
        return [summarize(c)["mean_iou"] for c in acc.trimap[band_source][which]]

    default, best, raw = (summarize(a.confusion[w]) for a, w in ((default_acc, "crf"), (best_acc, "crf"),
                                                                  (best_acc, "raw")))  # fmt: skip
    return {
        "default_scores": {"mean_iou": default["mean_iou"], "pixel_accuracy": default["pixel_accuracy"]},
        "raw": {k: raw[k] for k in ("mean_iou", "pixel_accuracy", "per_class_iou")},
        "per_class_iou": {"default": default["per_class_iou"], "best": best["per_class_iou"]},
        "trimap": {
            "band_source": band_source,
            "widths": list(TRIMAP_WIDTHS),
            "raw": curve(best_acc, "raw"),
            "default": curve(default_acc, "crf"),
            "best": curve(best_acc, "crf"),
        },
    }


# One function on purpose (~110 lines): the search's steps in order (cache, rounds, best, report); the work is in helpers.
def tune_crf(
    cfg: Any,
    crf_raw: dict | None = None,
    *,
    num_images: int = 100,
    search_path: str | None = None,
    address: str | None = None,
) -> TuneResult:
    """The ``deeplab tune-crf`` job. ``cfg`` is a JobConfig (``write.output_uri`` = OUT); ``crf_raw`` its CRF
    overrides (the default parameters are the variant's, plus these)."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # our records replace Tune's files
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no status tables on stdout
    import ray
    import ray.tune  # noqa: F401 - Tune sets up its loggers on import; quieten them after

    if not log.isEnabledFor(logging.DEBUG):  # Tune's notes about its own (disabled) result files
        logging.getLogger("ray.tune").setLevel(logging.ERROR)

    from pipeline.cluster.ray_init import init_ray
    from pipeline.segment import JobError

    t0, run_id = time.monotonic(), uuid.uuid4().hex[:12]
    setup = _prepare(cfg, crf_raw, num_images, search_path)
    cfg, meta, num_classes = setup.cfg, setup.meta, setup.meta["num_classes"]
    cache_uri = _cache_uri(setup)
    log.info(
        "tune-crf: %d of %d labelled inputs (%s), model %s (%s), %d classes; cache %s",
        len(setup.chosen), len(setup.labelled), setup.fmt, meta["variant"], setup.digest[:12], num_classes,
        cache_uri,
    )  # fmt: skip
    # One CRF process per core: trials are CPU-bound (pydensecrf holds its process), so no oversubscription.
    init_ray(address, local_cpus=os.cpu_count() or 1)
    resources = ray.cluster_resources()
    table, excluded, reused, dcnn_s = _logits(setup, cache_uri, use_gpu=resources.get("GPU", 0) >= 1)
    if table.num_rows == 0:
        raise JobError(f"none of the {len(setup.chosen)} images could be scored: e.g. {excluded[:2]}")
    rows = cache_rows(table)

    recorder = _Recorder(cache_uri, cfg.storage, run_id)
    recorder.load()
    plan = _Rounds(setup.spec, setup.default_params, recorder)
    search_s = run_search(make_trainable(rows, num_classes), plan)
    best = _best(plan.planned_records())
    if best is None:
        errors = sorted({r["error"] for r in plan.planned_records() if r.get("error")})
        raise JobError(f"every trial failed; e.g. {errors[:2]}")
    default_key = trial_key(setup.default_params)

    # Full metrics (trimap bands) of the default and the tuned parameters. In this process: two passes over the
    # images cost less than starting fresh Ray workers (each imports torch), and the CRF runs one at a time anyway.
    eval_start = time.monotonic()
    default_acc = evaluate_params(setup.default_params, rows, num_classes)
    best_acc = evaluate_params(best["crf"], rows, num_classes)
    eval_s = time.monotonic() - eval_start
    _check_again(recorder.records, default_key, default_acc, best, best_acc)
    trials = _trial_rows(plan.rounds, recorder.records, default_key)
    scores = _scores(default_acc, best_acc)
    doc = {
        "schema_version": _SCHEMA_VERSION,
        "input": cfg.read.input_uri,
        "input_format": setup.fmt,
        "output": cfg.write.output_uri,
        "model": {
            "uri": cfg.dcnn.model_uri,
            "variant": meta["variant"],
            "num_classes": num_classes,
            "digest": setup.digest,
        },  # fmt: skip
        "class_names": meta.get("class_names"),
        "images": {
            "requested": num_images,
            "labelled_available": len(setup.labelled),
            "chosen": len(setup.chosen),
            "scored": table.num_rows,
            "ids": [r[S.ID] for r in rows],
            "excluded": excluded,
        },
        "search": setup.spec.to_dict(),
        "rounds": [
            {k: v for k, v in rd.items() if k not in ("keys", "grid")} | {"num_trials": len(rd["keys"])}
            for rd in plan.rounds
        ],
        "trials": trials,
        "best": {k: best[k] for k in ("crf", "mean_iou", "pixel_accuracy", "key")},
        "default": {"crf": setup.default_params, **scores["default_scores"]},
        "raw": scores["raw"],
        "per_class_iou": scores["per_class_iou"],
        "trimap": scores["trimap"],
        "timing": {
            "run_id": run_id,
            "cpu_slots": float(resources.get("CPU", 0)),
            "dcnn_s": dcnn_s,
            "logits_cache_reused": reused,
            "search_wall_s": search_s,
            "trials_total": len(trials),
            "trials_done_before": sum(t["run_id"] != run_id for t in trials),
            "trials_run": recorder.ran_here,
            "trials_per_s": recorder.ran_here / search_s if search_s > 0 else None,
            "evaluate_s": eval_s,
            "trial_seconds_sum": sum(t["seconds"] or 0.0 for t in trials if t["run_id"] == run_id),
            "total_wall_s": 0.0,
        },
        "logits_cache": storage.join(cache_uri, "logits.parquet"),
        "mean_iou_protocol": "one confusion matrix summed over the scored images (void skipped), as metrics.json",
    }
    doc["timing"]["total_wall_s"] = time.monotonic() - t0
    outputs = _write_outputs(doc, cfg, cfg.write.output_uri)
    log.info(
        "best mean IoU %.4f (default %.4f) after %d trials (%d run now, %.1f s search, %.2f trials/s): %s",
        best["mean_iou"], doc["default"]["mean_iou"] or 0.0, len(trials), recorder.ran_here, search_s,
        doc["timing"]["trials_per_s"] or 0.0, outputs["crf.yaml"],
    )  # fmt: skip
    return TuneResult(document=doc, outputs=outputs)


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def crf_yaml(doc: dict, dcnn: dict) -> str:
    """The job-config fragment: every CRF field (exact reproduction whatever the variant) and the DCNN settings
    the logits were computed with when they differ from the defaults."""
    best, default = doc["best"], doc["default"]
    lines = [
        f"# deeplab tune-crf: best of {len(doc['trials'])} trials on {doc['images']['scored']} images of",
        f"# {doc['input']} (model {doc['model']['variant']}, sha256 {doc['model']['digest'][:12]}):",
        f"# mean IoU {best['mean_iou']:.6f} vs {default['mean_iou']:.6f} with the default CRF parameters.",
        "# Use: deeplab segment --config crf.yaml --input ... --output ... --model ...",
    ]
    body: dict[str, Any] = {"crf": dict(best["crf"])}
    if dcnn:
        body["dcnn"] = dcnn
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


def _write_outputs(doc: dict, cfg: Any, out_uri: str) -> dict[str, str]:
    written = {}

    def put(name: str, data: bytes) -> None:
        uri = storage.join(out_uri, name)
        storage.write_bytes(uri, data, cfg.storage)
        written[name] = uri

    rounds = [  # each round's grid (round 0's extra default trial is not on the heatmap)
        {
            "round": rd["round"],
            "keys": [trial_key(p) for p in grid_of({k: tuple(v) for k, v in rd["values"].items()})],
        }
        for rd in doc["rounds"]
    ]
    md, page, figures = render_reports(doc, rounds)
    put("tuning.json", json.dumps(doc, indent=1, allow_nan=False).encode())
    put("crf.yaml", crf_yaml(doc, _dcnn_fragment(cfg.dcnn)).encode())
    for name, png in figures.items():
        put(f"figures/{name}.png", png)
    put("report.md", md.encode())
    put("report.html", page.encode())
    return written


# ---------------------------------------------------------------------------------------------------------------
# Command line


def tune_main(argv: list[str] | None = None) -> int:
    """``deeplab tune-crf --input DATA --model M --output OUT [--images N] [--split S] [--labels L] [--search FILE]``."""
    p = argparse.ArgumentParser(
        prog="deeplab tune-crf",
        description="Cross-validate the dense CRF's parameters on Ray Tune (DCNN once, then CRF-only trials).",
    )
    p.add_argument("--input", help="VOC root, image prefix or shards prefix (local path or s3://)")
    p.add_argument("--input-format", help="input layout: auto (default), voc, images, shards, manifest")
    p.add_argument("--labels", help="prefix of label PNGs named <image_id>.png (for an image prefix input)")
    p.add_argument("--output", help="OUT: tuning.json, crf.yaml, report.* and the logits cache go under it")
    p.add_argument("--model", help="checkpoint (.pt) path or s3:// URI")
    p.add_argument("--variant", help="expected model variant (checked against the checkpoint)")
    p.add_argument("--split", help="VOC split list to read (ImageSets/Segmentation/<split>.txt)")
    p.add_argument(
        "--images", type=int, default=100, help="the first N labelled images in image_id order (100)"
    )
    p.add_argument("--search", help="search YAML: per CRF parameter a value, a list, start:step:stop or "
                   "{min, max, step}; refine_rounds (default: the paper's coarse grid + 1 refine round)")  # fmt: skip
    p.add_argument("--config", help="job YAML as for segment (read, dcnn, decode, storage, crf defaults)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    args = p.parse_args(argv)

    from pipeline.config import load_job_config_from_args

    cfg, crf_raw = load_job_config_from_args(args)
    if args.images < 1:
        raise _config_error(f"--images must be >= 1, got {args.images}")
    result = tune_crf(cfg, crf_raw, num_images=args.images, search_path=args.search, address=args.address)
    doc = result.document
    tm = doc["timing"]
    print(
        f"trials {len(doc['trials'])} ({tm['trials_run']} run now, {tm['trials_done_before']} done before)  "
        f"search {tm['search_wall_s']:.1f} s  {tm['trials_per_s'] or 0:.3f} trials/s"
    )
    print(
        f"mean IoU  default {100 * (doc['default']['mean_iou'] or 0):.2f}  tuned {100 * doc['best']['mean_iou']:.2f}"
    )
    print(f"crf config: {result.outputs['crf.yaml']}")
    from pipeline.console.summary import print_logs_line

    print_logs_line()
    return 0
