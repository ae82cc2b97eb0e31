"""deeplab-pipeline: DeepLab v1 (atrous VGG-16 + fully connected CRF) as a Ray Data batch job.

What a Python user imports (the CLI, ``deeplab``, and ``python -m jobs.segment`` call the same functions)::

    from pipeline import load_job_config, run_segment, evaluate_output

    cfg, crf = load_job_config(input="s3://b/VOC2012", output="s3://b/runs/r1", model="s3://b/m/largefov.pt")
    manifest = run_segment(cfg, crf)              # plan, DCNN + CRF on Ray, Parquet masks, the final check
    metrics = evaluate_output("s3://b/runs/r1", storage_cfg=cfg.storage)

Names are imported on first use, so ``import pipeline`` stays cheap (no torch, no Ray until needed).
Where things live: docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "load_job_config",
    "JobConfig",
    "run_segment",
    "dry_run_segment",
    "JobError",
    "evaluate_output",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
    "CRFConfig",
    "refine",
    "StorageConfig",
]

_WHERE = {
    "load_job_config": "pipeline.config",
    "JobConfig": "pipeline.config",
    "run_segment": "pipeline.segment",
    "dry_run_segment": "pipeline.segment",
    "JobError": "pipeline.segment",
    "evaluate_output": "pipeline.metrics.evaluate",
    "build_model": "pipeline.model.deeplab",
    "load_checkpoint": "pipeline.model.weights",
    "save_checkpoint": "pipeline.model.weights",
    "CRFConfig": "pipeline.stages.crf",
    "refine": "pipeline.stages.crf",
    "StorageConfig": "pipeline.storage",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
