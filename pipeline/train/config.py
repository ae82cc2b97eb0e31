"""``deeplab train``'s settings: the paper's recipe by default, every field checked at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

__all__ = ["TrainConfig"]


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
