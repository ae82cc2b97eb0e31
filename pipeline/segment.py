"""The segment job's driver: fail fast on bad config/storage/model, resume, run the flow, verify, record, evaluate.

``deeplab segment`` and ``jobs/segment.py`` (the ``ray job submit`` entrypoint) both call ``run_segment``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import time
from importlib import metadata
from typing import Any

from pipeline import schema as S
from pipeline.config import JobConfig, resolve_crf
from pipeline.encode import EncodeConfig
from pipeline.storage import StorageError, check_access, list_files, read_bytes
from pipeline.weights import checkpoint_digest, load_checkpoint_bytes
from pipeline.write import MASKS_DIR, write_manifest

__all__ = ["JobError", "run_segment"]

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job could not start or finish; the message is the one-line cause."""


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("deeplab-pipeline", "ray", "torch", "pydensecrf2", "pyarrow", "numpy", "pillow", "boto3"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def load_model_meta(cfg: JobConfig) -> tuple[dict, str]:
    """Read and validate the checkpoint on the driver (fail fast) and return its metadata and sha256 digest."""
    try:
        data = read_bytes(cfg.dcnn.model_uri, cfg.storage)
    except (FileNotFoundError, OSError) as e:
        raise JobError(f"cannot read the model {cfg.dcnn.model_uri}: {e}. Fix --model") from e
    try:
        _, meta = load_checkpoint_bytes(data, expected_variant=cfg.dcnn.expected_variant)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad model file/path
        raise JobError(f"the model {cfg.dcnn.model_uri} is not a usable checkpoint: {e}") from e
    return meta, checkpoint_digest(data)


def init_ray(address: str | None = None, *, local_cpus: int | None = None) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray with at least 5 logical CPU slots.

    Locally the slots are oversubscribed on purpose: a DCNN actor, two CRF actors, the plan reader and the encode +
    write tasks each need a slot, and on a 2-core machine 2 slots would deadlock the pools (ray-project/ray#44687)
    while the work itself fits (the reader and the writer are mostly idle).
    """
    import ray
    from ray.data import DataContext

    # Ray Data's per-operator progress output floods a non-interactive log; flow.execute logs progress instead.
    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        num_cpus = local_cpus or max(5, os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def run_segment(cfg: JobConfig, crf_raw: dict[str, Any] | None = None, *, address: str | None = None) -> dict:
    from pipeline.flow import (
        build_dataset,
        execute,
        index_files,
        index_output,
        plan_job,
        verify_output,
    )
    from pipeline.pools import plan_cluster_pools

    t0 = time.monotonic()
    try:
        check_access(cfg.read.input_uri, cfg.storage, what="input")
        check_access(cfg.write.output_uri, cfg.storage, what="output")
    except StorageError as e:
        raise JobError(str(e)) from e
    meta, digest = load_model_meta(cfg)
    cfg = resolve_crf(cfg, meta["variant"], crf_raw or {})
    cfg = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, num_classes=meta["num_classes"]))

    init_ray(address)
    done_ref, before = index_output(cfg.write.output_uri, cfg.storage)
    try:
        job_plan = plan_job(cfg.read, cfg.write.output_uri, cfg.storage, done_ref)
    except (OSError, ValueError, KeyError) as e:  # raised in a listing task: name its cause, not Ray's traceback
        cause = getattr(e, "cause", None) or e
        raise JobError(f"cannot list the inputs under {cfg.read.input_uri}: {cause}") from e
    del done_ref
    if not job_plan.inputs:
        raise JobError(
            f"no input images found under {cfg.read.input_uri} (format {job_plan.fmt}): check --input"
        )
    if job_plan.fmt in ("manifest", "shards"):  # ids come from the data: make sure they are unique
        _, inputs = index_files(
            list_files(job_plan.inputs_uri, cfg.storage, (".parquet",)), cfg.storage, with_status=False
        )
        if inputs.duplicates:
            raise JobError(
                f"{inputs.duplicates} image ids occur more than once in {cfg.read.input_uri}: "
                "give every image a unique image_id"
            )
    log.info(
        "%d inputs (%s, %d listing tasks), %d already done, %d to process; model %s (%s), CRF %s",
        job_plan.inputs, job_plan.fmt, job_plan.units, job_plan.inputs - job_plan.todo, job_plan.todo,
        meta["variant"], digest[:12], "on" if cfg.crf else "off",
    )  # fmt: skip

    plan = plan_cluster_pools(cfg.pools, crf_enabled=cfg.crf is not None)
    encode_cfg = EncodeConfig(
        num_classes=meta["num_classes"], model_variant=meta["variant"], model_digest=digest
    )
    run: dict = {
        "processed": 0,
        "parts_written": 0,
        "status_counts": {},
        "wall_s": 0.0,
        "images_per_s": 0.0,
        "stage_s": {},
        "nodes": {},
    }
    if job_plan.todo:
        run = execute(build_dataset(job_plan.todo_uri, cfg, encode_cfg, plan, job_plan.todo), job_plan.todo)

    check = verify_output(job_plan, cfg.write.output_uri, cfg.storage)
    after = check["output"]
    if after.duplicates or check["missing"]:
        raise JobError(
            f"output check failed: {check['missing']} inputs without a row (e.g. {check['missing_examples']}), "
            f"{after.duplicates} ids in more than one row; re-run the same command to complete it"
        )
    manifest = {
        "config": cfg.to_dict(),
        "input_format": job_plan.fmt,
        "model": {"variant": meta["variant"], "num_classes": meta["num_classes"], "digest": digest},
        "class_names": meta.get("class_names"),
        "counts": {
            "inputs": job_plan.inputs,
            "rows": check["inputs"] - check["missing"],
            "done_before": job_plan.inputs - job_plan.todo,
            "processed_this_run": run["processed"],
            "status": dict(after.status_counts),
            "errors": sum(v for k, v in after.status_counts.items() if k != S.OK),
        },
        "run": {
            **run,
            "pools": dataclasses.asdict(plan),
            "listing_tasks": job_plan.units,
            "rows_before": before.rows,
            "total_wall_s": time.monotonic() - t0,
        },
        "outputs": {"masks": f"{cfg.write.output_uri.rstrip('/')}/{MASKS_DIR}/"},
        "versions": _versions(),
    }
    if cfg.evaluate and job_plan.labelled:
        from pipeline.evaluate import evaluate_output

        metrics = evaluate_output(
            cfg.write.output_uri, storage_cfg=cfg.storage, class_names=meta.get("class_names"), use_ray=True
        )
        manifest["metrics"] = {
            "mean_iou_raw": metrics["raw"]["mean_iou"],
            "mean_iou_crf": metrics["crf"]["mean_iou"] if metrics.get("crf") else None,
            "report": f"{cfg.write.output_uri.rstrip('/')}/report/",
        }
    write_manifest(cfg.write.output_uri, manifest, cfg.storage)
    return manifest
