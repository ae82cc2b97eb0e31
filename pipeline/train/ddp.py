"""Demo world, third step: train any DeepLab v1 variant with the paper's recipe on Ray Train (``deeplab train``).

Flow: ``run_training`` (driver) resolves the class list, then starts a ``TorchTrainer`` (DDP over gloo on CPU
workers, NCCL with one GPU per worker when ``use_gpu``) running ``train_loop_per_worker`` on every worker:

1. read this worker's part of the training data (Parquet shards from ``deeplab shard``, or a VOC layout; local or
   s3://), decoded into memory;
2. build the model (``model.build_model``), initialise it from scratch, from an ImageNet VGG-16 state dict
   (``weights.vgg16_init``) or from a project checkpoint; resume from ``<output>/latest.json`` if present;
3. per iteration: random crop (``crop_size``, padded with the mean / 255 when the image is smaller) + mirror,
   Caffe preprocessing (BGR minus the mean), forward, softmax cross-entropy at stride 8 against the label sampled at
   each score's centre (``label[::8, ::8]`` for the pool3 family, shifted by the family's ``upsample_offset``),
   void 255 ignored; SGD momentum 0.9, weight decay 5e-4, step decay;
4. per epoch: validation mIoU on full images (Caffe upsampling, confusion all-reduced across workers), a checkpoint
   in the project format (``weights.save_checkpoint``) plus optimizer state, ``history.json`` and ``latest.json``
   (written last: the resume pointer), and ``ray.train.report`` of the metrics.

Learning rates follow the Caffe prototxts: the score layers (``fc8`` and MSc ``*.ms`` convs) get x10 (weights) /
x20 (biases) the base rate, every other layer x1 / x2; biases get no weight decay (``decay_mult: 0``).

Data stays in worker memory (each worker takes every ``world``-th shard, or every ``world``-th image when there are
fewer shards than workers): right for the demo world and fine-tuning sets up to a few GB per worker. Every worker
runs the same number of iterations per epoch (DDP all-reduces each step), sampling from its own part.

On GPUs (NCCL, one GPU per worker) the loop's own sums (image counts, losses, validation confusion) are reduced on
the rank's GPU, since NCCL takes no CPU tensors; resumed optimizer state is read onto the CPU
(``map_location``) and ``load_state_dict`` moves it to each parameter's device.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.storage import StorageConfig
from pipeline.train.config import TrainConfig
from pipeline.train.data import load_pairs, resolve_classes
from pipeline.train.recipe import (
    _sample_batch,
    evaluate,
    lr_at,
    miou,
    param_groups,
    preprocess,
    stride8_targets,
)

__all__ = ["run_training", "train_loop_per_worker"]

log = logging.getLogger(__name__)

_IMAGE_DIR, _LABEL_DIR, _SETS_DIR = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation"
VOID = 255


# ---------------------------------------------------------------------------------------------------------------
# the worker loop


def _read_json(uri: str, cfg: StorageConfig) -> dict | None:
    return json.loads(storage.read_bytes(uri, cfg)) if storage.exists(uri, cfg) else None


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_state(data: bytes) -> dict:
    """Optimizer state saved by ``_write_epoch``, on the CPU whatever device saved it: a CPU-only or another rank's
    process can read it, and ``Optimizer.load_state_dict`` moves each tensor to its parameter's device."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _collective_device(device: torch.device | None = None) -> torch.device:
    """Where a collective's tensors must be: the rank's GPU under NCCL (which has no CPU tensors), else the CPU
    (gloo, or a ``cpu:gloo,cuda:nccl`` group, which sends CPU tensors through gloo)."""
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and "cpu:" not in backend:
        if device is not None and device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(array: np.ndarray, device: torch.device | None = None) -> np.ndarray:
    """Sum ``array`` over the workers (float64 on the wire, counts exact below 2**53); ``device`` = this rank's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    t = torch.from_numpy(array.astype(np.float64)).to(_collective_device(device))
    dist.all_reduce(t)
    return t.cpu().numpy().astype(array.dtype)


# One function on purpose (~150 lines): the training loop read top to bottom, as nanoGPT's train.py.
def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker entry (also callable directly without Ray for one process).

    ``loop_config``: ``{"train": TrainConfig.to_dict(), "storage": StorageConfig fields}``.
    """
    from pipeline.model.deeplab import build_model
    from pipeline.model.weights import load_checkpoint, load_vgg16_state_dict, save_checkpoint, vgg16_init

    config = TrainConfig.from_dict(loop_config["train"])
    storage_cfg = StorageConfig(**loop_config.get("storage", {}))
    try:
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        in_ray = True
    except (ImportError, RuntimeError, AttributeError, ValueError):
        rank, world, in_ray = 0, 1, False
    torch.set_num_threads(config.threads_per_worker)
    torch.set_flush_denormal(True)  # decayed weights drift into denormals, which are 10-100x slower on CPU
    num_classes = int(config.num_classes)

    torch.manual_seed(config.seed)  # the same scratch init on every worker (DDP also broadcasts rank 0's)
    model = build_model(config.variant, num_classes=num_classes, width=config.width)
    offset = model.upsample_offset
    history: list[dict] = []
    start_epoch, iteration = 0, 0
    latest = _read_json(storage.join(config.output, "latest.json"), storage_cfg) if config.resume else None
    optimizer_state = None
    if latest is not None:
        loaded, _ = load_checkpoint(
            latest["checkpoint"],
            storage_cfg=storage_cfg,
            expected_variant=config.variant,
            expected_num_classes=num_classes,
        )
        model.load_state_dict(loaded.state_dict())
        state = _load_state(storage.read_bytes(latest["state"], storage_cfg))
        optimizer_state = state["optimizer"]
        start_epoch, iteration = int(latest["epoch"]), int(latest["iteration"])
        history = list(_read_json(storage.join(config.output, "history.json"), storage_cfg) or [])[
            :start_epoch
        ]
        log.info(
            "rank %d: resuming from %s (epoch %d, iteration %d)",
            rank,
            latest["checkpoint"],
            start_epoch,
            iteration,
        )
    elif config.init_checkpoint:
        loaded, _ = load_checkpoint(
            config.init_checkpoint,
            storage_cfg=storage_cfg,
            expected_variant=config.variant,
            expected_num_classes=num_classes,
        )
        model.load_state_dict(loaded.state_dict())
    elif config.init_vgg16:
        vgg16_init(model, load_vgg16_state_dict(config.init_vgg16, storage_cfg=storage_cfg))

    if in_ray:
        import ray.train.torch

        net = ray.train.torch.prepare_model(model)
    else:
        net = model
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(param_groups(model, config), lr=config.base_lr, momentum=config.momentum)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    train_pairs = load_pairs(config.train_input, config.train_split, storage_cfg, rank=rank, world=world)
    val_uri = config.val_input or config.train_input
    validate = config.val_split is not None or config.val_input is not None
    val_pairs = load_pairs(val_uri, config.val_split, storage_cfg, rank=rank, world=world) if validate else []
    total_train = int(_all_reduce_sum(np.array([len(train_pairs)], np.int64), device)[0])
    if not train_pairs:
        raise ValueError(f"worker {rank} of {world} got no training images from {config.train_input}")
    iters_per_epoch = max(1, math.ceil(total_train / (config.batch_size * world)))
    log.info(
        "rank %d/%d: %d train / %d val images, %d iterations per epoch",
        rank,
        world,
        len(train_pairs),
        len(val_pairs),
        iters_per_epoch,
    )

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        # Seeded per (seed, rank, epoch): a resumed run samples the same crops as an uninterrupted one.
        rng = np.random.default_rng([config.seed, rank, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch * 101 + rank)
        order = rng.permutation(len(train_pairs)).tolist()
        while len(order) < iters_per_epoch * config.batch_size:
            order += rng.permutation(len(train_pairs)).tolist()
        net.train()
        losses = []
        for step in range(iters_per_epoch):
            lr = lr_at(iteration, config)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            images, labels = _sample_batch(train_pairs, idx, config.crop_size, rng)
            x = preprocess(images).to(device)
            logits = net(x)  # (N, C, h, w), stride 8
            target = stride8_targets(
                torch.from_numpy(labels), logits.shape[2], logits.shape[3], offset=offset
            )
            loss = F.cross_entropy(logits, target.to(device), ignore_index=VOID)
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
            else:  # a crop of void only: nothing to learn; DDP still needs every rank to step in lockstep
                (logits.sum() * 0.0).backward()
                optimizer.step()
            iteration += 1
        train_loss = float(
            _all_reduce_sum(np.array([sum(losses), len(losses)], np.float64), device)[0]
        ) / max(1.0, float(_all_reduce_sum(np.array([len(losses)], np.float64), device)[0]))
        record: dict = {
            "epoch": epoch + 1,
            "iteration": iteration,
            "lr": lr_at(iteration - 1, config),
            "train_loss": train_loss,
            "epoch_s": round(time.perf_counter() - t0, 2),
        }
        if validate and ((epoch + 1) % config.val_every_epochs == 0 or epoch + 1 == config.epochs):
            confusion = _all_reduce_sum(evaluate(model, val_pairs, num_classes), device)
            if confusion.sum() > 0:
                record["val_miou"], record["val_iou"] = miou(confusion)
                record["val_pixel_acc"] = float(np.trace(confusion) / confusion.sum())
        history.append(record)
        log.info(
            "epoch %d/%d: loss %.4f val mIoU %s (%.1fs)",
            epoch + 1,
            config.epochs,
            train_loss,
            f"{record['val_miou']:.4f}" if "val_miou" in record else "-",
            record["epoch_s"],
        )
        if rank == 0:
            _write_epoch(config, model, optimizer, record, history, storage_cfg, save_checkpoint)
        if in_ray:
            import ray.train

            ray.train.report({k: v for k, v in record.items() if k != "val_iou"})


def _write_epoch(config, model, optimizer, record, history, storage_cfg, save_checkpoint) -> None:
    """Checkpoint + optimizer state, history, then latest.json (the resume pointer, last so it is never dangling)."""
    epoch = record["epoch"]
    ckpt_dir = storage.join(config.output, "checkpoints")
    ckpt = storage.join(ckpt_dir, f"epoch-{epoch:04d}.pt")
    state = storage.join(ckpt_dir, f"epoch-{epoch:04d}.state.pt")
    provenance = {
        "trained_by": "pipeline.train.ddp",
        "epoch": str(epoch),
        "iteration": str(record["iteration"]),
        "train_input": config.train_input,
        "train_loss": f"{record['train_loss']:.6f}",
        "val_miou": f"{record['val_miou']:.6f}" if "val_miou" in record else "",
        "config": json.dumps(
            {k: v for k, v in config.to_dict().items() if k != "class_names"}, sort_keys=True
        ),
    }
    save_checkpoint(
        model, ckpt, class_names=list(config.class_names), provenance=provenance, storage_cfg=storage_cfg
    )
    storage.write_bytes(
        state, _torch_bytes({"optimizer": optimizer.state_dict(), "epoch": epoch}), storage_cfg
    )
    storage.write_bytes(
        storage.join(config.output, "history.json"), json.dumps(history, indent=1).encode(), storage_cfg
    )
    pointer = {"epoch": epoch, "iteration": record["iteration"], "checkpoint": ckpt, "state": state}
    storage.write_bytes(storage.join(config.output, "latest.json"), json.dumps(pointer).encode(), storage_cfg)
    if epoch == config.epochs:
        save_checkpoint(
            model,
            storage.join(config.output, "final.pt"),
            class_names=list(config.class_names),
            provenance=provenance,
            storage_cfg=storage_cfg,
        )
    old = epoch - config.keep_checkpoints
    if old >= 1:
        storage.delete(storage.join(ckpt_dir, f"epoch-{old:04d}.pt"), storage_cfg)
        storage.delete(storage.join(ckpt_dir, f"epoch-{old:04d}.state.pt"), storage_cfg)


# ---------------------------------------------------------------------------------------------------------------
# the driver


def run_training(config: TrainConfig, storage_cfg: StorageConfig | None = None) -> dict:
    """Run ``train_loop_per_worker`` on a Ray Train ``TorchTrainer``; returns ``{"history", "final", "config"}``.

    Connects to the running Ray cluster (or starts a local one) if Ray is not initialised yet.
    """
    import dataclasses

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_cfg = storage_cfg or StorageConfig.from_env()
    storage.check_access(config.train_input, storage_cfg, what="input")
    storage.check_access(config.output, storage_cfg, what="output")
    config = resolve_classes(config, storage_cfg)
    if not ray.is_initialized():
        ray.init()
    loop_config = {"train": config.to_dict(), "storage": dataclasses.asdict(storage_cfg)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"deeplab-train-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=config.ray_storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    history = _read_json(storage.join(config.output, "history.json"), storage_cfg) or []
    return {"history": history, "final": storage.join(config.output, "final.pt"), "config": config.to_dict()}
