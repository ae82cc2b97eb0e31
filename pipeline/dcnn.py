"""DCNN stage (after decode, before crf): Caffe-faithful preprocessing, batched DeepLab inference, ``DeepLabPredictor``.

Images go in as RGB uint8 (H, W, 3) of any size; each is converted to BGR minus the Caffe mean and padded
bottom/right with 0 (= the mean, as Caffe pads) to a canonical size that depends only on its own size:
the smallest size >= max(image, ``min_input_size``) congruent to the model's crop size mod 8 (513, 521, 529, ...
for the pool3 family; 514, 522, ... for vgg128_noup). Images with the same padded size run together; a batch with
mixed padded sizes is split into sub-batches, so no result depends on what else is in the batch.

Deviation from Caffe: Caffe's test net center-crops images larger than its 513 (514) crop and pads smaller ones.
A batch system must keep every pixel, so larger images are padded to a bigger canonical size instead. For
images up to 513 x 513 (514) the network input is exactly Caffe's.

Contract handed to the CRF stage: ``logits`` float16 (C, h, w) at stride 8, already cropped to the rows/columns
that ``model.upsample_logits(logits, H, W, offset=upsample_offset)`` needs; ``raw_mask`` uint8 (H, W).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline import schema
from pipeline.model import OUTPUT_STRIDE, DeepLab, upsample_logits
from pipeline.storage import StorageConfig
from pipeline.weights import CAFFE_MEAN_BGR, load_checkpoint

__all__ = [
    "DCNNConfig",
    "DeepLabPredictor",
    "padded_size",
    "logits_size",
    "preprocess",
    "predict_logits",
    "predict_probs",
]

log = logging.getLogger(__name__)

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DCNNConfig:
    """What the DCNN stage needs: which weights, where to run, how to batch."""

    model_uri: str  # checkpoint .pt, local path or s3:// URI
    expected_variant: str | None = None  # fail at load when the checkpoint holds another variant
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    batch_size: int = 4  # images per forward pass (sub-batches of equal padded size)
    min_input_size: int | None = None  # smallest padded side; None = the model's Caffe crop size (513 / 514)
    # Mixed precision on any device; off by default (float32, as the paper). On a CPU with AMX, bf16 + channels_last
    # takes 3.6-4.4x less CPU than float32 for the full-width model at 99.7-99.96 % raw-mask agreement; where bf16
    # is emulated it is slower (bench/dcnn.py, docs/performance.md).
    autocast: str = "none"  # "none", "bf16" or "fp16"
    # NHWC memory format on any device: same float32 math (100 % mask agreement), 1.3-1.6x less CPU on oneDNN,
    # and the layout tensor cores want.
    channels_last: bool = True
    num_threads: int | None = None  # torch intra-op threads in this process; None = torch's default

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise ValueError("dcnn.model_uri must name a checkpoint (local path or s3:// URI), got ''")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"dcnn.device must be auto, cpu or cuda, got {self.device!r}")
        if self.batch_size < 1:
            raise ValueError(f"dcnn.batch_size must be >= 1, got {self.batch_size}")
        if self.min_input_size is not None and self.min_input_size < 1:
            raise ValueError(f"dcnn.min_input_size must be >= 1 or None, got {self.min_input_size}")
        if self.autocast not in ("none", *_AUTOCAST_DTYPES):
            raise ValueError(f"dcnn.autocast must be none, bf16 or fp16, got {self.autocast!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"dcnn.num_threads must be >= 1 or None, got {self.num_threads}")


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
    images: Sequence[np.ndarray], *, crop_size: int, min_input_size: int | None, batch_size: int
) -> Iterator[tuple[tuple[int, int], list[int]]]:
    """(padded size, indices) chunks: images of equal padded size, at most ``batch_size`` each, in input order."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        key = padded_size(image.shape[0], image.shape[1], crop_size=crop_size, min_input_size=min_input_size)
        by_size.setdefault(key, []).append(i)
    for size, indices in by_size.items():
        for start in range(0, len(indices), batch_size):
            yield size, indices[start : start + batch_size]


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


# --- Ray Data stage ---------------------------------------------------------------------------------------------


def _node_id() -> str:
    # Only ask Ray when this process already runs it (every Ray worker has it imported): importing it costs ~1 s.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return "local"


def _rows(column: np.ndarray, n: int) -> list:
    """A numpy-batch column as a list of per-row values (object ndarray of arrays, or one regular ndarray)."""
    values = list(column)
    if len(values) != n:
        raise ValueError(f"column has {len(values)} rows, expected {n}")
    return values


class DeepLabPredictor:
    """Ray Data ``map_batches(batch_format="numpy")`` callable: loads the checkpoint once, scores each batch.

    Adds ``logits`` (float16 (C, h, w)), ``upsample_offset``, ``raw_mask`` (uint8 (H, W)), ``dcnn_s`` and
    ``dcnn_node``. Rows whose status is not ``ok`` pass through with empty arrays; an image that fails becomes a
    ``dcnn_error`` row and the rest of the batch carries on.
    """

    def __init__(self, cfg: DCNNConfig, storage_cfg: StorageConfig | None = None) -> None:
        self.cfg = cfg
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        device = auto if cfg.device == "auto" else cfg.device
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("dcnn.device is 'cuda' but torch sees no CUDA device in this process")
        self.device = torch.device(device)
        self.model, self.meta = load_checkpoint(
            cfg.model_uri, storage_cfg=storage_cfg, expected_variant=cfg.expected_variant, map_location=device
        )
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.eval()
        self.variant: str = self.model.variant
        self.num_classes: int = self.model.num_classes
        self.model_digest: str = self.meta["digest"]
        self.node_id = _node_id()
        log.info(
            "DeepLabPredictor: %s (%s) on %s, node %s",
            self.variant,
            self.model_digest[:12],
            device,
            self.node_id,
        )

    def _run(self, images: list[np.ndarray], size: tuple[int, int]) -> list[Tensor]:
        return _forward(
            self.model,
            images,
            size,
            device=self.device,
            autocast=self.cfg.autocast,
            channels_last=self.cfg.channels_last,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[schema.ID])
        status = np.array([str(s) for s in _rows(batch[schema.STATUS], n)], dtype=object)
        error = schema.object_column(_rows(batch[schema.ERROR], n) if schema.ERROR in batch else [None] * n)
        images = _rows(batch[schema.IMAGE], n)

        empty_logits = np.zeros((0, 0, 0), dtype=np.float16)
        empty_mask = np.zeros((0, 0), dtype=np.uint8)
        logits_col: list[np.ndarray] = [empty_logits] * n
        mask_col: list[np.ndarray] = [empty_mask] * n
        seconds = np.zeros(n, dtype=np.float32)

        todo = []
        for i in range(n):
            if status[i] != schema.OK:
                continue
            try:
                _check_image(images[i])
                todo.append(i)
            except ValueError as e:
                status[i], error[i] = schema.ErrorKind.DCNN, str(e)

        def fail(i: int, exc: Exception) -> None:
            log.warning("dcnn failed for %s: %s", batch[schema.ID][i], exc)
            status[i], error[i] = schema.ErrorKind.DCNN, f"{type(exc).__name__}: {exc}"

        with torch.inference_mode():
            for size, idx in _groups(
                [images[i] for i in todo],
                crop_size=self.model.crop_size,
                min_input_size=self.cfg.min_input_size,
                batch_size=self.cfg.batch_size,
            ):
                rows = [todo[j] for j in idx]
                start = time.perf_counter()
                try:
                    outs: list[Tensor | None] = list(self._run([images[i] for i in rows], size))
                except Exception:  # isolate the image that fails, keep the others
                    outs = []
                    for i in rows:
                        try:
                            outs.append(self._run([images[i]], size)[0])
                        except Exception as e:
                            fail(i, e)
                            outs.append(None)
                forward_s = (time.perf_counter() - start) / len(rows)
                for i, out in zip(rows, outs, strict=True):
                    if out is None:
                        continue
                    t0 = time.perf_counter()
                    try:
                        h, w = images[i].shape[:2]
                        up = upsample_logits(out, h, w, offset=self.model.upsample_offset)
                        # argmax of the upsampled logits = argmax of the upsampled softmax (monotonic per pixel).
                        # max(dim=0).indices, not argmax(dim=0): same first-index result, ~3.7x less CPU over the
                        # channel dim of a (C, H, W) tensor (36 -> 10 ms at 21x375x500 on one thread, timed 2026-11-30).
                        mask_col[i] = up.max(dim=0).indices.to(torch.uint8).cpu().numpy()
                        logits_col[i] = out.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).half().cpu().numpy()
                    except Exception as e:
                        fail(i, e)
                        continue
                    seconds[i] = forward_s + time.perf_counter() - t0

        out_batch = dict(batch)
        out_batch[schema.STATUS] = status
        out_batch[schema.ERROR] = error
        out_batch[schema.LOGITS] = schema.object_column(logits_col)
        out_batch[schema.UPSAMPLE_OFFSET] = np.full(n, self.model.upsample_offset, dtype=np.int64)
        out_batch[schema.RAW_MASK] = schema.object_column(mask_col)
        out_batch["dcnn_s"] = seconds
        out_batch["dcnn_node"] = np.array([self.node_id] * n, dtype=object)
        return schema.clean_text_columns(out_batch)
