"""Where the DCNN actor runs: the device Ray gave it, out-of-memory and persistent device faults told apart."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import torch

__all__ = ["DeviceFault", "resolve_device", "MAX_FAULT_RESTARTS"]

log = logging.getLogger(__name__)

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
