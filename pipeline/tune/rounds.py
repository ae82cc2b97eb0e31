"""Rounds of trials on Ray Tune: each finished trial recorded at once (resume), refine rounds around the best."""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from pipeline import storage
from pipeline.tune.space import (
    CRF_FIELDS,
    REFINABLE,
    SearchSpec,
    _canonical,
    grid_of,
    refine_values,
    trial_key,
)
from pipeline.tune.trials import _trial

__all__ = ["refined_values", "make_trainable", "run_search"]

log = logging.getLogger(__name__)


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
