"""Job configuration: one frozen tree built once from YAML plus command-line overrides, validated, saved secret-free.

Each stage receives only its own slice (``cfg.decode``, ``cfg.dcnn``, ``cfg.crf``, ``cfg.pools``, ``cfg.storage``).
Unknown keys are rejected with the list of known ones, so a typo fails fast instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.model.variants import VARIANTS
from pipeline.stages.crf import CRFConfig, crf_config_for
from pipeline.stages.dcnn_config import DCNNConfig
from pipeline.stages.decode import DecodeConfig
from pipeline.stages.write import RETRY_POLICIES
from pipeline.storage import StorageConfig, is_s3, read_bytes, redact, settle, storage_env_values

__all__ = [
    "ConfigError",
    "PoolConfig",
    "ReadConfig",
    "WriteConfig",
    "JobConfig",
    "load_job_config",
    "load_job_config_from_args",
    "resolve_crf",
]

INPUT_FORMATS = ("auto", "voc", "images", "shards", "manifest")


class ConfigError(ValueError):
    """The job configuration is invalid; the message names the key and the expected value."""


@dataclass(frozen=True)
class ReadConfig:
    input_uri: str  # VOC root, prefix of images, shards prefix, or manifest file/prefix (local path or s3://)
    labels_uri: str | None = None  # prefix of label PNGs named <image_id>.png (image-prefix inputs)
    input_format: str = "auto"  # auto | voc | images | shards | manifest
    split: str | None = None  # VOC only: ImageSets/Segmentation/<split>.txt; None = every image in JPEGImages
    # Most work items per Ray Data block (fewer when the job is small, so every actor gets work): per-block costs
    # (a task or actor call per stage, ~ms each) are paid once per block; a CRF actor refines a block per call.
    items_per_block: int = 250  # a divisor of write.rows_per_file, so that parts come out full
    # Largest image or label object read, in bytes, checked before the body is read: a bigger one is a
    # `too_large` row (permanent), never a worker out of memory.
    max_bytes: int = 256 << 20
    # The manifest trust rule (storage.check_source_allowed): the prefixes a manifest's image and label URIs must
    # lie under. Empty: an s3:// manifest may name only s3:// objects, a local one local paths and s3:// objects.
    allowed_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.allowed_prefixes, str | list):
            prefixes = (
                [self.allowed_prefixes] if isinstance(self.allowed_prefixes, str) else self.allowed_prefixes
            )
            object.__setattr__(self, "allowed_prefixes", tuple(prefixes))
        if not all(isinstance(p, str) and p for p in self.allowed_prefixes):
            raise ConfigError(
                f"read.allowed_prefixes must be a list of prefixes, got {self.allowed_prefixes!r}"
            )
        if self.input_format not in INPUT_FORMATS:
            raise ConfigError(f"read.input_format must be one of {INPUT_FORMATS}, got {self.input_format!r}")
        if self.items_per_block < 1:
            raise ConfigError(f"read.items_per_block must be >= 1, got {self.items_per_block}")
        if self.max_bytes < 1:
            raise ConfigError(f"read.max_bytes must be >= 1, got {self.max_bytes}")


@dataclass(frozen=True)
class WriteConfig:
    output_uri: str
    # Rows per Parquet part (the unit of commit): 10M images make 10k parts. Rows wait for their part as encoded
    # PNG masks (~5-20 KB each at VOC size), so a part's rows cost the object store ~10-20 MB.
    rows_per_file: int = 1000
    # Which committed error rows a re-run processes again (their new row supersedes the old one, see write.py):
    # "retryable" (errors caused by the environment: storage, credentials, memory), "all", or "none".
    retry_errors: str = "retryable"
    # Attempts an image gets: the row of its max_retries-th attempt is permanent whatever its cause, so a scheduler
    # that re-runs on exit 75 stops.
    max_retries: int = 3
    # One run per output (pipeline/output/lease.py): the lease lapses this long after its holder's last renewal (a killed
    # run's lease), and a second run waits up to lease_wait_s for it before refusing (0: refuse at once).
    lease_ttl_s: float = 120.0
    lease_wait_s: float = 0.0
    # The output records its input, model and CRF settings at its first run; a run with others refuses unless true.
    allow_identity_change: bool = False

    def __post_init__(self) -> None:
        if self.rows_per_file < 1:
            raise ConfigError(f"write.rows_per_file must be >= 1, got {self.rows_per_file}")
        if self.max_retries < 1:
            raise ConfigError(f"write.max_retries must be >= 1, got {self.max_retries}")
        if self.lease_ttl_s < 5 or self.lease_wait_s < 0:
            raise ConfigError(
                f"write.lease_ttl_s must be >= 5 and write.lease_wait_s >= 0, got {self.lease_ttl_s}, "
                f"{self.lease_wait_s}"
            )
        if self.retry_errors not in RETRY_POLICIES:
            raise ConfigError(
                f"write.retry_errors must be one of {RETRY_POLICIES}, got {self.retry_errors!r}"
            )


@dataclass(frozen=True)
class PoolConfig:
    """Actor pool bounds. ``None`` maxima are sized by pools.plan_pools from what the cluster may grow to."""

    dcnn_min_actors: int = 1
    dcnn_max_actors: int | None = None
    dcnn_num_cpus: float = 1.0  # CPU slots per DCNN actor when the cluster has no GPU
    dcnn_num_cpus_with_gpu: float = 1.0  # CPU slots reserved beside each GPU
    crf_min_actors: int = 1
    crf_max_actors: int | None = None
    crf_resource: str | None = None  # custom resource marking CRF nodes (e.g. "crf"); None = any CPU node
    # CPU slots kept free for tasks (deadlock guard): the plan reader (a task that streams a plan file's items and
    # holds its slot while the stages downstream are busy) and the encode + write tasks need one each.
    task_cpus: float = 2.0
    # More task slots per DCNN actor on GPUs: read and decode run as tasks there (fused into the actor on CPUs).
    task_cpus_per_gpu: float = 1.0
    # GPUs the cluster may grow to when its autoscaler does not report node types (None = what it reports/has).
    max_gpus: int | None = None
    # None: the DCNN runs on GPUs when the cluster has or may grow to one; True: as None, and fail if it may not;
    # False: use only GPUs present at the start, never wait for one (no GPU: the CPU plan).
    require_gpu: bool | None = None
    # How long the job waits for the pools' minimum (the first GPU, CPU slots on a fresh head) before failing.
    resource_wait_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("task_cpus", "task_cpus_per_gpu", "resource_wait_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"pools.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_gpus is not None and self.max_gpus < 0:
            raise ConfigError(f"pools.max_gpus must be >= 0, got {self.max_gpus}")
        for name in ("dcnn_min_actors", "crf_min_actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pools.{name} must be >= 1, got {getattr(self, name)}")
        for lo, hi in (("dcnn_min_actors", "dcnn_max_actors"), ("crf_min_actors", "crf_max_actors")):
            if getattr(self, hi) is not None and getattr(self, hi) < getattr(self, lo):
                raise ConfigError(
                    f"pools.{hi} ({getattr(self, hi)}) must be >= pools.{lo} ({getattr(self, lo)})"
                )


@dataclass(frozen=True)
class JobConfig:
    read: ReadConfig
    write: WriteConfig
    dcnn: DCNNConfig
    crf: CRFConfig | None  # None = --no-crf
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    pools: PoolConfig = field(default_factory=PoolConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    evaluate: bool = True  # compute dataset metrics and the report at the end when labels exist

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for `_manifest.json`. The config holds no secrets by construction (see storage.py)."""
        return dataclasses.asdict(self)


_SECTIONS = {
    "read": ReadConfig,
    "write": WriteConfig,
    "dcnn": DCNNConfig,
    "decode": DecodeConfig,
    "pools": PoolConfig,
    "storage": StorageConfig,
}
# Top-level shortcuts (the command line's names) and where they land.
_SHORTCUTS = {
    "input": ("read", "input_uri"),
    "labels": ("read", "labels_uri"),
    "input_format": ("read", "input_format"),
    "split": ("read", "split"),
    "output": ("write", "output_uri"),
    "retry_errors": ("write", "retry_errors"),
    "model": ("dcnn", "model_uri"),
    "variant": ("dcnn", "expected_variant"),
}


def _check_keys(section: str, given: dict, allowed: typing.Iterable[str]) -> None:
    allowed = sorted(allowed)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {section!r}; known keys: {allowed}")


def _coerce(cls: type, section: str, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _check_keys(section, values, names)
    out = {}
    for key, value in values.items():
        hint = hints[key]
        base = [t for t in typing.get_args(hint) if t is not type(None)] if _is_optional(hint) else [hint]
        if value is None or not base:
            out[key] = value
            continue
        target = base[0]
        if target is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if target in (int, float, str, bool) and not isinstance(value, target):
            raise ConfigError(f"{section}.{key} must be {target.__name__}, got {value!r}")
        out[key] = value
    try:
        return cls(**out)
    except TypeError as e:
        raise ConfigError(f"{section}: {e}") from e
    except ValueError as e:
        raise ConfigError(f"{section}: {e}") from e


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def load_job_config(path: str | None = None, **overrides: Any) -> tuple[JobConfig, dict[str, Any]]:
    """Build the job config from an optional YAML file and overrides (None values are ignored).

    Returns the config with ``crf`` still unresolved (variant-dependent defaults) and the raw CRF overrides; call
    ``resolve_crf(cfg, variant, crf_overrides)`` once the checkpoint's variant is known.
    """
    raw = _read_config_file(path, overrides.get("storage")) if path else {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    crf_raw: dict[str, Any] = {}
    evaluate = True
    given = [*raw.items(), *((k, v) for k, v in overrides.items() if v is not None)]
    for key, value in given:  # file first, then overrides, each merged key by key into its section
        if key in _SHORTCUTS:
            section, name = _SHORTCUTS[key]
            sections[section][name] = value
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key!r} must be a mapping, got {value!r}")
            sections[key].update(value)
        elif key == "crf":
            if value is False:
                crf_raw = {"enabled": False}
            elif isinstance(value, dict):
                crf_raw.update(value)
            else:
                raise ConfigError(f"'crf' must be a mapping or false, got {value!r}")
        elif key == "evaluate":
            evaluate = bool(value)
        else:
            known = sorted([*_SHORTCUTS, *_SECTIONS, "crf", "evaluate"])
            raise ConfigError(f"unknown top-level key {key!r}; known keys: {known}")
    for section, name in (("read", "input_uri"), ("write", "output_uri"), ("dcnn", "model_uri")):
        if not sections[section].get(name):
            flag = {"input_uri": "--input", "output_uri": "--output", "model_uri": "--model"}[name]
            raise ConfigError(f"missing {flag} (or {section}.{name} in the config file)")
    variant = sections["dcnn"].get("expected_variant")
    if variant is not None and variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
    # Storage: flags, then the file, then the AWS environment, then defaults (as storage.storage_settings).
    sections["storage"] = {**storage_env_values(), **sections["storage"]}
    built = {name: _coerce(cls, name, sections[name]) for name, cls in _SECTIONS.items()}
    built["storage"] = settle(built["storage"])
    cfg = JobConfig(crf=None, evaluate=evaluate, **built)
    return cfg, crf_raw


def _read_config_file(path: str, storage_flags: dict | None) -> dict[str, Any]:
    """The YAML mapping at ``path`` (a local file or an s3:// object, read with the flags' and the environment's
    storage settings)."""
    storage = None
    if is_s3(path):
        storage = settle(_coerce(StorageConfig, "storage", {**storage_env_values(), **(storage_flags or {})}))
    try:
        if storage is not None:
            text = read_bytes(path, storage, max_bytes=_MAX_CONFIG_BYTES).decode("utf-8")
        else:
            text = Path(path).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8 YAML"
        ) from e
    except FileNotFoundError as e:
        raise ConfigError(f"cannot read config file {path}: no such file or object") from e
    except Exception as e:  # noqa: BLE001 - OSError, ObjectTooLarge, botocore's errors (not all are OSErrors)
        raise ConfigError(
            f"cannot read config file {path}: {redact(getattr(e, 'strerror', None) or str(e))}"
        ) from e
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    return raw


_MAX_CONFIG_BYTES = 1 << 20  # a job YAML is a few KB; refuse anything that is not one before reading it


def load_job_config_from_args(args: Any) -> tuple[JobConfig, dict[str, Any]]:
    """load_job_config from the command line's common flags (``--config``, ``--input``, ... ``--endpoint-url``)."""
    overrides: dict[str, Any] = {
        key: getattr(args, key, None)
        for key in ("input", "labels", "output", "model", "variant", "split", "input_format", "retry_errors")
    }
    storage = {k: getattr(args, k, None) for k in ("endpoint_url", "region")}
    if any(v is not None for v in storage.values()):
        overrides["storage"] = {k: v for k, v in storage.items() if v is not None}
    return load_job_config(args.config, **overrides)


def resolve_crf(cfg: JobConfig, variant: str, crf_raw: dict[str, Any]) -> JobConfig:
    """Fill in the CRF slice from the variant's published parameters plus the user's overrides."""
    crf_raw = dict(crf_raw)
    if not crf_raw.pop("enabled", True):
        return dataclasses.replace(cfg, crf=None)
    _check_keys("crf", crf_raw, [f.name for f in dataclasses.fields(CRFConfig)])
    try:
        crf = crf_config_for(variant, **crf_raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"crf: {e}") from e
    return dataclasses.replace(cfg, crf=crf)
