"""Entry point for training (``deeplab train ...`` or ``ray job submit -- python -m jobs.train ...``).

Builds a ``TrainConfig`` from the command line and runs ``pipeline.train.ddp.run_training`` on the Ray cluster this
process is attached to (``RAY_ADDRESS``), or on a local one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.storage import StorageConfig
from pipeline.train.config import TrainConfig
from pipeline.train.ddp import run_training

__all__ = ["build_parser", "config_from_args", "train_main"]


def _none_or_str(text: str) -> str | None:
    return None if text.lower() in ("", "none", "null") else text


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(train_input="", output="")  # defaults shown in --help come from the dataclass
    p = argparse.ArgumentParser(
        prog="deeplab train",
        description="Train a DeepLab v1 variant with the paper's recipe on Ray Train (TorchTrainer, DDP).",
    )
    p.add_argument("--train-input", required=True, help="Parquet shard prefix or VOC root (local or s3://)")
    p.add_argument("--output", required=True, help="checkpoint directory (local or s3://)")
    p.add_argument("--val-input", default=None, help="validation shards or VOC root (default: --train-input)")
    p.add_argument("--train-split", type=_none_or_str, default=d.train_split, help="'none' for all images")
    p.add_argument("--val-split", type=_none_or_str, default=d.val_split, help="'none' disables validation")
    p.add_argument("--variant", default=d.variant)
    p.add_argument("--num-classes", type=int, default=None, help="default: from the manifest / dataset.json")
    p.add_argument(
        "--width", type=float, default=d.width, help="channel multiplier (1.0 = the paper's model)"
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per worker")
    p.add_argument("--crop-size", type=int, default=d.crop_size)
    p.add_argument("--base-lr", type=float, default=d.base_lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lr-step-iters", type=int, default=d.lr_step_iters)
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma)
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--init-vgg16", default=None, help="torchvision VGG-16 state dict (.pth), local or s3://")
    p.add_argument("--init-checkpoint", default=None, help="project checkpoint to fine-tune from")
    p.add_argument("--no-resume", action="store_true", help="ignore <output>/latest.json and start over")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--val-every-epochs", type=int, default=d.val_every_epochs)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker)
    p.add_argument("--threads-per-worker", type=int, default=d.threads_per_worker)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-failures", type=int, default=d.max_failures)
    p.add_argument("--ray-storage-path", default=None, help="Ray Train run directory (default: Ray's)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        train_input=args.train_input,
        output=args.output,
        val_input=args.val_input,
        train_split=args.train_split,
        val_split=args.val_split,
        variant=args.variant,
        num_classes=args.num_classes,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        base_lr=args.base_lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        lr_step_iters=args.lr_step_iters,
        lr_gamma=args.lr_gamma,
        max_grad_norm=args.max_grad_norm,
        init_vgg16=args.init_vgg16,
        init_checkpoint=args.init_checkpoint,
        resume=not args.no_resume,
        keep_checkpoints=args.keep_checkpoints,
        val_every_epochs=args.val_every_epochs,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        threads_per_worker=args.threads_per_worker,
        seed=args.seed,
        max_failures=args.max_failures,
        ray_storage_path=args.ray_storage_path,
    )


def train_main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, train, print the per-epoch history; 0 on success, 2 on a bad config."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"deeplab train: {e}", file=sys.stderr)
        return 2
    storage_cfg = StorageConfig.from_env(endpoint_url=args.endpoint_url)
    result = run_training(config, storage_cfg)
    for record in result["history"]:
        print(json.dumps({k: v for k, v in record.items() if k != "val_iou"}))
    print(f"final checkpoint: {result['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
