"""DCNN stage (after decode, before crf): Caffe-faithful preprocessing, batched DeepLab inference, ``DeepLabPredictor``.

Images go in as RGB uint8 (H, W, 3) of any size; each is converted to BGR minus the Caffe mean and padded
bottom/right with 0 (= the mean, as Caffe pads) to a canonical size that depends only on its own size:
the smallest size >= max(image, ``min_input_size``) congruent to the model's crop size mod 8 (513, 521, 529, ...
for the pool3 family; 514, 522, ... for vgg128_noup). Images with the same padded size run together; a batch with
mixed padded sizes is split into sub-batches, so no result depends on what else is in the batch.

Deviations from Caffe: Caffe's test net center-crops images larger than its 513 (514) crop and pads smaller ones to
it. A batch system must keep every pixel, so larger images are padded to a bigger canonical size instead; and by
default (``min_input_size=1``) smaller images are padded only to the smallest valid size >= the image, not to 513
(docs/input-size.md: much less DCNN time on small images, no loss of mIoU). With ``min_input_size=None`` the network
input of an image up to 513 x 513 (514) is exactly Caffe's.

Contract handed to the CRF stage: ``logits`` float16 (C, h, w) at stride 8, already cropped to the rows/columns
that ``model.upsample_logits(logits, H, W, offset=upsample_offset)`` needs; ``raw_mask`` uint8 (H, W).
With a CRF config (``crf.device: cuda``) the actor is the CRF stage too: it refines each row right after the
network on the same device (``crf_torch.refine_probs``, from the same float16 logits the CRF stage would get) and
emits ``mask``, ``crf_s`` and ``crf_node`` instead of ``logits`` and ``image``.

On a GPU (docs/performance.md, "GPU check"): the actor uses CUDA exactly when Ray gave it GPUs and proves the
device with a warm-up forward before it scores a row. Sub-batches are bounded by padded pixels
(``max_batch_pixels``) as well as by ``batch_size``; an out-of-memory error halves the sub-batch (after the
``except`` block has let go of the failed attempt's tensors) and lowers the actor's budget. Persistent device
errors (illegal address, no kernel image, cuDNN failures) are not image errors: the actor logs them and exits its
process, so Ray restarts it and retries the block on a fresh CUDA context (see ``DeepLabPredictor``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline import schema
from pipeline.model.deeplab import OUTPUT_STRIDE, DeepLab, upsample_logits
from pipeline.model.weights import CAFFE_MEAN_BGR, load_checkpoint
from pipeline.stages.crf import CRFConfig
from pipeline.storage import StorageConfig

__all__ = [
    "DCNNConfig",
    "DeepLabPredictor",
    "DeviceFault",
    "resolve_device",
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
    # "auto": in a Ray actor CUDA exactly when Ray assigned it GPUs, elsewhere CUDA when torch sees one; "cpu" or
    # "cuda" to insist (an actor planned without GPUs then fails at start instead of grabbing one).
    device: str = "auto"
    batch_size: int = 4  # at most this many images per forward pass (sub-batches of equal padded size)
    # At most this many padded pixels per forward pass (an image larger than that runs alone). Activation memory
    # follows pixels, not images: conv1_2 holds two 64-channel float32 maps, ~0.5 KiB per pixel, so a 12-MP photo
    # padded to 4001x3001 needs ~5.7 GiB there and the default (8 images at 513x513, ~1 GiB) fits any GPU.
    # An out-of-memory error halves the sub-batch and lowers this actor's budget. None = no pixel bound.
    max_batch_pixels: int | None = 8 * 513 * 513
    # Smallest padded side. 1 (default) = the smallest valid size >= the image; None = Caffe's test crop (513 / 514):
    # 12-13x less DCNN time at 160x120, ~70x at 40x30, 1.4x at 500x375, at 96.6-99.2 % mask agreement with Caffe's
    # padding at VOC size and a higher mIoU on the demo model (bench/input_size.py, docs/input-size.md).
    min_input_size: int | None = 1
    # Mixed precision on any device; off by default (float32, as the paper). On a CPU with AMX, bf16 + channels_last
    # takes 3.6-4.4x less CPU than float32 for the full-width model at 99.7-99.96 % raw-mask agreement; where bf16
    # is emulated it is slower (bench/dcnn.py, docs/performance.md).
    autocast: str = "none"  # "none", "bf16" or "fp16"
    # NHWC memory format on any device: same float32 math (100 % mask agreement), 1.3-1.6x less CPU on oneDNN,
    # and the layout tensor cores want.
    channels_last: bool = True
    num_threads: int | None = None  # torch intra-op threads in this process; None = torch's default
    # float32 convolutions on CUDA are exact IEEE float32 unless this is on (cuDNN would use TF32 tensor cores on
    # Ampere and later by default: ~10-bit mantissas, a different model than the paper's). Autocast overrides it.
    allow_tf32: bool = False

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
        if self.max_batch_pixels is not None and self.max_batch_pixels < 1:
            raise ValueError(f"dcnn.max_batch_pixels must be >= 1 or None, got {self.max_batch_pixels}")


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


# --- device ---------------------------------------------------------------------------------------------------


class DeviceFault(RuntimeError):
    """A device error that poisons the process (CUDA context), not the image: no later row here can be trusted."""


# Substrings of torch's messages. Out of memory is checked first: "CUDA error: out of memory" is an OOM too.
_OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory")
_FAULT_MARKERS = (
    "CUDA error",
    "CUDA driver error",
    "cuDNN error",
    "CUDNN_STATUS_",
    "CUBLAS_STATUS_",
    "CUFFT_",
    "no kernel image is available",
    "illegal memory access",
    "illegal instruction",
    "device-side assert",
    "unspecified launch failure",
    "uncorrectable ECC error",
)
# How often the same batch may take a fresh actor on one node before the job fails instead (a poison input).
MAX_FAULT_RESTARTS = 3


_OOM_ROW = "out of memory for one"  # how a row's error starts when even a batch of one did not fit


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MARKERS)
    )


def _is_device_fault(exc: BaseException) -> bool:
    if _is_oom(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, DeviceFault | accelerator_error) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in _FAULT_MARKERS)
    )


def _ray_gpu_ids() -> list | None:
    """GPU ids Ray assigned to this actor; None when this process is not a Ray actor (driver, tests, scripts)."""
    ray = sys.modules.get(
        "ray"
    )  # only when already imported: every Ray worker has it, importing it costs ~1 s
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return list(ray.get_gpu_ids())


def _cuda_unavailable(why: str) -> RuntimeError:
    """The cause of torch not seeing CUDA, in one message: CPU wheel, driver, or hidden devices."""
    if torch.version.cuda is None:
        cause = (
            f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA wheel (infra/Dockerfile)"
        )
    else:
        try:
            torch.cuda.init()
            detail = "torch.cuda.init() raised nothing"
        except Exception as e:  # the driver's own reason: no driver, too old for CUDA x, no device
            detail = f"{type(e).__name__}: {e}"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        cause = (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={visible!r}; check the NVIDIA driver with nvidia-smi): {detail}"
        )
    return RuntimeError(f"{why}, but {cause}")


def resolve_device(requested: str) -> torch.device:
    """The DCNN's device. In a Ray actor: CUDA exactly when Ray assigned GPUs (``ray.get_gpu_ids()``); an actor
    without GPUs hides them from this process before anything touches CUDA. Elsewhere: ``auto`` = CUDA if
    torch sees it. A GPU that torch cannot use fails here, naming the cause."""
    gpu_ids = _ray_gpu_ids()
    if gpu_ids is None:
        if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise _cuda_unavailable("dcnn.device is 'cuda'")
        return torch.device("cuda", 0)
    if not gpu_ids:  # planned on CPU, maybe on a GPU node: never create a CUDA context on another actor's GPU
        if requested == "cuda":
            raise ValueError(
                "dcnn.device is 'cuda' but Ray assigned this actor no GPU (its pool plan has no num_gpus)"
            )
        if not torch.cuda.is_initialized():
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return torch.device("cpu")
    if requested == "cpu":
        log.warning(
            "dcnn.device is 'cpu' although Ray assigned GPUs %s to this actor: they stay idle", gpu_ids
        )
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise _cuda_unavailable(f"Ray assigned GPUs {gpu_ids} to this DCNN actor")
    return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned ids: the first is cuda:0


def _sync(device: torch.device) -> None:
    """Wait for queued kernels, so a timer read next measures them (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _exit_process(code: int) -> None:  # a seam for tests
    logging.shutdown()  # flush the log line that says why
    os._exit(code)


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

    Device errors are not image errors. Out of memory: the sub-batch is halved and retried (down to one image,
    which alone out of memory is that image's ``dcnn_error``). Non-finite logits under autocast are redone in
    float32. A persistent device error (``_FAULT_MARKERS``) leaves the CUDA context unusable, so no row of the
    batch is returned: in a Ray actor the process logs the cause and exits (``os._exit``), Ray restarts the actor
    (Ray Data's actor defaults ``max_restarts=-1``, ``max_task_retries=-1``) and retries the block on the fresh
    process, whose warm-up forward proves the device again before any row. Raising instead would fail the job
    (``max_errored_blocks=0``) or, with ``actor_task_retry_on_errors``, retry on the same broken process. The same
    batch failing on ``MAX_FAULT_RESTARTS`` fresh actors of one node raises ``DeviceFault`` and fails the job.
    Outside Ray the ``DeviceFault`` is raised.

    ``crf_cfg`` (given when ``crf.device`` is cuda): refine each ok row here, on the DCNN's device, and return
    the CRF stage's columns (``CRFRefiner``'s: ``mask``, ``crf_s``, ``crf_node``, no ``logits`` or ``image``); a
    row whose CRF fails becomes ``crf_error`` (retryable when out of memory).
    """

    def __init__(
        self, cfg: DCNNConfig, storage_cfg: StorageConfig | None = None, crf_cfg: CRFConfig | None = None
    ) -> None:
        self.cfg = cfg
        self.crf_cfg = crf_cfg
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            if cfg.autocast == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
                name = torch.cuda.get_device_name(self.device)
                raise ValueError(
                    f"dcnn.autocast is bf16 but {name} has no native bfloat16 (compute capability "
                    f"{'.'.join(map(str, torch.cuda.get_device_capability(self.device)))}, bf16 needs >= 8.0): "
                    "use fp16 or none"
                )
            _set_tf32(cfg.allow_tf32)
        self.model, self.meta = load_checkpoint(
            cfg.model_uri,
            storage_cfg=storage_cfg,
            expected_variant=cfg.expected_variant,
            map_location=self.device,
        )
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.eval()
        self.variant: str = self.model.variant
        self.num_classes: int = self.model.num_classes
        self.model_digest: str = self.meta["digest"]
        self.max_batch_pixels = cfg.max_batch_pixels  # lowered by out-of-memory errors
        self.in_ray_actor = _ray_gpu_ids() is not None
        self.node_id = _node_id()
        if crf_cfg is not None and crf_cfg.device == "cuda":
            from pipeline.stages.crf_torch import check_crf_device

            check_crf_device("cuda")  # one line when torch here sees no CUDA device
            if self.device.type != "cuda":
                raise ValueError(
                    f"crf.device is 'cuda' but this DCNN actor runs on {self.device}: plan the DCNN pool on "
                    "GPUs or set crf.device: cpu"
                )
        self._warm_up()
        log.info(
            "DeepLabPredictor: %s (%s) on %s%s, node %s",
            self.variant,
            self.model_digest[:12],
            self.device,
            f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "",
            self.node_id,
        )

    def _warm_up(self) -> None:
        """One small forward on the device, synchronised: a broken device fails the actor before any row."""
        side = 33 + (self.model.crop_size - 33) % OUTPUT_STRIDE
        image = np.zeros((side, side, 3), dtype=np.uint8)
        try:
            with torch.inference_mode():
                out = self._run([image], (side, side))[0]
                _sync(self.device)
                finite = bool(torch.isfinite(out).all())
        except Exception as e:
            raise RuntimeError(
                f"DCNN warm-up forward on {self.device} failed: {type(e).__name__}: {e}"
            ) from e
        if not finite and self.cfg.autocast == "none":
            raise RuntimeError(f"DCNN warm-up forward on {self.device} gave non-finite float32 logits")
        if self.crf_cfg is not None:
            probs = torch.full((2, 8, 8), 0.5, device=self._crf_device())
            self._refine(
                [np.zeros((8, 8, 3), dtype=np.uint8)], [probs]
            )  # a broken CRF fails the actor here too

    def _run(
        self, images: list[np.ndarray], size: tuple[int, int], *, autocast: str | None = None
    ) -> list[Tensor]:
        return _forward(
            self.model,
            images,
            size,
            device=self.device,
            autocast=self.cfg.autocast if autocast is None else autocast,
            channels_last=self.cfg.channels_last,
        )

    def _forward_rows(
        self, rows: list[int], images: list[np.ndarray], size: tuple[int, int]
    ) -> Iterator[tuple[list[int], list[Tensor] | None, str | None, float]]:
        """Forward ``rows`` (one padded size) -> (rows, outputs or None, error or None, seconds per image) chunks.

        Retries happen after the ``except`` block: while it runs, the exception's traceback holds the failed
        attempt's frames and their device tensors, so memory is freed only once it is left.
        """
        queue = [rows]
        while queue:
            chunk = queue.pop(0)
            start = time.perf_counter()
            kind, message = None, None
            try:
                outs = self._run([images[i] for i in chunk], size)
                if self.cfg.autocast != "none":
                    outs = self._redo_nonfinite(chunk, images, size, outs)
                _sync(self.device)
            except Exception as e:  # classified here, handled below without a reference to ``e``
                kind = "fault" if _is_device_fault(e) else "oom" if _is_oom(e) else "error"
                message = f"{type(e).__name__}: {e}"
                outs = None
            if kind is None:
                yield chunk, outs, None, (time.perf_counter() - start) / len(chunk)
                continue
            if kind == "fault":
                raise DeviceFault(message)
            if kind == "oom":
                _free_memory(self.device)
            if len(chunk) > 1:
                if kind == "oom":
                    half = (len(chunk) + 1) // 2
                    pixels = half * size[0] * size[1]
                    if self.max_batch_pixels is None or pixels < self.max_batch_pixels:
                        log.warning(
                            "dcnn: out of memory at %d images of %dx%d on %s; max_batch_pixels now %d",
                            len(chunk),
                            *size,
                            self.device,
                            pixels,
                        )
                        self.max_batch_pixels = pixels
                    queue[:0] = [chunk[:half], chunk[half:]]
                else:  # isolate the image that fails, keep the others
                    queue[:0] = [[i] for i in chunk]
                continue
            if kind == "oom":
                h, w = images[chunk[0]].shape[:2]
                message = (
                    f"{_OOM_ROW} {h}x{w} image (padded to {size[0]}x{size[1]}) on {self.device}: {message}"
                )
            yield chunk, None, message, 0.0

    def _redo_nonfinite(
        self, chunk: list[int], images: list[np.ndarray], size: tuple[int, int], outs: list[Tensor]
    ) -> list[Tensor]:
        """Images whose reduced-precision logits overflowed (fp16's range ends at 65504) run again in float32."""
        for k, out in enumerate(outs):
            if not bool(torch.isfinite(out).all()):
                log.info(
                    "dcnn: non-finite %s logits for a %dx%d image: redone in float32",
                    self.cfg.autocast,
                    *size,
                )
                outs[k] = self._run([images[chunk[k]]], size, autocast="none")[0]
        return outs

    def _postprocess(self, out: Tensor, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        up = upsample_logits(out, h, w, offset=self.model.upsample_offset)
        # argmax of the upsampled logits = argmax of the upsampled softmax (monotonic per pixel).
        # max(dim=0).indices, not argmax(dim=0): same first-index result, ~3.7x less CPU over the
        # channel dim of a (C, H, W) tensor (36 -> 10 ms at 21x375x500 on one thread, timed 2026-11-30).
        mask = up.max(dim=0).indices.to(torch.uint8).cpu().numpy()
        logits = out.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).half().cpu().numpy()
        return mask, logits

    def _crf_device(self) -> torch.device:
        assert self.crf_cfg is not None
        return self.device if self.crf_cfg.device == "cuda" else torch.device("cpu")

    def _refine(self, images: list[np.ndarray], probs: list[Tensor]) -> list[np.ndarray]:
        from pipeline.stages.crf import refine
        from pipeline.stages.crf_torch import refine_probs_batch

        assert self.crf_cfg is not None
        if (
            self.crf_cfg.backend == "torch"
        ):  # one mean field for the sub-batch: fewer, larger kernels on a GPU
            return refine_probs_batch(images, probs, self.crf_cfg)
        return [refine(image, p.cpu().numpy(), self.crf_cfg) for image, p in zip(images, probs, strict=True)]

    def _crf_rows(
        self, images: list[np.ndarray], outs: list[Tensor]
    ) -> list[tuple[np.ndarray | None, str | None, bool, float]]:
        """Refine a sub-batch on the CRF's device -> per row (mask or None, error, retryable, seconds).

        Starts from the float16 logits the CRF stage would get, so both paths refine the same probabilities. When
        the sub-batch fails as a whole it is redone row by row (after the ``except`` block has let go of its
        tensors), so only the row that fails becomes an error.
        """
        start = time.perf_counter()
        kind, message, masks = None, None, []
        try:
            probs = []
            for image, out in zip(images, outs, strict=True):
                logits = out.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).half().float()
                up = upsample_logits(logits, *image.shape[:2], offset=self.model.upsample_offset)
                probs.append(torch.softmax(up, dim=0).to(self._crf_device()))
            masks = self._refine(images, probs)
        except Exception as e:  # classified here, handled below without a reference to ``e``
            kind = "fault" if _is_device_fault(e) else "oom" if _is_oom(e) else "error"
            message = f"{type(e).__name__}: {e}"
        if kind == "fault":
            raise DeviceFault(message)
        if kind is None:
            per_row = (time.perf_counter() - start) / len(images)
            return [(mask, None, False, per_row) for mask in masks]
        if kind == "oom":
            _free_memory(self.device)
        if len(images) > 1:
            return [self._crf_rows([image], [out])[0] for image, out in zip(images, outs, strict=True)]
        retryable = kind == "oom" or (message is not None and "MemoryError" in message)
        return [(None, message, retryable, time.perf_counter() - start)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            out = self._predict(batch)
        except DeviceFault as e:
            self._restart(batch, e)
            raise
        if self.in_ray_actor:
            counter = _fault_counter(batch)
            if os.path.exists(counter):  # this batch faulted on an earlier actor and is done now
                os.remove(counter)
        return out

    def _restart(self, batch: dict[str, np.ndarray], fault: DeviceFault) -> None:
        """Exit the actor process so Ray retries the block on a fresh one; returns only when it must not."""
        if not self.in_ray_actor:
            return
        ids = [str(x) for x in batch[schema.ID]]
        counter = _fault_counter(batch)
        try:
            with open(counter) as f:
                attempts = int(f.read() or 0) + 1
        except (OSError, ValueError):
            attempts = 1
        if attempts >= MAX_FAULT_RESTARTS:
            log.error(
                "dcnn: device error on %d fresh actors for the same %d rows (first %s): failing the block: %s",
                attempts,
                len(ids),
                ids[:1],
                fault,
            )
            return
        with open(counter, "w") as f:
            f.write(str(attempts))
        log.error(
            "dcnn: persistent device error on %s, node %s (%d rows, first %s, attempt %d): %s; exiting this actor "
            "so Ray restarts it and retries the block",
            self.device,
            self.node_id,
            len(ids),
            ids[:1],
            attempts,
            fault,
        )
        _exit_process(1)

    def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[schema.ID])
        status = np.array([str(s) for s in _rows(batch[schema.STATUS], n)], dtype=object)
        error = schema.object_column(_rows(batch[schema.ERROR], n) if schema.ERROR in batch else [None] * n)
        images = _rows(batch[schema.IMAGE], n)

        empty_logits = np.zeros((0, 0, 0), dtype=np.float16)
        empty_mask = np.zeros((0, 0), dtype=np.uint8)
        logits_col: list[np.ndarray] = [empty_logits] * n
        mask_col: list[np.ndarray] = [empty_mask] * n
        seconds = np.zeros(n, dtype=np.float32)
        crf_mask_col: list[np.ndarray] = [empty_mask] * n  # used when crf_cfg is set
        crf_seconds = np.zeros(n, dtype=np.float64)

        todo = []
        for i in range(n):
            if status[i] != schema.OK:
                continue
            try:
                _check_image(images[i])
                todo.append(i)
            except ValueError as e:
                status[i], error[i] = schema.ErrorKind.DCNN, str(e)

        retryable = schema.retryable_flags(batch)

        def fail(i: int, message: str) -> None:
            log.warning("dcnn failed for %s: %s", batch[schema.ID][i], message)
            status[i], error[i] = schema.ErrorKind.DCNN, message
            # Out of memory is the device's state, not the image's: a re-run (another GPU, fewer neighbours) may
            # fit it. Anything else the model rejects is permanent.
            retryable[i] = message.startswith(_OOM_ROW) or "MemoryError" in message

        with torch.inference_mode():
            for size, idx in _groups(
                [images[i] for i in todo],
                crop_size=self.model.crop_size,
                min_input_size=self.cfg.min_input_size,
                batch_size=self.cfg.batch_size,
                max_batch_pixels=self.max_batch_pixels,
            ):
                rows = [todo[j] for j in idx]
                for chunk, outs, message, forward_s in self._forward_rows(rows, images, size):
                    if outs is None:
                        for i in chunk:
                            fail(i, message)
                        continue
                    ready: list[tuple[int, Tensor]] = []  # rows for the CRF (when it runs here)
                    for i, out in zip(chunk, outs, strict=True):
                        t0 = time.perf_counter()
                        h, w = images[i].shape[:2]
                        kind, message = None, None
                        try:
                            mask_col[i], logits_col[i] = self._postprocess(out, h, w)
                        except Exception as e:
                            kind = "fault" if _is_device_fault(e) else "oom" if _is_oom(e) else "error"
                            message = f"{type(e).__name__}: {e}"
                        if kind == "fault":
                            raise DeviceFault(message)
                        if (
                            kind == "oom"
                        ):  # the full-size upsampling did not fit beside the batch: do it on the CPU
                            _free_memory(self.device)
                            try:
                                mask_col[i], logits_col[i] = self._postprocess(out.cpu(), h, w)
                                kind = None
                            except Exception as e:
                                message = f"{type(e).__name__}: {e}"
                        if kind is not None:
                            fail(i, message)
                            continue
                        seconds[i] = forward_s + time.perf_counter() - t0  # .cpu() above synchronised
                        ready.append((i, out))
                    if self.crf_cfg is None or not ready:
                        continue
                    results = self._crf_rows([images[i] for i, _ in ready], [out for _, out in ready])
                    for (i, _), (mask, message, again, crf_s) in zip(ready, results, strict=True):
                        crf_seconds[i] = crf_s
                        if mask is None:
                            log.warning("CRF failed for %s: %s", batch[schema.ID][i], message)
                            status[i], error[i], retryable[i] = schema.ErrorKind.CRF, message, again
                        else:
                            crf_mask_col[i] = mask

        out_batch = dict(batch)
        out_batch[schema.STATUS] = status
        out_batch[schema.ERROR] = error
        out_batch[schema.RETRYABLE] = retryable
        out_batch[schema.LOGITS] = schema.object_column(logits_col)
        out_batch[schema.UPSAMPLE_OFFSET] = np.full(n, self.model.upsample_offset, dtype=np.int64)
        out_batch[schema.RAW_MASK] = schema.object_column(mask_col)
        out_batch["dcnn_s"] = seconds
        out_batch["dcnn_node"] = np.array([self.node_id] * n, dtype=object)
        if self.crf_cfg is not None:  # the CRF stage's columns; it drops the image and logits, so do we
            del out_batch[schema.LOGITS], out_batch[schema.IMAGE]
            out_batch[schema.MASK] = schema.object_column(crf_mask_col)
            out_batch["crf_s"] = crf_seconds
            out_batch["crf_node"] = np.array([self.node_id] * n, dtype=object)
        return schema.clean_text_columns(out_batch)


def _fault_counter(batch: dict[str, np.ndarray]) -> str:
    """Node-local file counting the device faults of this batch (by its image ids) across actor restarts."""
    digest = hashlib.sha256("\n".join(str(x) for x in batch[schema.ID]).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"deeplab-dcnn-fault-{digest}")


def _set_tf32(allow: bool) -> None:
    """Process-wide: float32 convolutions and matmuls on CUDA as IEEE float32 (``allow=False``) or TF32."""
    precision = "tf32" if allow else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(
        conv, "fp32_precision"
    ):  # torch >= 2.9's API; mixing in the old one warns
        conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    else:
        torch.backends.cudnn.allow_tf32 = allow
        torch.backends.cuda.matmul.allow_tf32 = allow
