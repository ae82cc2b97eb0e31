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
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from pipeline import schema
from pipeline.model.deeplab import OUTPUT_STRIDE, upsample_logits
from pipeline.model.inference import _check_image, _forward, _groups
from pipeline.model.weights import load_checkpoint
from pipeline.stages.crf import CRFConfig
from pipeline.stages.dcnn_config import AUTOCAST, DCNNConfig
from pipeline.stages.devices import (
    _OOM_ROW,
    MAX_FAULT_RESTARTS,
    DeviceFault,
    _exit_process,
    _free_memory,
    _is_device_fault,
    _is_oom,
    _ray_gpu_ids,
    _sync,
    resolve_device,
)
from pipeline.storage import StorageConfig

__all__ = ["DCNNConfig", "DeepLabPredictor"]

log = logging.getLogger(__name__)

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_AUTOCAST_DTYPES = dict(zip(AUTOCAST, (torch.bfloat16, torch.float16), strict=True))


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

    # One function on purpose (~100 lines): one batch's forward and every way a row can fail on it, side by side.
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
