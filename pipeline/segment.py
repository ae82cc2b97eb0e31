"""The segment job's driver: fail fast on bad config/storage/model, resume, run the flow, verify, record, evaluate.

``deeplab segment`` and ``jobs/segment.py`` (the ``ray job submit`` entrypoint) both call ``run_segment``.
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import logging
import platform
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pipeline import schema as S
from pipeline.cluster.ray_init import init_ray
from pipeline.config import JobConfig, resolve_crf
from pipeline.output.identity import check_identity, identity_of
from pipeline.output.lease import Lease, LeaseHeld
from pipeline.stages.encode import EncodeConfig
from pipeline.stages.labels import plan_label_warning
from pipeline.stages.write import MASKS_DIR, write_manifest
from pipeline.storage import StorageError, StorageOutage, check_access, list_files, read_bytes, redact

__all__ = ["JobError", "StorageDown", "run_segment", "dry_run_segment"]

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job could not start or finish; the message is the one-line cause."""


class StorageDown(JobError):
    """Storage failed past the outage guard (or a part could not be committed): a re-run when it is back resumes."""


def _storage_cause(exc: BaseException) -> tuple[bool, str] | None:
    """(transient, one-line cause) when a step failed because storage did (read.OutageGuard, a PUT out of retries,
    a committed part that could not be read), else None. Ray's wrapper of a task's exception keeps the cause's
    text (its first line is Ray's own) and sometimes its class, so the text is read first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        for name, transient in (("StorageOutage: ", True), ("StorageError: ", False)):
            if name in text:
                return transient, text.split(name, 1)[1].splitlines()[0]
        if isinstance(exc, StorageError) and not isinstance(exc, LeaseHeld):
            return isinstance(exc, StorageOutage), text.splitlines()[0]
        inner = getattr(exc, "cause", None)  # a RayTaskError's original exception
        exc = inner if isinstance(inner, BaseException) else exc.__cause__ or exc.__context__
    return None


def _storage_step(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a driver step whose tasks touch storage; a storage failure becomes StorageDown (exit 75) when it may
    pass, else a JobError, each one line."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        found = _storage_cause(e)
        if found is None:
            raise
        transient, cause = found
        raise (StorageDown if transient else JobError)(redact(cause)) from e


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("deeplab-pipeline", "ray", "torch", "pydensecrf2", "pyarrow", "numpy", "pillow", "boto3"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def load_model_meta(cfg: JobConfig) -> tuple[dict, str]:
    """Read and validate the checkpoint on the driver (fail fast) and return its metadata and sha256 digest."""
    # torch is imported here, not with this module: the CLI imports JobError first, and a bad config fails fast.
    from pipeline.model.weights import checkpoint_digest, load_checkpoint_bytes

    try:
        data = read_bytes(cfg.dcnn.model_uri, cfg.storage)
    except (FileNotFoundError, OSError) as e:
        raise JobError(f"cannot read the model {cfg.dcnn.model_uri}: {e}. Fix --model") from e
    try:
        _, meta = load_checkpoint_bytes(data, expected_variant=cfg.dcnn.expected_variant)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad model file/path
        raise JobError(f"the model {cfg.dcnn.model_uri} is not a usable checkpoint: {e}") from e
    return meta, checkpoint_digest(data)


def _prepare(cfg: JobConfig, crf_raw: dict[str, Any] | None) -> tuple[JobConfig, dict, str]:
    """Fail fast on storage and the model, complete the config from the checkpoint."""
    try:
        check_access(cfg.read.input_uri, cfg.storage, what="input")
        check_access(cfg.write.output_uri, cfg.storage, what="output")
    except StorageError as e:
        raise JobError(str(e)) from e
    meta, digest = load_model_meta(cfg)
    cfg = _resolve_input_format(cfg)
    cfg = resolve_crf(cfg, meta["variant"], crf_raw or {})
    if cfg.crf is not None and cfg.crf.device == "cuda" and cfg.dcnn.device == "cpu":
        raise JobError(
            "crf.device is 'cuda' but dcnn.device is 'cpu': the CRF runs beside the DCNN on its GPU"
        )
    cfg = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, num_classes=meta["num_classes"]))
    return cfg, meta, digest


# What listing the inputs raises when storage or the input is at fault (a listing task's cause, not Ray's).
_LISTING_ERRORS = (OSError, ValueError, KeyError, BotoCoreError, ClientError)


def _listing_error(cfg: JobConfig, e: BaseException) -> JobError:
    cause = getattr(e, "cause", None) or e
    return JobError(f"cannot list the inputs under {cfg.read.input_uri}: {cause}")


def _resolve_input_format(cfg: JobConfig) -> JobConfig:
    """read.input_format "auto" -> the format the input has, before Ray starts: a store that fails this check
    stops the job in a second, not after a cluster start."""
    if cfg.read.input_format != "auto":
        return cfg
    from pipeline.stages.plan import detect_format

    try:
        fmt = detect_format(cfg.read.input_uri, cfg.storage)
    except _LISTING_ERRORS as e:
        raise _listing_error(cfg, e) from e
    return dataclasses.replace(cfg, read=dataclasses.replace(cfg.read, input_format=fmt))


def _plan(cfg: JobConfig, index: Any, *, run_id: str, clear_old_plans: bool = False, write_files: bool):
    from pipeline.flow import plan_job

    try:
        return plan_job(
            cfg.read, cfg.write.output_uri, cfg.storage, index.done, index.retry, run_id=run_id,
            clear_old_plans=clear_old_plans, write_files=write_files,
        )  # fmt: skip
    except _LISTING_ERRORS as e:
        raise _listing_error(cfg, e) from e


def _identity(cfg: JobConfig, digest: str) -> dict:
    # Where the CRF runs is not what it computes: crf.device stays out of the output's identity.
    crf = (
        {k: v for k, v in dataclasses.asdict(cfg.crf).items() if k != "device"}
        if cfg.crf is not None
        else None
    )
    return identity_of(cfg.read.input_uri, cfg.read.labels_uri, cfg.read.split, digest, crf)


def run_segment(
    cfg: JobConfig,
    crf_raw: dict[str, Any] | None = None,
    *,
    address: str | None = None,
    break_lease: bool = False,
) -> dict:
    """Run the job on ``cfg.write.output_uri`` under its lease (one run per output, pipeline/output/lease.py)."""
    t0 = time.monotonic()
    cfg, meta, digest = _prepare(cfg, crf_raw)
    lease = Lease(
        cfg.write.output_uri, cfg.storage, ttl_s=cfg.write.lease_ttl_s, wait_s=cfg.write.lease_wait_s,
        break_stale=break_lease, on_lost=_thread.interrupt_main,
    )  # fmt: skip
    _storage_step(lease.__enter__)  # before Ray starts: a second run on the output refuses in a second
    try:
        init_ray(address)
        return _run_leased(cfg, meta, digest, lease, t0)
    except KeyboardInterrupt:
        if lease.lost:
            raise JobError(
                f"lost the lease on {cfg.write.output_uri}: {lease.lost}; stopped. Committed parts are kept: "
                "re-run the same command once no other run uses the output"
            ) from None
        raise
    finally:
        lease.__exit__(None, None, None)


# One function on purpose (~85 lines): the job's steps under the lease in the order they run, start to manifest.
def _run_leased(cfg: JobConfig, meta: dict, digest: str, lease: Lease, t0: float) -> dict:
    from pipeline.cluster.pools import plan_cluster_pools
    from pipeline.flow import (
        build_dataset,
        crf_on_gpu,
        duplicate_inputs,
        execute,
        index_output,
        verify_output,
    )

    refusal = _storage_step(
        check_identity, cfg.write.output_uri, cfg.storage, _identity(cfg, digest),
        allow_change=cfg.write.allow_identity_change,
    )  # fmt: skip
    if refusal:
        raise JobError(refusal)
    before = _storage_step(index_output, cfg.write.output_uri, cfg.storage, retry=cfg.write.retry_errors)
    job_plan = _plan(cfg, before, run_id=lease.run_id, clear_old_plans=lease.exclusive, write_files=True)
    rows_before = before.summary
    del before  # the indexes' object-store memory is not needed past planning
    if not job_plan.inputs:
        raise JobError(
            f"no input images found under {cfg.read.input_uri} (format {job_plan.fmt}): check --input"
        )
    num_dups, examples = _storage_step(duplicate_inputs, job_plan, cfg.storage)
    if num_dups:  # ids key resume and the final check: two inputs with one id would share a row
        shown = ", ".join(f"{r[S.ID]!r} <- {r[S.SOURCE]}" for r in examples)
        raise JobError(
            f"{num_dups} image ids name more than one input under {cfg.read.input_uri} ({shown}): give every "
            "image a unique image_id (a manifest's image_id column), or rename one of the files"
        )
    log.info(
        "%d inputs (%s, %d listing tasks), %d already done, %d to process (%d error rows retried, policy %s); "
        "model %s (%s), CRF %s",
        job_plan.inputs, job_plan.fmt, job_plan.units, job_plan.inputs - job_plan.todo, job_plan.todo,
        job_plan.retried, cfg.write.retry_errors, meta["variant"], digest[:12], "on" if cfg.crf else "off",
    )  # fmt: skip

    if job_plan.todo and job_plan.labelled:  # labels with classes the model lacks: say so before any work
        warning = _storage_step(
            plan_label_warning, job_plan.todo_uri, meta["num_classes"], cfg.storage,
            class_names=meta.get("class_names"),
        )  # fmt: skip
        if warning:
            log.warning(warning)
    plan = plan_cluster_pools(cfg.pools, crf_enabled=cfg.crf is not None and not crf_on_gpu(cfg))
    if crf_on_gpu(cfg) and plan.dcnn_num_gpus == 0:
        raise JobError(
            "crf.device is 'cuda' but the DCNN actors are planned without GPUs (the cluster has and may grow to "
            "none): set crf.device: cpu, or add GPU nodes"
        )
    encode_cfg = EncodeConfig(
        num_classes=meta["num_classes"], model_variant=meta["variant"], model_digest=digest,
        max_retries=cfg.write.max_retries,
    )  # fmt: skip
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
        ds = build_dataset(job_plan.todo_uri, cfg, encode_cfg, plan, job_plan.todo)
        run = _storage_step(execute, ds, job_plan.todo)

    check = _storage_step(verify_output, job_plan, cfg.write.output_uri, cfg.storage)
    after = check["output"]
    if after.duplicates or check["missing"]:
        raise JobError(
            f"output check failed: {check['missing']} inputs without a row (e.g. {check['missing_examples']}), "
            f"{after.duplicates} ids in more than one row; re-run the same command to complete it"
        )
    manifest = _manifest(cfg, meta, digest, job_plan, run, check, plan, rows_before, t0)
    manifest["lease"] = {"run_id": lease.run_id, "exclusive": lease.exclusive}
    # The masks and the manifest first: a failing report never fails a finished job.
    write_manifest(cfg.write.output_uri, manifest, cfg.storage)
    if cfg.evaluate and job_plan.labelled:
        manifest["metrics"] = _evaluate(cfg, meta, run)
        write_manifest(cfg.write.output_uri, manifest, cfg.storage)
    return manifest


def _evaluate(cfg: JobConfig, meta: dict, run: dict) -> dict:
    """Dataset metrics and the report; a failure is reported in the manifest, not raised."""
    from pipeline.metrics.evaluate import evaluate_output

    report = f"{cfg.write.output_uri.rstrip('/')}/report/"
    try:
        metrics = evaluate_output(
            cfg.write.output_uri, storage_cfg=cfg.storage, class_names=meta.get("class_names"), use_ray=True,
            run_summary=run,  # the report's images/s: the manifest with the run's wall time is not final yet
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - the masks are committed; `deeplab evaluate` can redo this
        line = redact((str(e).strip().splitlines() or [type(e).__name__])[0][:300])
        log.error("the metrics and report failed (%s: %s); the masks are complete", type(e).__name__, line)
        return {
            "error": f"{type(e).__name__}: {line}",
            "next": f"deeplab evaluate --masks {cfg.write.output_uri}",
        }
    return {
        "mean_iou_raw": metrics["raw"]["mean_iou"],
        "mean_iou_crf": metrics["crf"]["mean_iou"] if metrics.get("crf") else None,
        "report": report,
    }


def _manifest(cfg, meta, digest, job_plan, run, check, plan, before, t0) -> dict:  # noqa: ANN001
    after = check["output"]
    return {
        "config": cfg.to_dict(),
        "input_format": job_plan.fmt,
        "model": {"variant": meta["variant"], "num_classes": meta["num_classes"], "digest": digest},
        "class_names": meta.get("class_names"),
        "counts": {
            "inputs": job_plan.inputs,
            "rows": check["inputs"] - check["missing"],
            "done_before": job_plan.inputs - job_plan.todo,
            "processed_this_run": run["processed"],
            "retried_this_run": job_plan.retried,
            "duplicates_removed": check["duplicates_removed"],
            "status": dict(after.status_counts),
            "errors": sum(v for k, v in after.status_counts.items() if k != S.OK),
            # Error rows caused by the environment (storage, credentials): a re-run retries them.
            "retryable": after.retryable,
        },
        "run": {
            **run,
            "pools": dataclasses.asdict(plan),
            "listing_tasks": job_plan.units,
            "rows_before": before.rows,
            "total_wall_s": time.monotonic() - t0,
        },
        "outputs": {"masks": f"{cfg.write.output_uri.rstrip('/')}/{MASKS_DIR}/"},
        "next": (
            f"re-run the same command: it processes the {after.retryable} retryable rows again"
            if after.retryable
            else None
        ),
        "versions": _versions(),
    }


def dry_run_segment(
    cfg: JobConfig, crf_raw: dict[str, Any] | None = None, *, address: str | None = None
) -> dict:
    """``deeplab segment --dry-run``: what a run would do (inputs found, done, to do, pools), running nothing.

    The same checks and listing as ``run_segment`` (on Ray: listing tasks, the done index), but plan files are not
    written, the last run's plan, unreadable parts and rows a killed run left aside to supersede are left where they
    are, and no stage starts. Duplicate manifest ids are checked by a real run only (that check reads the plan's
    files); "done" counts committed rows as they are (a run first applies the rows left aside).
    """
    import ray

    from pipeline.cluster.pools import cluster_maxima, plan_pools
    from pipeline.flow import crf_on_gpu, index_files
    from pipeline.storage import join

    cfg, meta, digest = _prepare(cfg, crf_raw)
    init_ray(address)
    refusal = _storage_step(
        check_identity, cfg.write.output_uri, cfg.storage, _identity(cfg, digest),
        allow_change=cfg.write.allow_identity_change, record=False,
    )  # fmt: skip
    if refusal:
        raise JobError(refusal)
    parts = list_files(join(cfg.write.output_uri, MASKS_DIR), cfg.storage, (".parquet",))
    # Not index_output: it applies rows a killed run left aside and deletes torn parts (a run does both).
    index = _storage_step(index_files, parts, cfg.storage, retry=cfg.write.retry_errors)
    before = index.summary
    job_plan = _plan(cfg, index, run_id="dry-run", write_files=False)
    resources = ray.cluster_resources()
    # What a run would plan, without its request for missing resources and its wait for them.
    crf_pool = cfg.crf is not None and not crf_on_gpu(cfg)
    plan = plan_pools(resources, cfg.pools, crf_enabled=crf_pool, maxima=cluster_maxima())
    return {
        "input": cfg.read.input_uri,
        "output": cfg.write.output_uri,
        "input_format": job_plan.fmt,
        "inputs": job_plan.inputs,
        "labelled": job_plan.labelled,
        "listing_tasks": job_plan.units,
        "done": job_plan.inputs - job_plan.todo,
        "todo": job_plan.todo,
        "retried": job_plan.retried,
        "rows_before": before.rows,
        "unreadable_parts": len(before.unreadable),
        "model": {"variant": meta["variant"], "num_classes": meta["num_classes"], "digest": digest},
        "crf": cfg.crf is not None,
        "pools": dataclasses.asdict(plan),
        "cluster": {"CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)},
    }
