"""The paper's training recipe in pieces: Caffe preprocessing, stride-8 targets, learning rates per layer, the
step schedule, batches of random crops, and validation mIoU (confusion all-reduced by the caller)."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.train.config import TrainConfig

__all__ = ["preprocess", "stride8_targets", "param_groups", "lr_at", "confusion_matrix", "miou", "evaluate"]

log = logging.getLogger(__name__)

_IMAGE_DIR, _LABEL_DIR, _SETS_DIR = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation"
VOID = 255


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
