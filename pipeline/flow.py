"""The whole pipeline in one screen: plan -> read -> decode -> DCNN actors -> CRF actors -> encode -> write (-> check).

This is the only module that knows Ray resources (GPUs, CPU slots, actor pools, batch sizes). Every stage below is
a plain function or callable class that maps a batch dict of named columns to another; rows that failed carry
``status``/``error`` and pass through, so one bad image never fails a block.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from pipeline import schema as S
from pipeline.cluster.pools import PoolPlan
from pipeline.console.progress import Progress
from pipeline.stages.crf import CRFRefiner
from pipeline.stages.decode import decode_batch
from pipeline.stages.encode import EncodeConfig, encode_batch, to_table
from pipeline.stages.plan import (
    LIST_TASKS_IN_FLIGHT,
    PLAN_DIR,
    UNITS_PER_TASK,
    UnitResult,
    detect_format,
    plan_source,
    plan_unit,
    read_plan,
    read_split,
    root_units,
)
from pipeline.stages.read import fetch_batch
from pipeline.stages.write import (
    MASKS_DIR,
    PartsSummary,
    apply_supersedes,
    choose_keepers,
    commit_rows,
    drop_duplicates,
    find_missing,
    index_parts,
    merge_index,
    merge_retry,
    pending_supersedes,
    rows_of,
)
from pipeline.storage import (
    StorageConfig,
    StorageOutage,
    delete,
    delete_tree,
    is_transient,
    join,
    list_files,
)

if TYPE_CHECKING:  # config and dcnn import torch; encode tasks import this module and need neither
    from pipeline.config import JobConfig, ReadConfig

__all__ = [
    "JobPlan",
    "index_output",
    "plan_job",
    "bound_run_ahead",
    "apply_pending",
    "build_dataset",
    "execute",
    "verify_output",
]

log = logging.getLogger(__name__)

_PLAN_READERS = 4  # plan reading tasks at once (~10 ms per file: 100k work items/s)
_PLAN_FILES_PER_ITEM = 64  # todo files per plan reading task: 16k work items, ~0.6 s
_FILES_PER_TASK = 64  # parts (or plan files) indexed per task: ~64k ids at 1000 rows per part


def encode_rows(batch: dict, encode_cfg: EncodeConfig) -> pa.Table:
    """PNG masks + confusion counts (small rows wait for their part), and which committed part each row replaces."""
    table = to_table(encode_batch(batch, encode_cfg))
    supersedes = batch.get(S.SUPERSEDES, np.full(table.num_rows, "", dtype=object))
    return table.append_column(S.SUPERSEDES, pa.array([str(v) for v in supersedes], pa.string()))


def write_rows(table: pa.Table, output_uri: str, storage_cfg: StorageConfig) -> pa.Table:
    """One summary row per committed part. A commit that storage refuses past its retries stops the job."""
    try:
        return commit_rows(table, output_uri, storage_cfg)
    except Exception as e:
        if not is_transient(e):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise StorageOutage(
            f"storage outage: cannot commit a part under {output_uri} ({reason}); re-run the same command when "
            "storage is back: committed parts are kept"
        ) from e


_RUN_AHEAD_ENV = "RAY_DATA_DOWNSTREAM_CAPACITY_OBJECT_STORE_BUDGET_UTIL_THRESHOLD"


def bound_run_ahead() -> None:
    """Stop a fast stage from filling the object store ahead of a slow one (the DCNN ahead of the CRF).

    Ray Data's downstream-capacity backpressure holds a stage back once its queued output exceeds
    ``DataContext.downstream_capacity_backpressure_ratio`` (2) x what its consumer has in flight, but only after
    the stage has used half its object-store budget (a share of half the store: GiBs on a real node). Until then
    the DCNN (~5x the CRF's speed on this CPU, far more on a GPU) parks ~1 MB rows in the store: 484 MiB at 640
    images in bench/scale.py, growing with the dataset. Threshold 0 applies the cap from the first block: 148 MiB
    at 640 images, 153 at 1280 (with the CRF actors dropping the image), throughput within this machine's noise.
    Ray reads the threshold from an environment variable once, into a class attribute, so it is set there; if a Ray
    upgrade moves it, the job logs it and runs with Ray's default (tests/test_flow.py catches that).
    An explicit ``RAY_DATA_DOWNSTREAM_CAPACITY_OBJECT_STORE_BUDGET_UTIL_THRESHOLD`` in the environment wins (0.5 is
    Ray's default). The setting is process-wide: every Ray Data pipeline this driver runs afterwards has the brake.
    """
    if _RUN_AHEAD_ENV in os.environ:
        return
    try:
        from ray.data._internal.execution.backpressure_policy import DownstreamCapacityBackpressurePolicy
    except ImportError:
        DownstreamCapacityBackpressurePolicy = None
    if not hasattr(DownstreamCapacityBackpressurePolicy, "OBJECT_STORE_BUDGET_UTIL_THRESHOLD"):
        log.warning("this Ray lacks the downstream-capacity backpressure threshold: the DCNN may run ahead")
        return
    DownstreamCapacityBackpressurePolicy.OBJECT_STORE_BUDGET_UTIL_THRESHOLD = 0.0


def crf_on_gpu(cfg: JobConfig) -> bool:
    """crf.device cuda: the CRF runs in the DCNN actors on their GPUs, and no CRF actor pool starts."""
    return cfg.crf is not None and cfg.crf.device == "cuda"


def block_rows(num_todo: int, plan: PoolPlan, max_rows: int) -> int:
    """Rows per block: up to ``max_rows`` (per-block costs amortised), fewer in a job of under 16 blocks per actor.

    The first CRF block waits for a whole DCNN block and the last blocks run while other actors idle, so a small
    job's blocks are small: 200 photos on 2 cores, 25 -> 7 rows: 50.8 -> 48.6 s (docs/performance.md).
    """
    workers = max(plan.dcnn_size[1], plan.crf_size[1], 1)
    return max(1, min(max_rows, math.ceil(num_todo / (16 * workers))))


def _fmt_pool(pool: dict[str, int]) -> str:
    size = (
        pool["min_size"] if pool["min_size"] == pool["max_size"] else f"{pool['min_size']}-{pool['max_size']}"
    )
    return f"{size} ({pool.get('max_tasks_in_flight_per_actor', 'default')} blocks in flight each)"


# One function on purpose (~90 lines): the stages in flow order, each with its resources, read as the pipeline.
def build_dataset(
    todo_uri: str, cfg: JobConfig, encode_cfg: EncodeConfig, plan: PoolPlan, num_todo: int
) -> ray.data.Dataset:
    from pipeline.stages.dcnn import (
        DeepLabPredictor,  # not at the top: encode tasks import this module, not torch
    )

    ctx = DataContext.get_current()
    # No wait for the pools' actors at the start: ray_pools fixes pools at their maximum, which may be nodes that
    # have not joined yet (plan_cluster_pools waited for the minimum). A pool that never gets an actor placed
    # trips the no-progress timeout; an actor whose constructor fails still fails the job at once.
    ctx.wait_for_min_actors_s = -1
    ctx.execution_no_progress_timeout_s = 900
    bound_run_ahead()
    # The plan's work items, listed in Ray tasks (plan.py): todo/ files of read.items_per_block items each, read
    # _PLAN_FILES_PER_ITEM at a time by a task without a CPU slot (it only reads small files; a reader that held a
    # slot while the stages downstream were busy starved the encode + write tasks of theirs), then cut into blocks
    # of that many rows. Ray Data keeps metadata on the driver for every input block (from_items of one item per
    # file: 36 s and +250 MiB at the 40k files of 10M images; range() of as many blocks 45 s), so the driver makes
    # one item per _PLAN_FILES_PER_ITEM files: 625 items at 10M. Not read_parquet: its listing and footer actor cost
    # 5-15 s before the first row here, and the files are known.
    files = list_files(todo_uri, cfg.storage, (".parquet",))
    groups = [
        "\n".join(files[i : i + _PLAN_FILES_PER_ITEM]) for i in range(0, len(files), _PLAN_FILES_PER_ITEM)
    ]
    ds = ray.data.from_items([{"plan_files": g} for g in groups], override_num_blocks=len(groups))
    ds = ds.map_batches(  # at most _PLAN_READERS at once: a task without a CPU slot has no other cap
        read_plan,
        fn_kwargs={"storage_cfg": cfg.storage},
        batch_size=1,
        batch_format="numpy",
        num_cpus=0,
        compute=TaskPoolStrategy(size=max(1, min(_PLAN_READERS, len(groups)))),
    )
    # Blocks of items_per_block rows (fewer in a small job, so that every actor gets some).
    rows = block_rows(num_todo, plan, cfg.read.items_per_block)
    num_blocks = math.ceil(num_todo / rows)
    dcnn_pool, crf_pool = plan.ray_pools(num_blocks)
    crf_in_dcnn = crf_on_gpu(cfg)
    crf_text = "in the DCNN actors" if crf_in_dcnn else _fmt_pool(crf_pool) if cfg.crf else "off"
    log.info(
        "%d blocks of %d rows; DCNN actors %s, CRF actors %s",
        num_blocks,
        rows,
        _fmt_pool(dcnn_pool),
        crf_text,
    )
    ds = ds.repartition(target_num_rows_per_block=rows)
    ds = ds.map_batches(  # bytes per row
        fetch_batch, fn_kwargs={"storage_cfg": cfg.storage, "max_bytes": cfg.read.max_bytes}, batch_size=None
    )
    ds = ds.map_batches(decode_batch, fn_kwargs={"cfg": cfg.decode}, batch_size=None)  # RGB uint8 + label
    ds = ds.map_batches(  # logits: float16 (C, h, w) at stride 8, raw_mask: uint8 (H, W)
        DeepLabPredictor,
        fn_constructor_kwargs={  # crf.device cuda: the CRF too, on the actor's GPU (mask, crf_s, crf_node)
            "cfg": cfg.dcnn,
            "storage_cfg": cfg.storage,
            "crf_cfg": cfg.crf if crf_in_dcnn else None,
        },  # fmt: skip
        batch_size=cfg.dcnn.batch_size,
        compute=ActorPoolStrategy(**dcnn_pool),
        num_gpus=plan.dcnn_num_gpus,
        num_cpus=plan.dcnn_num_cpus,
    )
    if cfg.crf is None:
        ds = ds.drop_columns([S.IMAGE])  # the largest column; no later stage needs it (CRF actors drop it)
    elif not crf_in_dcnn:
        ds = ds.map_batches(  # mask: uint8 (H, W); a block per call, one dense CRF at a time per actor process
            CRFRefiner,
            fn_constructor_kwargs={"cfg": cfg.crf},
            batch_size=None,
            # One block at a time per actor: a block is seconds of CRF work, and a second one queued behind it
            # would wait there while another actor idles at the end of the job. Unless the pool is elastic: Ray
            # Data adds actors only to a pool with more tasks in flight per actor (pools.PoolPlan.ray_pools).
            compute=ActorPoolStrategy(**crf_pool),
            num_cpus=1,
            resources=plan.crf_resources or None,
        )
    ds = ds.map_batches(
        encode_rows, fn_kwargs={"encode_cfg": encode_cfg}, batch_size=None
    )  # PNG masks, counts
    # One committed part per write.rows_per_file rows: Ray Data bundles blocks up to that many rows and cuts the
    # bundle into batches of exactly that many, so blocks of a divisor of it (250 of 1000) make full parts. (A
    # strict repartition makes exact parts whatever the blocks, but it stalled behind bound_run_ahead's brake.)
    return ds.map_batches(
        write_rows,
        fn_kwargs={"output_uri": cfg.write.output_uri, "storage_cfg": cfg.storage},
        batch_size=cfg.write.rows_per_file,
        batch_format="pyarrow",
    )


# --- planning and the final check: plain 1-CPU Ray tasks; the driver holds O(units) and O(parts), never O(images)


# Task bodies are the stage modules' own functions: a worker imports pipeline.stages.plan / pipeline.stages.write, not this module.
_index_task = ray.remote(index_parts)
_merge_task = ray.remote(merge_index)
_merge_retry_task = ray.remote(merge_retry)
_supersede_task = ray.remote(apply_supersedes)
_plan_task = ray.remote(plan_unit)
_missing_task = ray.remote(find_missing)
_rows_of_task = ray.remote(rows_of)
_keepers_task = ray.remote(choose_keepers)
_drop_task = ray.remote(drop_duplicates)


@dataclass(frozen=True)
class OutputIndex:
    """What some parts (or plan files) hold, built and held in Ray, not here: ObjectRefs of an IdIndex of their
    ids, of the RetryIndex of rows to retry and of an IdIndex of the ids with more than one row; and counts."""

    done: ray.ObjectRef
    retry: ray.ObjectRef
    duplicated: ray.ObjectRef
    summary: PartsSummary


def index_files(
    files: list[str], storage_cfg: StorageConfig, *, with_status: bool = True, retry: str = "retryable"
) -> OutputIndex:
    """Index the files in tasks of _FILES_PER_TASK; a file that cannot be read fails it (write.index_parts)."""
    groups = [files[i : i + _FILES_PER_TASK] for i in range(0, len(files), _FILES_PER_TASK)]
    refs = [
        _index_task.options(num_returns=4).remote(g, storage_cfg, with_status=with_status, retry=retry)
        for g in groups
    ]
    index_ref, count_ref, duplicated_ref = _merge_task.options(num_returns=3).remote(
        *[h for r in refs for h in r[:2]]
    )
    retry_ref = _merge_retry_task.remote(*[r[3] for r in refs])
    summary = PartsSummary()
    for part in ray.get([r[2] for r in refs]):
        summary.add(part)
    summary.duplicates = ray.get(count_ref)
    return OutputIndex(index_ref, retry_ref, duplicated_ref, summary)


def apply_pending(output_uri: str, storage_cfg: StorageConfig) -> int:
    """Rewrite the parts that rows written aside supersede (write.apply_supersedes), in tasks; return rows replaced."""
    groups = list(pending_supersedes(output_uri, storage_cfg).items())
    chunks = [dict(groups[i : i + _FILES_PER_TASK]) for i in range(0, len(groups), _FILES_PER_TASK)]
    return sum(ray.get([_supersede_task.remote(c, output_uri, storage_cfg) for c in chunks]))


def index_output(output_uri: str, storage_cfg: StorageConfig, *, retry: str = "retryable") -> OutputIndex:
    """Index the committed parts (after applying rows a killed run left aside). Torn parts (read whole, not
    Parquet: a killed run's local file) are removed: not done. A part that cannot be read fails the step."""
    replaced = apply_pending(output_uri, storage_cfg)
    if replaced:
        log.info("applied %d rows a previous run left aside to supersede committed ones", replaced)
    parts = list_files(join(output_uri, MASKS_DIR), storage_cfg, (".parquet",))
    index = index_files(parts, storage_cfg, retry=retry)
    for uri in index.summary.unreadable:
        log.warning("removing torn part %s", uri)
        delete(uri, storage_cfg)
    return index


def repair_duplicates(output_uri: str, storage_cfg: StorageConfig, duplicated_ref) -> int:
    """Keep one row per image id where parts hold several (write.choose_keepers: an ok row first, then the part
    whose name sorts first), in tasks; return the rows removed. Deterministic: any run repairs alike."""
    parts = list_files(join(output_uri, MASKS_DIR), storage_cfg, (".parquet",))
    groups = [parts[i : i + _FILES_PER_TASK] for i in range(0, len(parts), _FILES_PER_TASK)]
    found = [_rows_of_task.remote(g, duplicated_ref, storage_cfg) for g in groups]
    keepers_ref = _keepers_task.remote(*found)
    return sum(ray.get([_drop_task.remote(g, keepers_ref, storage_cfg) for g in groups]))


@dataclass(frozen=True)
class JobPlan:
    fmt: str
    uri: str  # OUTPUT/_plan: todo/ (work items to process) and inputs/ (every input id)
    inputs: int
    todo: int
    labelled: int
    units: int
    retried: int = 0  # of todo: images whose committed error row this run retries

    @property
    def todo_uri(self) -> str:
        return join(self.uri, "todo")

    @property
    def inputs_uri(self) -> str:
        return join(self.uri, "inputs")


def plan_job(
    read_cfg: ReadConfig,
    output_uri: str,
    storage_cfg: StorageConfig,
    done_ref,
    retry_ref=None,
    *,
    run_id: str = "dry-run",
    clear_old_plans: bool = True,
    write_files: bool = True,
) -> JobPlan:
    """List every input in Ray tasks (breadth first over units) into OUTPUT/_plan/<run_id>/, minus what
    ``done_ref`` holds (plus the rows ``retry_ref`` names, to be superseded).

    Each task lists up to UNITS_PER_TASK units (folders, shards) and at most LIST_TASKS_IN_FLIGHT run at once: the
    driver holds the units still to list and the tasks' refs, never a row per image. ``clear_old_plans``: remove
    earlier runs' plan folders first (only while holding an exclusive lease: another run's plan may be in use
    otherwise). ``write_files=False``: counts only, OUTPUT untouched (``--dry-run``)."""
    fmt = read_cfg.input_format
    if fmt == "auto":
        fmt = detect_format(read_cfg.input_uri, storage_cfg)
    source = plan_source(read_cfg.input_uri, fmt, read_cfg.labels_uri, storage_cfg, read_cfg.allowed_prefixes)
    split_ids = None
    if read_cfg.split and fmt == "voc":
        split_ids = frozenset(read_split(read_cfg.input_uri, read_cfg.split, storage_cfg))
    split_ref = ray.put(split_ids)
    plan_uri = join(output_uri, PLAN_DIR, run_id)
    if write_files and clear_old_plans:
        delete_tree(join(output_uri, PLAN_DIR), storage_cfg)

    def submit(units: list[tuple[str, str]]):
        return _plan_task.remote(
            source,
            units,
            done_ref,
            plan_uri,
            storage_cfg,
            split_ref,
            retry_ref,
            todo_rows_per_file=read_cfg.items_per_block,
            write_files=write_files,
        )

    queue = deque(root_units(source, storage_cfg))
    pending: list = []
    total, tasks = UnitResult(), 0
    while queue or pending:
        while queue and len(pending) < LIST_TASKS_IN_FLIGHT:
            # Manifests stream millions of rows each: one per task. Folders and shards: many per task.
            take = 1 if queue[0][0] == "manifest" else min(UNITS_PER_TASK, len(queue))
            pending.append(submit([queue.popleft() for _ in range(take)]))
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
        if not ready:
            ready, pending = ray.wait(pending, num_returns=1)
        for result in ray.get(ready):
            tasks += 1
            total.inputs += result.inputs
            total.todo += result.todo
            total.retried += result.retried
            total.labelled += result.labelled
            total.split_matched += result.split_matched
            queue.extend(result.subunits)
    if split_ids is not None and total.split_matched < len(split_ids):
        log.warning("%d ids of split %r have no image", len(split_ids) - total.split_matched, read_cfg.split)
    return JobPlan(fmt, plan_uri, total.inputs, total.todo, total.labelled, tasks, total.retried)


def verify_output(job_plan: JobPlan, output_uri: str, storage_cfg: StorageConfig) -> dict:
    """The final check, in Ray tasks: every input id has a row, and no id is in two parts.

    Ids with several rows (two runs at once on a store that ignores conditional writes, or an older version) are
    repaired here, deterministically, instead of failing every re-run."""
    index = index_output(output_uri, storage_cfg)
    repaired = 0
    if index.summary.duplicates:
        log.warning("%d image ids have more than one row: keeping one each", index.summary.duplicates)
        repaired = repair_duplicates(output_uri, storage_cfg, index.duplicated)
        index = index_output(output_uri, storage_cfg)
    files = list_files(job_plan.inputs_uri, storage_cfg, (".parquet",))
    groups = [files[i : i + _FILES_PER_TASK] for i in range(0, len(files), _FILES_PER_TASK)]
    inputs, missing, examples = 0, 0, []
    for n, m, ex in ray.get([_missing_task.remote(g, index.done, storage_cfg) for g in groups]):
        inputs, missing, examples = inputs + n, missing + m, (examples + ex)[:5]
    return {
        "inputs": inputs,
        "missing": missing,
        "missing_examples": examples,
        "output": index.summary,
        "duplicates_removed": repaired,
    }


def duplicate_inputs(job_plan: JobPlan, storage_cfg: StorageConfig, limit: int = 6) -> tuple[int, list[dict]]:
    """(image ids given to more than one input, up to ``limit`` of their rows as {image_id, source})."""
    files = list_files(job_plan.inputs_uri, storage_cfg, (".parquet",))
    index = index_files(files, storage_cfg, with_status=False)
    if not index.summary.duplicates:
        return 0, []
    groups = [files[i : i + _FILES_PER_TASK] for i in range(0, len(files), _FILES_PER_TASK)]
    rows: list[dict] = []
    for table in ray.get(
        [_rows_of_task.remote(g, index.duplicated, storage_cfg, (S.ID, S.SOURCE)) for g in groups]
    ):
        rows.extend(table.select([S.ID, S.SOURCE]).to_pylist())
    rows.sort(key=lambda r: (r[S.ID], r[S.SOURCE]))
    return index.summary.duplicates, rows[:limit]


def run_single_process(
    items: list[dict], cfg: JobConfig, encode_cfg: EncodeConfig, *, batch_size: int = 8
) -> dict:
    """The same stages in one process, no Ray: the reference the tests and benchmarks compare the cluster run with."""
    from pipeline.stages.dcnn import DeepLabPredictor

    predictor = DeepLabPredictor(cfg.dcnn, cfg.storage, crf_cfg=cfg.crf if crf_on_gpu(cfg) else None)
    refiner = CRFRefiner(cfg.crf) if cfg.crf is not None and not crf_on_gpu(cfg) else None
    statuses: Counter = Counter()
    t0 = time.monotonic()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = {k: np.array([it[k] for it in chunk], dtype=object) for k in chunk[0]}
        batch = decode_batch(fetch_batch(batch, cfg.storage), cfg.decode)
        batch = predictor(batch)
        if refiner is not None:
            batch = _concat([refiner(_take(batch, i)) for i in range(len(chunk))])
        table = encode_rows(batch, encode_cfg)
        commit_rows(table, cfg.write.output_uri, cfg.storage)
        statuses.update(table.column(S.STATUS).to_pylist())
    wall = time.monotonic() - t0
    return {
        "processed": len(items),
        "status_counts": dict(statuses),
        "wall_s": wall,
        "images_per_s": len(items) / wall,
    }


def _take(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


def _concat(batches: list[dict]) -> dict:
    out = {}
    for k in batches[0]:
        parts = [b[k] for b in batches]
        if all(p.dtype != object for p in parts) and len({p.shape[1:] for p in parts}) == 1:
            out[k] = np.concatenate(parts)
        else:
            out[k] = S.object_column(x for p in parts for x in p)
    return out


def execute(
    ds: ray.data.Dataset, total: int, *, log_every_s: float = 10.0, progress: Progress | None = None
) -> dict:
    """Stream the dataset to completion; return counts, timings and the nodes each stage ran on.

    The driver sees one summary row per committed part (write.part_summary), never a row per image. Each part
    feeds ``progress`` (default: a bar in a terminal, else a line every ``log_every_s``; pipeline/console/progress.py).
    """
    counts: Counter = Counter()
    nodes: dict[str, set] = {c: set() for c in S.NODE_COLUMNS}
    stage_s: Counter = Counter()
    done, parts, retryable, t0 = 0, 0, 0, time.monotonic()
    progress = progress or Progress(total, every_s=log_every_s)
    with progress:
        for part in ds.iter_rows():
            parts += 1
            done += int(part["rows"])
            retryable += int(part["retryable"])
            part_counts = json.loads(part["status_counts"])
            counts.update(part_counts)
            for c in S.NODE_COLUMNS:
                nodes[c].update(n for n in str(part[c]).split(",") if n)
            for c in S.TIMING_COLUMNS:
                stage_s[c] += float(part[c])
            progress.update(int(part["rows"]), part_counts)
    wall = time.monotonic() - t0
    return {
        "processed": done,
        "parts_written": parts,
        "status_counts": dict(counts),
        "retryable": retryable,
        "wall_s": wall,
        "images_per_s": done / wall if wall > 0 else 0.0,
        "stage_s": dict(stage_s),
        "nodes": {k: sorted(v) for k, v in nodes.items()},
    }
