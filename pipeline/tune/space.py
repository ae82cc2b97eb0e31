"""The search space of ``deeplab tune-crf``: parameter grids from YAML or flags, refine rounds, trial keys."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline import storage
from pipeline.stages.crf import CRFConfig

__all__ = [
    "CRF_FIELDS",
    "REFINABLE",
    "DEFAULT_SEARCH",
    "TRIMAP_WIDTHS",
    "SearchSpec",
    "parse_search",
    "load_search",
    "refine_values",
    "grid_of",
    "trial_key",
]

log = logging.getLogger(__name__)

CRF_FIELDS = tuple(f.name for f in dataclasses.fields(CRFConfig))
# Each CRF field's kind from CRFConfig's annotations (strings under `from __future__ import annotations`).
_FIELD_TYPES = {
    f.name: {"float": float, "int": int, "str": str, "bool": bool}[str(f.type)]
    for f in dataclasses.fields(CRFConfig)
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
    if kind is bool:
        items = raw if isinstance(raw, list) else [raw]
        if not items or not all(isinstance(v, bool) for v in items):
            raise _config_error(f"{where}: {name}: expected true/false or a list of them, got {raw!r}")
        return tuple(dict.fromkeys(items))
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
