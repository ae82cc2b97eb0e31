"""Reproduce the shipped demo checkpoint ``pipeline/assets/demo-largefov.pt`` end to end on this machine.

Starts a local S3 endpoint (moto server on 127.0.0.1), then runs exactly what the CLI runs:
``deeplab make-scenes`` -> ``deeplab shard`` (train and val splits) -> ``deeplab train`` (Ray Train TorchTrainer,
one CPU worker), copies ``final.pt`` to the assets, and evaluates it on held-out scenes (a seed never used for
training) without and with the dense CRF. Usage::

    python -m jobs.train_demo_model [--eval-only] [--epochs N] [--threads 2]
    python -m jobs.train_demo_model --name-classes   # rewrite only the asset's class names (weights untouched)

Figures and the exact commands are in ``docs/demo-model.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ASSET = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "demo-largefov.pt"

# The demo world and the recipe (see docs/demo-model.md for why each value).
NUM_CLASSES = 6
SIZE = "160x120"
COUNT = 1500
SEED = 0
TEST_SEED = 1000  # held-out scenes: never written, sharded or trained on
TEST_COUNT = 100
TRAIN_ARGS = [
    "--variant", "deeplab-largefov",
    "--width", "0.24",
    "--crop-size", "121",
    "--batch-size", "8",
    "--base-lr", "0.01",
    "--max-grad-norm", "10",
    "--lr-step-iters", "4200",
    "--lr-gamma", "0.1",
    "--seed", "0",
]  # fmt: skip


def _commands(endpoint: str, epochs: int, threads: int) -> list[tuple[str, list[str]]]:
    return [
        (
            "make-scenes",
            ["--output", "s3://demo/voc", "--count", str(COUNT), "--size", SIZE, "--num-classes", str(NUM_CLASSES),
             "--seed", str(SEED), "--val-fraction", "0.1", "--class-names", "shapes", "--endpoint-url", endpoint],
        ),
        ("shard", ["--input", "s3://demo/voc", "--output", "s3://demo/shards/train", "--images-per-shard", "500",
                   "--split", "train", "--endpoint-url", endpoint]),
        ("shard", ["--input", "s3://demo/voc", "--output", "s3://demo/shards/val", "--images-per-shard", "500",
                   "--split", "val", "--endpoint-url", endpoint]),
        (
            "train",
            ["--train-input", "s3://demo/shards/train", "--val-input", "s3://demo/shards/val",
             "--output", "s3://demo/runs/demo-largefov", "--epochs", str(epochs), "--threads-per-worker", str(threads),
             *TRAIN_ARGS, "--endpoint-url", endpoint],
        ),
    ]  # fmt: skip


def train(epochs: int, threads: int) -> None:
    import ray

    from jobs.train import train_main
    from pipeline.cluster.services import LOCAL_S3_ENV, LocalS3
    from pipeline.demo.scenes import make_scenes_main
    from pipeline.stages.shards import shard_main
    from pipeline.storage import StorageConfig, read_bytes, s3_client

    os.environ.update(LOCAL_S3_ENV)
    # Ray runs workers at nice 15; on a shared 2-core box that starves the one training worker (epochs 35 s ->
    # 290 s while tests ran beside it). The demo competes at normal priority instead.
    os.environ.setdefault("RAY_worker_niceness", "0")
    mains = {"make-scenes": make_scenes_main, "shard": shard_main, "train": train_main}
    with LocalS3() as s3:
        cfg = StorageConfig(endpoint_url=s3.endpoint_url)
        s3_client(cfg).create_bucket(Bucket="demo")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
        try:
            for name, argv in _commands(s3.endpoint_url, epochs, threads):
                print(f"$ deeplab {name} {' '.join(argv)}", flush=True)
                t0 = time.perf_counter()
                if mains[name](argv) != 0:
                    raise SystemExit(f"deeplab {name} failed")
                print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
            history = json.loads(read_bytes("s3://demo/runs/demo-largefov/history.json", cfg))
            Path("/tmp/demo-history.json").write_text(json.dumps(history, indent=1))
            ASSET.parent.mkdir(parents=True, exist_ok=True)
            ASSET.write_bytes(read_bytes("s3://demo/runs/demo-largefov/final.pt", cfg))
        finally:
            ray.shutdown()
    print(f"wrote {ASSET} ({ASSET.stat().st_size} bytes)")


def name_classes(path: Path = ASSET) -> list[str]:
    """Set the checkpoint's class names to the scene generator's shape names, keeping every tensor as it is.

    The shipped file was trained when ``make-scenes`` wrote ``class_1 .. class_5``; a retrain now gets the shape
    names from ``dataset.json``. Only ``meta`` changes (the sha256 digest changes with it); the rename is recorded
    in the provenance.
    """
    import io

    import torch

    from pipeline.demo.scenes import scene_class_names

    obj = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    meta = dict(obj["meta"])
    names = scene_class_names(int(meta["num_classes"]))
    if meta["class_names"] != names:
        provenance = dict(meta["provenance"])
        provenance["class_names_renamed_from"] = ",".join(meta["class_names"])
        meta.update(class_names=names, provenance=provenance)
        buf = io.BytesIO()
        torch.save({"state_dict": obj["state_dict"], "meta": meta}, buf)
        path.write_bytes(buf.getvalue())
    return names


def evaluate(threads: int, count: int = TEST_COUNT, *, quiet: bool = False) -> dict:
    """Raw and CRF mIoU on ``count`` held-out scenes (JPEG round trip as the pipeline sees them)."""
    import torch

    from pipeline.demo.scenes import encode_jpeg, make_scene, scene_seed
    from pipeline.model.deeplab import upsample_logits
    from pipeline.model.weights import load_checkpoint
    from pipeline.stages import crf
    from pipeline.train.recipe import confusion_matrix, miou, preprocess

    torch.set_num_threads(threads)
    model, meta = load_checkpoint(str(ASSET), expected_variant="deeplab-largefov")
    num_classes = meta["num_classes"]
    width, height = (int(v) for v in SIZE.split("x"))
    crf_cfg = crf.crf_config_for("deeplab-largefov")
    raw_conf = np.zeros((num_classes, num_classes), np.int64)
    crf_conf = np.zeros_like(raw_conf)
    all_bg = np.zeros_like(raw_conf)
    rng = np.random.default_rng(0)
    rand_conf = np.zeros_like(raw_conf)
    crf_s = 0.0
    for i in range(count):
        rgb, lab = make_scene(height, width, seed=scene_seed(TEST_SEED, i), num_classes=num_classes)
        rgb = np.array(Image.open(io.BytesIO(encode_jpeg(rgb))).convert("RGB"))
        x = preprocess(rgb)
        x = torch.nn.functional.pad(x, (0, (-(width - 1)) % 8, 0, (-(height - 1)) % 8))
        with torch.no_grad():
            logits = model(x)[0]
        probs = torch.softmax(upsample_logits(logits, height, width, offset=model.upsample_offset), 0).numpy()
        raw_conf += confusion_matrix(probs.argmax(0), lab, num_classes)
        t0 = time.perf_counter()
        refined = crf.refine(rgb.copy(), np.ascontiguousarray(probs), crf_cfg)
        crf_s += time.perf_counter() - t0
        crf_conf += confusion_matrix(refined, lab, num_classes)
        all_bg += confusion_matrix(np.zeros_like(lab), lab, num_classes)
        rand_conf += confusion_matrix(rng.integers(0, num_classes, lab.shape), lab, num_classes)
    out = {
        "test_scenes": count,
        "raw_miou": miou(raw_conf)[0],
        "crf_miou": miou(crf_conf)[0],
        "raw_iou": miou(raw_conf)[1],
        "crf_iou": miou(crf_conf)[1],
        "raw_pixel_acc": float(np.trace(raw_conf) / raw_conf.sum()),
        "crf_pixel_acc": float(np.trace(crf_conf) / crf_conf.sum()),
        "chance_uniform_miou": miou(rand_conf)[0],
        "all_background_miou": miou(all_bg)[0],
        "crf_config": str(crf_cfg),
        "crf_s_per_image": crf_s / count,
        "asset_bytes": ASSET.stat().st_size,
    }
    if not quiet:
        print(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-only", action="store_true", help="only evaluate the existing asset")
    p.add_argument(
        "--name-classes", action="store_true", help="only set the asset's class names to the shape names"
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.name_classes:
        print(f"{ASSET}: class names {', '.join(name_classes())}")
        return 0
    if not args.eval_only:
        train(args.epochs, args.threads)
    evaluate(args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
