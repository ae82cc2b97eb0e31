"""Caffe-faithful preprocessing and batched DeepLab inference, plain PyTorch (no Ray): the DCNN stage's arithmetic.

Images go in as RGB uint8 (H, W, 3) of any size; each is converted to BGR minus the Caffe mean and padded
bottom/right with 0 (= the mean, as Caffe pads) to a canonical size that depends only on its own size (see
``padded_size`` and pipeline/stages/dcnn.py for the deviation from Caffe's crop)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor

from pipeline.model.deeplab import OUTPUT_STRIDE, DeepLab, upsample_logits
from pipeline.model.weights import CAFFE_MEAN_BGR

__all__ = ["padded_size", "logits_size", "preprocess", "predict_logits", "predict_probs"]

log = logging.getLogger(__name__)

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --- geometry ---------------------------------------------------------------------------------------------------


def padded_size(
    height: int, width: int, *, crop_size: int, min_input_size: int | None = None
) -> tuple[int, int]:
    """Canonical network input size for an image: >= max(image, min_input_size), == crop_size (mod 8)."""
    floor = crop_size if min_input_size is None else min_input_size

    def side(n: int) -> int:
        n = max(n, floor)
        return n + (crop_size - n) % OUTPUT_STRIDE

    return side(height), side(width)


def logits_size(height: int, width: int, *, offset: int) -> tuple[int, int]:
    """Rows/columns of stride-8 logits that ``upsample_logits`` needs for an (height, width) crop at ``offset``."""

    def side(n: int) -> int:
        return -(-(offset + n - 1) // OUTPUT_STRIDE) + 1  # ceil((offset + n - 1) / 8) + 1

    return side(height), side(width)


# --- preprocessing ----------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {desc}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")


def preprocess(images: Sequence[np.ndarray], *, size: tuple[int, int] | None = None) -> Tensor:
    """RGB uint8 (H, W, 3) images -> (N, 3, size) float32: BGR minus the Caffe mean, padded bottom/right with 0.

    ``size`` defaults to the largest height and width in ``images`` (no padding beyond that). Inputs may be
    read-only; they are never modified.
    """
    if not images:
        raise ValueError("preprocess needs at least one image, got none")
    for image in images:
        _check_image(image)
    if size is None:
        size = (max(im.shape[0] for im in images), max(im.shape[1] for im in images))
    out = np.zeros((len(images), 3, *size), dtype=np.float32)
    mean = np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        if h > size[0] or w > size[1]:
            raise ValueError(f"image {i} is {h}x{w}, larger than the padded size {size[0]}x{size[1]}")
        bgr = image[:, :, ::-1].astype(np.float32) - mean  # (H, W, 3) BGR, a fresh array
        out[i, :, :h, :w] = bgr.transpose(2, 0, 1)
    return torch.from_numpy(out)


# --- inference --------------------------------------------------------------------------------------------------


def _model_device(model: DeepLab) -> torch.device:
    return next(model.parameters()).device


def _groups(
    images: Sequence[np.ndarray],
    *,
    crop_size: int,
    min_input_size: int | None,
    batch_size: int,
    max_batch_pixels: int | None = None,
) -> Iterator[tuple[tuple[int, int], list[int]]]:
    """(padded size, indices) chunks of equal padded size, in input order: at most ``batch_size`` images and
    ``max_batch_pixels`` padded pixels each (but always at least one image)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        key = padded_size(image.shape[0], image.shape[1], crop_size=crop_size, min_input_size=min_input_size)
        by_size.setdefault(key, []).append(i)
    for size, indices in by_size.items():
        per_batch = batch_size
        if max_batch_pixels is not None:
            per_batch = max(1, min(batch_size, max_batch_pixels // (size[0] * size[1])))
        for start in range(0, len(indices), per_batch):
            yield size, indices[start : start + per_batch]


def _forward(
    model: DeepLab,
    images: Sequence[np.ndarray],
    size: tuple[int, int],
    *,
    device: torch.device,
    autocast: str,
    channels_last: bool,
) -> list[Tensor]:
    """One sub-batch -> per-image float32 logits on ``device``, cropped to what upsampling needs."""
    x = preprocess(images, size=size).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = (
        torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[autocast]) if autocast != "none" else nullcontext()
    )
    with ctx:
        out = model(x)  # (N, C, h, w), stride 8
    out = out.float()
    result = []
    for i, image in enumerate(images):
        lh, lw = logits_size(image.shape[0], image.shape[1], offset=model.upsample_offset)
        result.append(out[i, :, :lh, :lw])
    return result


def predict_logits(
    model: DeepLab,
    images: Sequence[np.ndarray],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    min_input_size: int | None = None,
    autocast: str = "none",
    channels_last: bool = False,
) -> list[Tensor]:
    """Stride-8 logits per image, float32 (C, h, w) on the model's device, cropped to what upsampling needs.

    ``upsample_logits(logits[i], H_i, W_i, offset=model.upsample_offset)`` gives image-sized scores. The model
    should be in eval mode (dropout); ``device`` defaults to where the model is (the model is moved if given).
    """
    dev = _model_device(model) if device is None else torch.device(device)
    if device is not None:
        model.to(dev)
    results: list[Tensor | None] = [None] * len(images)
    with torch.inference_mode():
        for size, idx in _groups(
            images, crop_size=model.crop_size, min_input_size=min_input_size, batch_size=batch_size
        ):
            chunk = [images[i] for i in idx]
            outs = _forward(model, chunk, size, device=dev, autocast=autocast, channels_last=channels_last)
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
    return results  # type: ignore[return-value]


def predict_probs(
    model: DeepLab,
    images: Sequence[np.ndarray],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    min_input_size: int | None = None,
    autocast: str = "none",
    channels_last: bool = False,
) -> list[np.ndarray]:
    """The Caffe test pipeline: RGB uint8 images of any size -> float32 (C, H, W) softmax probabilities each.

    Preprocess and pad, forward at stride 8, x8 bilinear (align_corners) upsampling, crop at the model's offset,
    softmax over classes. Runs where the model is (CUDA included) unless ``device`` says otherwise.
    """
    logits = predict_logits(
        model,
        images,
        device=device,
        batch_size=batch_size,
        min_input_size=min_input_size,
        autocast=autocast,
        channels_last=channels_last,
    )
    out = []
    with torch.inference_mode():
        for image, lg in zip(images, logits, strict=True):
            up = upsample_logits(lg, image.shape[0], image.shape[1], offset=model.upsample_offset)
            out.append(torch.softmax(up, dim=0).cpu().numpy())
    return out
