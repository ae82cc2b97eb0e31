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
import datetime
import hashlib
import io
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline import schema as S
from pipeline import storage
from pipeline.metrics.confusion import MetricsAccumulator, confusion_matrix, summarize
from pipeline.stages.crf import CRFConfig, CRFRefiner
from pipeline.tune.report import render_reports

__all__ = [
    "CRF_FIELDS",
    "REFINABLE",
    "DEFAULT_SEARCH",
    "SearchSpec",
    "parse_search",
    "load_search",
    "refine_values",
    "grid_of",
    "trial_key",
    "score_crf",
    "TuneResult",
    "tune_crf",
    "tune_main",
]

log = logging.getLogger(__name__)

CRF_FIELDS = tuple(f.name for f in dataclasses.fields(CRFConfig))
_FIELD_TYPES = {f: float for f in CRF_FIELDS} | {
    "iterations": int,
    "pad_labels_to_multiple": int,
    "normalization": str,
}
# Refine rounds narrow these around the best (the kernel weights and widths); other searched fields stay at the best.
REFINABLE = ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std")
# The paper's coarse grid (reference section 3); every other CRF field comes from the model variant's defaults.
DEFAULT_SEARCH: dict[str, Any] = {
    "bi_w": [5, 10],
    "bi_xy_std": "50:10:100",
    "bi_rgb_std": "3:1:10",
    "refine_rounds": 1,
}
_MAX_VALUES = 1000  # per parameter
_MAX_TRIALS = 10000  # per round
_MAX_REFINE_ROUNDS = 10
_DIGITS = 6  # parameter values are rounded to this many decimals (refined steps stay readable, keys stable)
TRIMAP_WIDTHS = tuple(range(1, 41))
_SCHEMA_VERSION = 1


def _config_error(message: str) -> Exception:
    from pipeline.config import ConfigError

    return ConfigError(message)


# ---------------------------------------------------------------------------------------------------------------
# Search space


@dataclass(frozen=True)
class SearchSpec:
    """Round 0's values per CRF field (a 1-tuple = fixed) and the number of refine rounds after it."""

    values: dict[str, tuple]
    refine_rounds: int

    def to_dict(self) -> dict[str, Any]:
        return {"values": {k: list(v) for k, v in self.values.items()}, "refine_rounds": self.refine_rounds}


def _number(name: str, value: Any, kind: type, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _config_error(f"{where}: {name}: expected a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise _config_error(f"{where}: {name}: expected an integer, got {value!r}")
        return int(value)
    if not math.isfinite(float(value)):
        raise _config_error(f"{where}: {name}: expected a finite number, got {value!r}")
    return round(float(value), _DIGITS)


def _range(name: str, start: Any, step: Any, stop: Any, kind: type, where: str) -> list:
    lo, st, hi = (_number(name, v, kind, where) for v in (start, step, stop))
    if st <= 0:
        raise _config_error(f"{where}: {name}: range step must be > 0, got {st}")
    if lo > hi:
        raise _config_error(f"{where}: {name}: range {lo}:{st}:{hi} is empty (start > stop)")
    count = int(math.floor((hi - lo) / st + 1e-9)) + 1
    if count > _MAX_VALUES:
        raise _config_error(
            f"{where}: {name}: range {lo}:{st}:{hi} has {count} values, at most {_MAX_VALUES}"
        )
    return [kind(round(lo + i * st, _DIGITS)) for i in range(count)]


def _values(name: str, raw: Any, where: str) -> tuple:
    """One search entry -> sorted unique values: a scalar, a list, "start:step:stop" or {min, max, step}."""
    kind = _FIELD_TYPES[name]
    if kind is str:
        items = raw if isinstance(raw, list) else [raw]
        if not items or not all(isinstance(v, str) for v in items):
            raise _config_error(f"{where}: {name}: expected a name or a list of names, got {raw!r}")
        return tuple(dict.fromkeys(items))
    if isinstance(raw, dict):
        if set(raw) != {"min", "max", "step"}:
            raise _config_error(
                f"{where}: {name}: a range needs exactly the keys min, max, step, got {sorted(raw)}"
            )
        out = _range(name, raw["min"], raw["step"], raw["max"], kind, where)
    elif isinstance(raw, str):
        parts = raw.split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(parts) != 3 or len(numbers) != 3:
            raise _config_error(
                f"{where}: {name}: expected a range start:step:stop like 50:10:100, got {raw!r}"
            )
        if kind is int and all(v.is_integer() for v in numbers):
            numbers = [int(v) for v in numbers]
        out = _range(name, *numbers, kind, where)
    elif isinstance(raw, list):
        if not raw:
            raise _config_error(f"{where}: {name}: expected at least one value, got []")
        if len(raw) > _MAX_VALUES:
            raise _config_error(f"{where}: {name}: {len(raw)} values, at most {_MAX_VALUES}")
        out = [_number(name, v, kind, where) for v in raw]
    else:
        out = [_number(name, raw, kind, where)]
    return tuple(sorted(set(out)))


def parse_search(raw: dict | None, base: CRFConfig, *, where: str = "search") -> SearchSpec:
    """A search mapping (YAML) over DEFAULT_SEARCH -> SearchSpec. Fields it does not name keep the default search
    (the paper's grid for the bilateral kernel, ``base`` for the rest). Raises ConfigError naming the bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _config_error(f"{where}: expected a mapping of CRF parameters, got {type(raw).__name__}")
    known = [*CRF_FIELDS, "refine_rounds"]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise _config_error(f"{where}: unknown key(s) {unknown}; known keys: {known}")
    merged = {**DEFAULT_SEARCH, **raw}
    rounds = merged.pop("refine_rounds")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 <= rounds <= _MAX_REFINE_ROUNDS:
        raise _config_error(
            f"{where}: refine_rounds: expected an integer in 0..{_MAX_REFINE_ROUNDS}, got {rounds!r}"
        )
    values: dict[str, tuple] = {}
    base_params = dataclasses.asdict(base)
    for name in CRF_FIELDS:
        values[name] = _values(name, merged.get(name, base_params[name]), where)
        for v in values[name]:  # every value must make a valid CRFConfig (catches sigma 0, NaN, bad names)
            try:
                CRFConfig(**{**base_params, name: v})
            except ValueError as e:
                raise _config_error(f"{where}: {name}: value {v!r} is not usable: {e}") from None
    size = math.prod(len(v) for v in values.values())
    if size > _MAX_TRIALS:
        raise _config_error(f"{where}: the grid has {size} trials, at most {_MAX_TRIALS}: narrow a range")
    return SearchSpec(values=values, refine_rounds=rounds)


def load_search(
    path: str | None, base: CRFConfig, storage_cfg: storage.StorageConfig | None = None
) -> SearchSpec:
    """Read a search YAML (local path or s3://) and parse it; None = the default search."""
    if path is None:
        return parse_search(None, base, where="default search")
    where = f"search file {path}"
    try:
        text = storage.read_bytes(path, storage_cfg or storage.StorageConfig.from_env()).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _config_error(f"{where}: cannot read it: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _config_error(f"{where}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    return parse_search(raw, base, where=where)


def refine_values(previous: Sequence, best: Any) -> tuple:
    """Finer values around ``best``: best +- half the previous spacing next to it (positive values only)."""
    others = [float(v) for v in previous if float(v) != float(best)]
    if not others:
        return (best,)
    half = min(abs(v - float(best)) for v in others) / 2.0
    out = {round(float(best) + d, _DIGITS) for d in (-half, 0.0, half)}
    return tuple(sorted(v for v in out if v > 0))


def grid_of(values: dict[str, tuple]) -> list[dict[str, Any]]:
    """Every combination, in CRF_FIELDS order (deterministic)."""
    return [
        dict(zip(CRF_FIELDS, combo, strict=True))
        for combo in itertools.product(*(values[f] for f in CRF_FIELDS))
    ]


def _canonical(params: dict[str, Any]) -> dict[str, Any]:
    return {f: _FIELD_TYPES[f](params[f]) for f in CRF_FIELDS}


def trial_key(params: dict[str, Any]) -> str:
    """Stable id of a parameter set (5 and 5.0 are the same trial)."""
    text = json.dumps(_canonical(params), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# Logits cache: the DCNN once per image


_CACHE_SCHEMA = pa.schema(
    [
        pa.field(S.ID, pa.string(), nullable=False),
        pa.field(S.HEIGHT, pa.int32(), nullable=False),
        pa.field(S.WIDTH, pa.int32(), nullable=False),
        pa.field("image_rgb", pa.binary(), nullable=False),  # uint8 (H, W, 3)
        pa.field("label_raw", pa.binary(), nullable=False),  # uint8 (H, W), 255 = void
        pa.field("raw_mask_raw", pa.binary(), nullable=False),  # uint8 (H, W), the DCNN argmax
        pa.field("logits_f16", pa.binary(), nullable=False),  # float16 (C, h, w), stride 8
        pa.field("logits_shape", pa.list_(pa.int32()), nullable=False),
        pa.field(S.UPSAMPLE_OFFSET, pa.int32(), nullable=False),
    ]
)


def compute_logits(
    items: list[dict], dcnn_cfg: Any, decode_cfg: Any, storage_cfg: storage.StorageConfig
) -> tuple[pa.Table, list[dict]]:
    """The segment job's read -> decode -> DCNN stages on ``items`` (batches of ``dcnn_cfg.batch_size``).

    Returns the cache table (one row per image with a usable label) and the rows left out (id, status, error).
    """
    from pipeline.stages.dcnn import DeepLabPredictor
    from pipeline.stages.decode import decode_batch
    from pipeline.stages.read import fetch_batch

    predictor = DeepLabPredictor(dcnn_cfg, storage_cfg)
    rows: dict[str, list] = {name: [] for name in _CACHE_SCHEMA.names}
    excluded: list[dict] = []
    step = dcnn_cfg.batch_size
    for start in range(0, len(items), step):
        chunk = items[start : start + step]
        batch = {k: np.array([it[k] for it in chunk], dtype=object) for k in chunk[0]}
        batch = predictor(decode_batch(fetch_batch(batch, storage_cfg), decode_cfg))
        for i in range(len(chunk)):
            image_id = str(batch[S.ID][i])
            status, problem = str(batch[S.STATUS][i]), S.text_or_none(batch[S.LABEL_PROBLEM][i])
            label = batch[S.LABEL][i]
            if status != S.OK or problem or not isinstance(label, np.ndarray) or label.size == 0:
                why = S.text_or_none(batch[S.ERROR][i]) if status != S.OK else (problem or "no label")
                excluded.append(
                    {S.ID: image_id, S.STATUS: status if status != S.OK else S.ErrorKind.LABEL, S.ERROR: why}
                )
                continue
            image, logits = batch[S.IMAGE][i], batch[S.LOGITS][i]
            rows[S.ID].append(image_id)
            rows[S.HEIGHT].append(int(image.shape[0]))
            rows[S.WIDTH].append(int(image.shape[1]))
            rows["image_rgb"].append(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            rows["label_raw"].append(np.ascontiguousarray(label, dtype=np.uint8).tobytes())
            rows["raw_mask_raw"].append(np.ascontiguousarray(batch[S.RAW_MASK][i], dtype=np.uint8).tobytes())
            rows["logits_f16"].append(np.ascontiguousarray(logits, dtype=np.float16).tobytes())
            rows["logits_shape"].append([int(d) for d in logits.shape])
            rows[S.UPSAMPLE_OFFSET].append(int(batch[S.UPSAMPLE_OFFSET][i]))
    return pa.Table.from_pydict(rows, schema=_CACHE_SCHEMA), excluded


def cache_rows(table: pa.Table) -> list[dict]:
    """Cache table -> per-image dicts of numpy arrays (what each trial reads)."""
    out = []
    for r in table.to_pylist():
        h, w = r[S.HEIGHT], r[S.WIDTH]
        out.append(
            {
                S.ID: r[S.ID],
                S.IMAGE: np.frombuffer(r["image_rgb"], dtype=np.uint8).reshape(h, w, 3),
                S.LABEL: np.frombuffer(r["label_raw"], dtype=np.uint8).reshape(h, w),
                S.RAW_MASK: np.frombuffer(r["raw_mask_raw"], dtype=np.uint8).reshape(h, w),
                S.LOGITS: np.frombuffer(r["logits_f16"], dtype=np.float16).reshape(r["logits_shape"]),
                S.UPSAMPLE_OFFSET: int(r[S.UPSAMPLE_OFFSET]),
            }
        )
    return out


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Scoring (what every trial runs)


class TrialError(RuntimeError):
    """The CRF failed on an image: the trial has no score."""


def crf_masks(params: dict[str, Any], rows: Sequence[dict]) -> list[np.ndarray]:
    """CRF masks for ``rows`` through the segment job's CRF stage (``CRFRefiner`` on one-row batches)."""
    refiner = CRFRefiner(CRFConfig(**_canonical(params)))
    masks = []
    for row in rows:
        batch = {
            S.ID: S.object_column([row[S.ID]]),
            S.STATUS: S.object_column([S.OK]),
            S.ERROR: S.object_column([None]),
            S.IMAGE: S.object_column([row[S.IMAGE]]),
            S.LOGITS: S.object_column([row[S.LOGITS]]),
            S.UPSAMPLE_OFFSET: np.array([row[S.UPSAMPLE_OFFSET]], dtype=np.int64),
        }
        out = refiner(batch)
        if out[S.STATUS][0] != S.OK:
            raise TrialError(f"{row[S.ID]}: {out[S.ERROR][0]}")
        masks.append(out[S.MASK][0])
    return masks


def score_crf(params: dict[str, Any], rows: Sequence[dict], num_classes: int) -> dict[str, Any]:
    """Dataset mean IoU and pixel accuracy of the CRF with ``params``: per-image confusions (as encode stores them)
    summed over ``rows`` and summarised as metrics.json does."""
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for row, mask in zip(rows, crf_masks(params, rows), strict=True):
        total += confusion_matrix(row[S.LABEL], mask, num_classes)
    s = summarize(total)
    return {
        "mean_iou": s["mean_iou"],
        "pixel_accuracy": s["pixel_accuracy"],
        "confusion": total.ravel().tolist(),
    }


def evaluate_params(params: dict[str, Any], rows: Sequence[dict], num_classes: int) -> MetricsAccumulator:
    """Full metrics (confusions, trimap bands) of the raw masks and the CRF with ``params``."""
    acc = MetricsAccumulator(num_classes, TRIMAP_WIDTHS)
    for row, mask in zip(rows, crf_masks(params, rows), strict=True):
        acc.add_image(row[S.ID], row[S.LABEL], row[S.RAW_MASK], mask)
    return acc


def _trial(config: dict, data: dict) -> None:
    """Ray Tune function trainable: one parameter set, one report. Errors are reported, not raised (a raised error
    makes Tune retire the actor, and on 2.60 the freed slot then stays idle for the rest of the round)."""
    import torch
    from ray import tune

    torch.set_num_threads(1)  # one CPU slot per trial: the upsampling must not spread over the node
    start = time.perf_counter()
    spec = config["trial"]
    try:
        result = score_crf(spec["crf"], data["rows"], data["num_classes"])
        result["error"] = None
    except Exception as e:  # noqa: BLE001 - any failure is this trial's record; the search goes on
        result = {
            "mean_iou": None,
            "pixel_accuracy": None,
            "confusion": None,
            "error": f"{type(e).__name__}: {e}",
        }
    result.update(key=spec["key"], seconds=time.perf_counter() - start, pid=os.getpid())
    tune.report(result)


# ---------------------------------------------------------------------------------------------------------------
# Records (resume)


class _Recorder:
    """Trial records under ``<cache>/trials/``: written the moment a trial ends, read back on a re-run."""

    def __init__(self, cache_uri: str, storage_cfg: storage.StorageConfig, run_id: str) -> None:
        self.uri = storage.join(cache_uri, "trials")
        self.storage_cfg = storage_cfg
        self.run_id = run_id
        self.records: dict[str, dict] = {}
        self.ran_here = 0

    def load(self) -> None:
        for uri in storage.list_files(self.uri, self.storage_cfg, suffixes=(".json",)):
            try:
                rec = json.loads(storage.read_bytes(uri, self.storage_cfg))
            except (OSError, ValueError) as e:  # a record is written atomically; anything else is not ours
                log.warning("ignoring unreadable trial record %s: %s", uri, e)
                continue
            self.records[rec["key"]] = rec

    def write(self, spec: dict, result: dict) -> None:
        rec = {
            "key": spec["key"],
            "crf": spec["crf"],
            "status": "error" if result.get("error") else "ok",
            "mean_iou": result.get("mean_iou"),
            "pixel_accuracy": result.get("pixel_accuracy"),
            "seconds": result.get("seconds"),
            "error": result.get("error"),
            "confusion": result.get("confusion"),
            "run_id": self.run_id,
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        storage.write_bytes(
            storage.join(self.uri, f"{spec['key']}.json"), json.dumps(rec).encode(), self.storage_cfg
        )
        self.records[spec["key"]] = rec
        self.ran_here += 1


def _error_line(trial: Any) -> str:
    """The last line of a crashed trial's error file (e.g. a worker killed by a segfault)."""
    path = getattr(trial, "error_file", None)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [x.strip() for x in f.read().splitlines() if x.strip()]
        return lines[-1][:500] if lines else "trial failed"
    except (OSError, TypeError):
        return "trial failed (no error file)"


def refined_values(previous: dict[str, tuple], best: dict[str, Any]) -> dict[str, tuple]:
    """The next round's values: searched REFINABLE fields narrowed around the best, every other field at the best."""
    out = {}
    for name in CRF_FIELDS:
        if len(previous[name]) > 1 and name in REFINABLE:
            out[name] = refine_values(previous[name], best[name])
        else:
            out[name] = (best[name],)
    return out


def _best(records: Sequence[dict]) -> dict | None:
    ok = [r for r in records if r["status"] == "ok" and r["mean_iou"] is not None]
    # Highest mIoU; ties go to the smallest key so the choice never depends on completion order.
    return min(ok, key=lambda r: (-r["mean_iou"], r["key"])) if ok else None


class _Rounds:
    """The round plan: round 0 = the search grid + the default parameters, then ``refine_rounds`` refinements around
    the best recorded so far. Deterministic given the records, so a re-run plans the same rounds and skips what is
    recorded."""

    def __init__(self, spec: SearchSpec, default_params: dict, recorder: _Recorder) -> None:
        self.spec, self.default_params, self.recorder = spec, default_params, recorder
        self.rounds: list[dict] = []
        self._start = 0.0

    def planned_records(self) -> list[dict]:
        """Records of this plan's trials (a cache may also hold trials of an earlier, different search)."""
        keys = dict.fromkeys(k for rd in self.rounds for k in rd["keys"])
        return [self.recorder.records[k] for k in keys if k in self.recorder.records]

    def close_round(self) -> None:
        if self.rounds and self.rounds[-1]["wall_s"] is None:
            self.rounds[-1]["wall_s"] = time.monotonic() - self._start

    def next(self) -> list[dict] | None:
        """The next round's trials still to run ([] when all are recorded), or None when the search is over."""
        self.close_round()
        r = len(self.rounds)
        if r > self.spec.refine_rounds:
            return None
        if r == 0:
            values = self.spec.values
        else:
            best = _best(self.planned_records())
            if best is None:
                return None
            values = refined_values(self.rounds[-1]["values"], best["crf"])
        grid = [_canonical(p) for p in grid_of(values)]
        specs = {trial_key(p): {"key": trial_key(p), "crf": p} for p in grid}
        if r == 0:
            specs.setdefault(
                trial_key(self.default_params),
                {"key": trial_key(self.default_params), "crf": self.default_params},
            )
        todo = [sp for k, sp in specs.items() if k not in self.recorder.records]
        self.rounds.append(
            {
                "round": r,
                "values": values,
                "keys": list(specs),
                "grid": [trial_key(p) for p in grid],
                "trials_run": len(todo),
                "wall_s": None,
            }
        )
        self._start = time.monotonic()
        log.info(
            "round %d: %d trials, %d already recorded, %d to run",
            r,
            len(specs),
            len(specs) - len(todo),
            len(todo),
        )
        return todo


def _searcher(plan: _Rounds):
    """A Ray Tune Searcher that hands out one round at a time and plans the next when the round has finished, so
    the whole search is one Tune experiment (trial actors start once and are reused)."""
    from ray.tune.search import Searcher

    class RoundSearcher(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.queue: list[dict] = []
            self.pending: dict[str, dict] = {}
            self.finished = False

        def suggest(self, trial_id: str) -> dict | None:
            if self.finished:
                return Searcher.FINISHED
            while not self.queue and not self.pending:
                todo = plan.next()
                if todo is None:
                    self.finished = True
                    return Searcher.FINISHED
                self.queue = list(todo)
            if not self.queue:
                return None  # wait for the round's running trials: the next round depends on them
            spec = self.queue.pop(0)
            self.pending[trial_id] = spec
            return {"trial": spec}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            spec = self.pending.pop(trial_id, None)
            if spec is not None and not error and result and result.get("key") == spec["key"]:
                plan.recorder.write(spec, result)  # before the round can close: the next round reads it

    return RoundSearcher()


def _error_callback(plan: _Rounds):
    from ray import tune

    class RecordCrashes(tune.Callback):
        """A trial whose process died (e.g. a segfault) never reports: record its error from Tune's error file."""

        def __init__(self) -> None:
            self.last = time.monotonic()

        def on_trial_error(self, iteration, trials, trial, **info):
            plan.recorder.write(trial.config["trial"], {"error": _error_line(trial)})

        def on_trial_complete(self, iteration, trials, trial, **info):
            if time.monotonic() - self.last > 10:
                self.last = time.monotonic()
                log.info(
                    "round %d: %d trials run so far, %d recorded",
                    len(plan.rounds) - 1,
                    plan.recorder.ran_here,
                    len(plan.recorder.records),
                )

    return RecordCrashes()


def make_trainable(rows: list[dict], num_classes: int) -> Any:
    """The Tune trainable: ``_trial`` with the cached rows (put in the object store once) and one CPU slot."""
    from ray import tune

    data = {"rows": rows, "num_classes": num_classes}
    return tune.with_resources(tune.with_parameters(_trial, data=data), {"cpu": 1})


def run_search(trainable: Any, plan: _Rounds) -> float:
    """Every round as one Ray Tune experiment; returns its wall time. Results land in ``plan.recorder``."""
    from ray import tune

    start = time.monotonic()
    state = tempfile.mkdtemp(
        prefix="deeplab-tune-"
    )  # Tune's own experiment state: our records are the record
    try:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=_searcher(plan), num_samples=-1, reuse_actors=True),
            run_config=tune.RunConfig(
                name="tune-crf",
                storage_path=state,
                verbose=0,
                callbacks=[_error_callback(plan)],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        tuner.fit()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    plan.close_round()
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------------------------
# The job


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
    from pipeline.config import resolve_crf
    from pipeline.segment import JobError, load_model_meta
    from pipeline.stages.plan import list_inputs

    t0 = time.monotonic()
    run_id = uuid.uuid4().hex[:12]
    out_uri = cfg.write.output_uri
    if num_images < 1:
        raise _config_error(f"--images must be >= 1, got {num_images}")
    load_search(search_path, CRFConfig(), cfg.storage)  # a bad search file fails before anything is loaded
    try:
        storage.check_access(cfg.read.input_uri, cfg.storage, what="input")
        storage.check_access(out_uri, cfg.storage, what="output")
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
    chosen = labelled[:num_images]
    num_classes = meta["num_classes"]

    key_doc = {
        "version": 1,
        "model_digest": digest,
        "ids": [it[S.ID] for it in chosen],
        "sources": [it[S.SOURCE] for it in chosen],
        "dcnn": {
            k: v
            for k, v in dataclasses.asdict(cfg.dcnn).items()
            if k not in ("model_uri", "expected_variant")
        },
        "decode": dataclasses.asdict(cfg.decode),
    }
    cache_key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    cache_uri = storage.join(out_uri, "cache", cache_key)
    logits_uri = storage.join(cache_uri, "logits.parquet")
    excluded_uri = storage.join(cache_uri, "excluded.json")
    log.info(
        "tune-crf: %d of %d labelled inputs (%s), model %s (%s), %d classes; cache %s",
        len(chosen), len(labelled), fmt, meta["variant"], digest[:12], num_classes, cache_uri,
    )  # fmt: skip

    # One CRF process per core: trials are CPU-bound (pydensecrf holds its process), so no oversubscription.
    init_ray(address, local_cpus=os.cpu_count() or 1)
    resources = ray.cluster_resources()
    dcnn_start = time.monotonic()
    reused = storage.exists(logits_uri, cfg.storage)
    if reused:
        fs, path = storage.filesystem(logits_uri, cfg.storage)
        table = pq.read_table(path, filesystem=fs)
        excluded = json.loads(storage.read_bytes(excluded_uri, cfg.storage))
        log.info("logits cache found: %d images, DCNN skipped", table.num_rows)
    else:
        use_gpu = resources.get("GPU", 0) >= 1
        task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(compute_logits)
        table, excluded = ray.get(task.remote(chosen, cfg.dcnn, cfg.decode, cfg.storage))
        # excluded.json first: the Parquet file's presence is what marks the cache complete.
        storage.write_bytes(excluded_uri, json.dumps(excluded).encode(), cfg.storage)
        storage.write_bytes(logits_uri, _table_bytes(table), cfg.storage)
        log.info(
            "DCNN: %d images in %.1f s, %d left out",
            table.num_rows,
            time.monotonic() - dcnn_start,
            len(excluded),
        )
    dcnn_s = time.monotonic() - dcnn_start
    if table.num_rows == 0:
        raise JobError(f"none of the {len(chosen)} images could be scored: e.g. {excluded[:2]}")
    rows = cache_rows(table)
    trainable = make_trainable(rows, num_classes)

    recorder = _Recorder(cache_uri, cfg.storage, run_id)
    recorder.load()
    plan = _Rounds(spec, default_params, recorder)
    search_s = run_search(trainable, plan)
    rounds = plan.rounds

    records = recorder.records
    best = _best(plan.planned_records())
    if best is None:
        errors = sorted({r["error"] for r in plan.planned_records() if r.get("error")})
        raise JobError(f"every trial failed; e.g. {errors[:2]}")
    default_key = trial_key(default_params)

    # Full metrics (trimap bands) of the default and the tuned parameters. In this process: two passes over the
    # images cost less than starting fresh Ray workers (each imports torch), and the CRF runs one at a time anyway.
    eval_start = time.monotonic()
    default_acc = evaluate_params(default_params, rows, num_classes)
    best_acc = evaluate_params(best["crf"], rows, num_classes)
    eval_s = time.monotonic() - eval_start
    for name, acc, rec in (("default", default_acc, records.get(default_key)), ("best", best_acc, best)):
        again = summarize(acc.confusion["crf"])["mean_iou"]
        if rec is not None and rec["status"] == "ok" and again != rec["mean_iou"]:
            raise JobError(
                f"the {name} parameters scored {again} on re-evaluation but {rec['mean_iou']} in the trial"
            )
    band_source = best_acc.band_source("auto")

    def curve(acc: MetricsAccumulator, which: str) -> list:
        return [summarize(c)["mean_iou"] for c in acc.trimap[band_source][which]]

    def summary_of(acc: MetricsAccumulator, which: str) -> dict:
        s = summarize(acc.confusion[which])
        return {
            "mean_iou": s["mean_iou"],
            "pixel_accuracy": s["pixel_accuracy"],
            "per_class_iou": s["per_class_iou"],
        }

    trials_run = recorder.ran_here
    all_keys = list(dict.fromkeys(k for rd in rounds for k in rd["keys"]))
    round_of = {}
    for rd in rounds:
        for k in rd["keys"]:
            round_of.setdefault(k, rd["round"])
    trials = []
    for k in all_keys:
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
            }
        )
    doc = {
        "schema_version": _SCHEMA_VERSION,
        "input": cfg.read.input_uri,
        "input_format": fmt,
        "output": out_uri,
        "model": {
            "uri": cfg.dcnn.model_uri,
            "variant": meta["variant"],
            "num_classes": num_classes,
            "digest": digest,
        },
        "class_names": meta.get("class_names"),
        "images": {
            "requested": num_images,
            "labelled_available": len(labelled),
            "chosen": len(chosen),
            "scored": table.num_rows,
            "ids": [r[S.ID] for r in rows],
            "excluded": excluded,
        },
        "search": spec.to_dict(),
        "rounds": [
            {k: v for k, v in rd.items() if k not in ("keys", "grid")} | {"num_trials": len(rd["keys"])}
            for rd in rounds
        ],
        "trials": trials,
        "best": {
            "crf": best["crf"],
            "mean_iou": best["mean_iou"],
            "pixel_accuracy": best["pixel_accuracy"],
            "key": best["key"],
        },
        "default": {
            "crf": default_params,
            "mean_iou": summary_of(default_acc, "crf")["mean_iou"],
            "pixel_accuracy": summary_of(default_acc, "crf")["pixel_accuracy"],
        },
        "raw": summary_of(best_acc, "raw"),
        "per_class_iou": {
            "default": summary_of(default_acc, "crf")["per_class_iou"],
            "best": summary_of(best_acc, "crf")["per_class_iou"],
        },
        "trimap": {
            "band_source": band_source,
            "widths": list(TRIMAP_WIDTHS),
            "raw": curve(best_acc, "raw"),
            "default": curve(default_acc, "crf"),
            "best": curve(best_acc, "crf"),
        },
        "timing": {
            "run_id": run_id,
            "cpu_slots": float(resources.get("CPU", 0)),
            "dcnn_s": dcnn_s,
            "logits_cache_reused": reused,
            "search_wall_s": search_s,
            "trials_total": len(trials),
            "trials_done_before": sum(t["run_id"] != run_id for t in trials),
            "trials_run": trials_run,
            "trials_per_s": trials_run / search_s if search_s > 0 else None,
            "evaluate_s": eval_s,
            "trial_seconds_sum": sum(t["seconds"] or 0.0 for t in trials if t["run_id"] == run_id),
            "total_wall_s": 0.0,
        },
        "logits_cache": logits_uri,
        "mean_iou_protocol": "one confusion matrix summed over the scored images (void skipped), as metrics.json",
    }
    doc["timing"]["total_wall_s"] = time.monotonic() - t0
    outputs = _write_outputs(doc, cfg, out_uri)
    log.info(
        "best mean IoU %.4f (default %.4f) after %d trials (%d run now, %.1f s search, %.2f trials/s): %s",
        best["mean_iou"], doc["default"]["mean_iou"] or 0.0, len(trials), trials_run, search_s,
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
