"""The DCNN stage's settings: ``DCNNConfig`` (which weights, where to run, how to batch), checked on creation.
Plain Python, no torch: the job's configuration is built and checked before anything imports the network."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AUTOCAST", "DCNNConfig"]

AUTOCAST = ("bf16", "fp16")  # dcnn.autocast's values besides "none" (dcnn.py maps them to torch dtypes)


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
        if self.autocast not in ("none", *AUTOCAST):
            raise ValueError(f"dcnn.autocast must be none, bf16 or fp16, got {self.autocast!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"dcnn.num_threads must be >= 1 or None, got {self.num_threads}")
        if self.max_batch_pixels is not None and self.max_batch_pixels < 1:
            raise ValueError(f"dcnn.max_batch_pixels must be >= 1 or None, got {self.max_batch_pixels}")
