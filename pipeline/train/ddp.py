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
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import storage
from pipeline.storage import StorageConfig

__all__ = [
    "TrainConfig",
    "run_training",
    "train_loop_per_worker",
    "load_pairs",
    "resolve_classes",
    "preprocess",
    "stride8_targets",
    "param_groups",
    "lr_at",
    "confusion_matrix",
    "miou",
    "evaluate",
]

log = logging.getLogger(__name__)

_IMAGE_DIR, _LABEL_DIR, _SETS_DIR = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation"
VOID = 255


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Iteration counts and batch sizes are per worker; the global batch is x num_workers."""

    train_input: str  # Parquet shard prefix (with _manifest.json) or VOC root; local or s3://
    output: str  # checkpoints, history.json, latest.json go here; local or s3://
    val_input: str | None = None  # default: train_input (a VOC root with a val split)
    train_split: str | None = (
        "train"  # VOC: ImageSets/Segmentation/<split>.txt; shards: must match the manifest
    )
    val_split: str | None = "val"
    variant: str = "deeplab-largefov"
    num_classes: int | None = None  # default: from the manifest / dataset.json
    width: float = 1.0  # channel multiplier (model.build_model)
    epochs: int = 10
    batch_size: int = 10  # per worker (paper: 20 or 30 on one GPU)
    crop_size: int = 321  # random training crop (paper: 321); 8k + 1 keeps scores and labels aligned
    base_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step_iters: int = 2000  # LR x lr_gamma every this many iterations (paper: 2000)
    lr_gamma: float = 0.1
    classifier_lr_mult: float = 10.0  # fc8 / MSc score convs: weights x10, biases x20
    max_grad_norm: float | None = None  # off in the paper; useful from scratch at high LR
    init_vgg16: str | None = None  # torchvision-layout VGG-16 state dict (.pth), local or s3://
    init_checkpoint: str | None = None  # a project checkpoint to fine-tune from (same variant and classes)
    resume: bool = True  # continue from <output>/latest.json when it exists
    keep_checkpoints: int = 2  # epoch checkpoints kept besides final.pt
    val_every_epochs: int = 1
    num_workers: int = 1
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1  # torch intra-op threads per worker
    seed: int = 0
    max_failures: int = 0  # Ray Train restarts; each restart resumes from latest.json
    ray_storage_path: str | None = None  # Ray Train's own run directory (metrics); None = Ray's default
    class_names: tuple[str, ...] = field(default=())  # filled by resolve_classes

    def __post_init__(self) -> None:
        from pipeline.model.deeplab import VARIANTS

        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "crop_size": self.crop_size >= 17,
            "base_lr": self.base_lr > 0,
            "lr_step_iters": self.lr_step_iters >= 1,
            "num_workers": self.num_workers >= 1,
            "threads_per_worker": self.threads_per_worker >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "val_every_epochs": self.val_every_epochs >= 1,
            "width": self.width > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid training config: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}"
            )
        if self.num_classes is not None and not 2 <= self.num_classes <= 255:
            raise ValueError(f"num_classes must be in [2, 255], got {self.num_classes}")
        if self.class_names and self.num_classes is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class names, got {len(self.class_names)}")
        if self.init_vgg16 and self.init_checkpoint:
            raise ValueError("give init_vgg16 or init_checkpoint, not both")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        d["class_names"] = tuple(d.get("class_names") or ())
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------
# data


def _is_shards(uri: str, cfg: StorageConfig) -> bool:
    return storage.exists(storage.join(uri, "_manifest.json"), cfg)


def resolve_classes(config: TrainConfig, storage_cfg: StorageConfig) -> TrainConfig:
    """Fill num_classes / class_names from the config, the shard manifest or ``dataset.json`` (in that order)."""
    import dataclasses

    from pipeline.demo.scenes import class_names as default_names

    meta: dict = {}
    for name in ("_manifest.json", "dataset.json"):
        uri = storage.join(config.train_input, name)
        if storage.exists(uri, storage_cfg):
            meta = json.loads(storage.read_bytes(uri, storage_cfg))
            break
    num_classes = config.num_classes or meta.get("num_classes")
    if num_classes is None:
        raise ValueError(
            f"num_classes not given and {config.train_input} has no _manifest.json or dataset.json"
        )
    names = tuple(config.class_names) or (
        tuple(meta["class_names"])
        if meta.get("num_classes") == num_classes and meta.get("class_names")
        else ()
    )
    names = names or tuple(default_names(num_classes))
    return dataclasses.replace(config, num_classes=int(num_classes), class_names=names)


def _decode_pair(image: bytes, label: bytes | None, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    if label is None:
        raise ValueError(f"training image {image_id} has no label")
    lab = np.asarray(Image.open(io.BytesIO(label)))
    if lab.ndim != 2 or lab.shape != rgb.shape[:2]:
        raise ValueError(
            f"label of {image_id}: expected a 2-D {rgb.shape[:2]} index PNG, got shape {lab.shape}"
        )
    return rgb, lab.astype(np.uint8)


def load_pairs(
    uri: str, split: str | None, storage_cfg: StorageConfig, *, rank: int = 0, world: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """This worker's (rgb uint8 (H, W, 3), label uint8 (H, W)) pairs from shards or a VOC root, in id order."""
    from pipeline.stages import shards

    if _is_shards(uri, storage_cfg):
        manifest = shards.read_manifest(uri, storage_cfg)
        if split is not None and manifest.get("split") != split:
            raise ValueError(
                f"{uri} holds split {manifest.get('split')!r}, expected {split!r}: shard each split to its own "
                "prefix (deeplab shard --split ...) or pass the split as none"
            )
        uris = shards.shard_uris(uri, manifest)
        mine = uris[rank::world] if len(uris) >= world else uris
        rows = [r for u in mine for r in shards.read_shard_rows(u, storage_cfg)]
        if len(uris) < world:
            rows = rows[rank::world]
        return [_decode_pair(r["image"], r["label"], r["image_id"]) for r in rows]
    pairs = shards.list_voc_pairs(uri, storage_cfg, split=split)[rank::world]
    out = []
    for image_id, image_uri, label_uri in pairs:
        label = storage.read_bytes(label_uri, storage_cfg) if label_uri else None
        out.append(_decode_pair(storage.read_bytes(image_uri, storage_cfg), label, image_id))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the recipe's pieces


def preprocess(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, H, W) BGR minus the Caffe mean (no scaling)."""
    from pipeline.model.weights import CAFFE_MEAN_BGR

    x = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1])).float()
    x = x - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32)
    x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.permute(2, 0, 1)[None]
    return x.contiguous()


def stride8_targets(
    labels: torch.Tensor, out_h: int, out_w: int, *, offset: int, stride: int = 8
) -> torch.Tensor:
    """Labels (N, H, W) -> (N, out_h, out_w): the label at each score's centre, ``8j - offset`` (255 outside)."""
    n, height, width = labels.shape
    ys = torch.arange(out_h) * stride - offset
    xs = torch.arange(out_w) * stride - offset
    out = torch.full((n, out_h, out_w), VOID, dtype=torch.long)
    vy, vx = (ys >= 0) & (ys < height), (xs >= 0) & (xs < width)
    sub = labels[:, ys[vy]][:, :, xs[vx]].long()
    out[:, vy.nonzero()[:, 0][:, None], vx.nonzero()[:, 0][None, :]] = sub
    return out


def _is_score_layer(name: str) -> bool:
    return name.startswith(("classifier.fc8.", "module.classifier.fc8.")) or (
        ".msc." in f".{name}" and ".ms." in name
    )


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """SGD groups: score layers x10 / x20 (weights / biases), the rest x1 / x2; no weight decay on biases."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((_is_score_layer(name), name.endswith("bias")), []).append(p)
    out = []
    for (score, bias), params in sorted(groups.items()):
        mult = (config.classifier_lr_mult if score else 1.0) * (2.0 if bias else 1.0)
        out.append(
            {
                "params": params,
                "lr": config.base_lr * mult,
                "lr_mult": mult,
                "weight_decay": 0.0 if bias else config.weight_decay,
                "name": f"{'score' if score else 'trunk'}_{'bias' if bias else 'weight'}",
            }
        )
    return out


def lr_at(iteration: int, config: TrainConfig) -> float:
    """Caffe ``step`` policy: base_lr * gamma ** floor(iteration / stepsize)."""
    return config.base_lr * config.lr_gamma ** (iteration // config.lr_step_iters)


def _sample_batch(
    pairs: list[tuple[np.ndarray, np.ndarray]], idx: list[int], crop: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (after padding to >= crop with the mean colour / void) and mirror: (N, crop, crop, 3), (N, ...)."""
    from pipeline.model.weights import CAFFE_MEAN_BGR

    mean_rgb = np.round(np.array(CAFFE_MEAN_BGR[::-1])).astype(np.uint8)  # pads to ~0 after mean subtraction
    images = np.empty((len(idx), crop, crop, 3), np.uint8)
    labels = np.empty((len(idx), crop, crop), np.uint8)
    for k, i in enumerate(idx):
        rgb, lab = pairs[i]
        h, w = lab.shape
        ph, pw = max(crop, h), max(crop, w)
        if (ph, pw) != (h, w):  # Caffe pads bottom/right
            big = np.empty((ph, pw, 3), np.uint8)
            big[:] = mean_rgb
            big[:h, :w] = rgb
            bl = np.full((ph, pw), VOID, np.uint8)
            bl[:h, :w] = lab
            rgb, lab = big, bl
        y = int(rng.integers(0, ph - crop + 1))
        x = int(rng.integers(0, pw - crop + 1))
        rgb, lab = rgb[y : y + crop, x : x + crop], lab[y : y + crop, x : x + crop]
        if rng.uniform() < 0.5:
            rgb, lab = rgb[:, ::-1], lab[:, ::-1]
        images[k], labels[k] = rgb, lab
    return images, labels


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """C x C int64 counts (row = ground truth, column = prediction), void and out-of-range gt skipped."""
    valid = gt < num_classes
    return np.bincount(
        gt[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64), minlength=num_classes**2
    ).reshape(num_classes, num_classes)


def miou(confusion: np.ndarray) -> tuple[float, list[float]]:
    """Mean IoU over classes that occur (in gt or prediction), and per-class IoU (NaN where absent)."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return (float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0), iou.tolist()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int
) -> np.ndarray:
    """Raw (no CRF) confusion on full images: pad to 8k + 1 with the mean, forward, Caffe upsampling, argmax."""
    from pipeline.model.deeplab import upsample_logits

    was_training = model.training
    model.eval()
    confusion = np.zeros((num_classes, num_classes), np.int64)
    device = next(model.parameters()).device
    for rgb, lab in pairs:
        h, w = lab.shape
        x = preprocess(rgb)
        pad_h, pad_w = (-(h - 1)) % 8, (-(w - 1)) % 8
        x = F.pad(x, (0, pad_w, 0, pad_h))  # 0 = the mean after subtraction, as Caffe pads
        logits = model(x.to(device))[0].float().cpu()
        scores = upsample_logits(logits, h, w, offset=model.upsample_offset)
        confusion += confusion_matrix(scores.argmax(0).numpy(), lab, num_classes)
    model.train(was_training)
    return confusion


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
