"""``deeplab demo``: the whole system on one machine with nothing external.

Starts a local S3 endpoint (moto server on 127.0.0.1) and a local Ray, generates a scene set the shipped model never
saw, uploads it, runs the segment job with the shipped checkpoint, evaluates it, prints a summary, copies the output
next to the logs (the local S3 is in memory and dies with the demo) and stops what it started.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from pipeline.cluster.services import LOCAL_S3_ENV, LocalS3
from pipeline.config import load_job_config
from pipeline.model.weights import DEMO_CHECKPOINT
from pipeline.storage import StorageConfig, list_files, read_bytes, s3_client, write_bytes

__all__ = ["DEMO_SEED", "run_demo"]

log = logging.getLogger(__name__)

DEMO_SEED = 2015_000  # far from the seeds the demo model was trained on (docs/demo-model.md)
DEMO_SIZE = "160x120"  # the shipped model's training size (at 320x240 objects are twice what it learnt)
DEMO_COUNT = 48
BUCKET = "deeplab-demo"


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError as e:
        raise ValueError(f"--size must look like 320x240, got {size!r}") from e
    return w, h


def run_demo(*, workdir: str | None = None, count: int = DEMO_COUNT, size: str = DEMO_SIZE) -> int:
    import ray

    from pipeline.cluster.ray_init import init_ray
    from pipeline.console import logs
    from pipeline.console.summary import format_summary
    from pipeline.demo.scenes import write_voc_dataset
    from pipeline.metrics.evaluate import evaluate_output
    from pipeline.segment import load_model_meta, run_segment

    width, height = _parse_size(size)
    say = (lambda _: None) if logs.output_mode() == logs.QUIET else (lambda text: print(text, flush=True))
    work = Path(workdir or tempfile.mkdtemp(prefix="deeplab-demo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for key, value in LOCAL_S3_ENV.items():  # placeholder credentials for moto; Ray workers inherit them
        os.environ.setdefault(key, value)
    t0 = time.monotonic()
    with LocalS3(log_path=str(work / "s3.log")) as s3:
        storage = StorageConfig(endpoint_url=s3.endpoint_url)
        s3_client(storage).create_bucket(Bucket=BUCKET)
        input_uri, output_uri = f"s3://{BUCKET}/scenes", f"s3://{BUCKET}/output"
        cfg, crf_raw = load_job_config(
            input=input_uri,
            output=output_uri,
            model=str(DEMO_CHECKPOINT),
            storage={"endpoint_url": s3.endpoint_url},
        )
        meta, _ = load_model_meta(cfg)
        say(
            f"[1/3] generating {count} scenes ({width}x{height}, {meta['num_classes']} classes) -> {input_uri}"
        )
        write_voc_dataset(
            input_uri,
            count=count,
            size=(width, height),
            num_classes=meta["num_classes"],
            seed=DEMO_SEED,
            storage_cfg=storage,
        )
        say(
            f"[2/3] segmenting on local Ray with {DEMO_CHECKPOINT.name} (DCNN actors -> CRF actors -> Parquet)"
        )
        init_ray()
        try:
            manifest = run_segment(cfg, crf_raw)
        finally:
            ray.shutdown()
        say(f"[3/3] copying the output to {work / 'output'}")
        for uri in list_files(output_uri, storage):
            write_bytes(str(work / "output" / uri[len(output_uri) + 1 :]), read_bytes(uri, storage), storage)
        # The report again, from the copy (while the images it shows are still served): its header then names
        # the folder a reader has, not only the bucket that goes away with the demo.
        evaluate_output(
            str(work / "output"), storage_cfg=storage, class_names=meta.get("class_names"), use_ray=False,
            run_summary=manifest["run"],
        )  # fmt: skip
    local_out = work / "output"
    summary = format_summary(manifest).replace(f"{output_uri}/", f"{local_out}/")
    lines = [
        summary,
        f"workdir       {work} (demo finished in {time.monotonic() - t0:.0f} s)",
        logs.logs_line(),
    ]
    print("\n" + "\n".join(line for line in lines if line), flush=True)
    return 0
