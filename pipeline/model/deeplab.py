"""DCNN stage, the network itself: DeepLab v1 variants (atrous VGG-16) in plain PyTorch, plus the Caffe upsampling.

No Ray and no I/O here: weights come from ``pipeline/model/weights.py``, pre/post-processing from ``pipeline/stages/dcnn.py``.
The spec is ``docs/deeplab-v1-reference.md`` (section 1, section 2 for the upsampling). Every variant returns
stride-8 logits; ``upsample_logits`` turns them into image-sized scores exactly as Caffe's ``Interp`` + crop did.

Two pooling families exist in the authors' Caffe release:

* ``vgg128_noup`` ("DeepLab"): pool1..3 max k2 s2 p1, pool4 max k2 s1 p1 (the test-time padding; Caffe's training
  prototxt used p0, we keep p1 in both modes so the geometry never changes), pool5 max k3 s1 p1. Canonical input
  514 -> 67 features; a feature sits 7.5 px up/left of its upsampled position, hence ``upsample_offset == 7``.
* ``pool3`` (DeepLab-MSc, LargeFOV, MSc-LargeFOV): pool1..3 max k3 s2 p1, pool4/pool5 max k3 s1 p1, plus pool5a
  (avg k3 s1 p1, count padding) in the LargeFOV files. Canonical input 513 -> 65 features, offset 0.

The paper-only DeepLab-7x7 and DeepLab-4x4 have no official prototxt. We build them on the ``vgg128_noup`` family:
the paper's Table 2 presents both as changes of DeepLab's fc6 alone, and DeepLab-4x4 trains exactly as fast as
DeepLab (2.90 img/s) with the same parameter count, i.e. the same trunk.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.variants import (
    CROP_SIZE,
    FAMILIES,
    MSC_CHANNELS,
    MSC_TAPS,
    OUTPUT_STRIDE,
    TRUNK,
    VARIANTS,
    VariantSpec,
    feature_geometry,
    pool_defs,
    receptive_field,
    upsampled_size,
    variant_spec,
)

__all__ = [
    "VARIANTS",
    "FAMILIES",
    "VariantSpec",
    "DeepLab",
    "build_model",
    "variant_spec",
    "receptive_field",
    "upsample_logits",
    "OUTPUT_STRIDE",
]


def upsample_logits(logits: Tensor, height: int, width: int, *, offset: int = 0) -> Tensor:
    """Caffe ``Interp`` + crop: stride-8 scores (C, h, w) or (N, C, h, w) -> (..., height, width), float32.

    Bilinear x8 with ``align_corners=True`` to ``8 * (h - 1) + 1`` (65 -> 513), then the crop
    ``[offset : offset + height, offset : offset + width]`` (top-left for the pool3 family, offset 7 for
    vgg128_noup). Because the factor is exactly 8, upsampling only the first rows/columns of the logits gives the
    same values as upsampling all of them: callers may pass logits already cropped to what this crop needs.
    """
    if logits.dim() not in (3, 4):
        raise ValueError(f"logits must be (C, h, w) or (N, C, h, w), got shape {tuple(logits.shape)}")
    squeeze = logits.dim() == 3
    x = logits.unsqueeze(0) if squeeze else logits
    h, w = x.shape[-2:]
    up_h, up_w = upsampled_size(h, w, height, width, offset)
    # float32: half-precision bilinear is not available on every CPU build and the CRF wants float32 anyway.
    x = x.float()
    if (up_h, up_w) != (h, w):
        x = F.interpolate(x, size=(up_h, up_w), mode="bilinear", align_corners=True)
    x = x[..., offset : offset + height, offset : offset + width]
    return x[0] if squeeze else x


# --- modules ----------------------------------------------------------------------------------------------------


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _pool(kind: str, kernel: int, stride: int, padding: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(kernel, stride, padding, ceil_mode=True)
    # Caffe AVE pooling divides by the full window, padding included, as count_include_pad=True does.
    return nn.AvgPool2d(kernel, stride, padding, ceil_mode=True, count_include_pad=True)


class _MScBranch(nn.Sequential):
    """One multi-scale branch: conv 3x3 (stride to land at stride 8) -> 1x1 -> 1x1 scores; Caffe names tap_conv/fc/ms."""

    def __init__(self, in_channels: int, stride: int, hidden: int, num_classes: int) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, hidden, 3, stride=stride, padding=1),
                relu1=nn.ReLU(inplace=True),
                drop1=nn.Dropout(0.5),
                fc=nn.Conv2d(hidden, hidden, 1),
                relu2=nn.ReLU(inplace=True),
                drop2=nn.Dropout(0.5),
                ms=nn.Conv2d(hidden, num_classes, 1),
            )
        )


class DeepLab(nn.Module):
    """A DeepLab v1 network. ``forward(x)``: (N, 3, H, W) mean-subtracted BGR -> (N, num_classes, h, w) at stride 8.

    Build it with ``build_model``. State-dict keys follow the Caffe layer names (``features.conv1_1.weight``,
    ``classifier.fc6.weight``, ``msc.pool1.conv.weight``) so the Caffe import is a plain name mapping.
    """

    def __init__(self, variant: str, spec: VariantSpec, *, num_classes: int, width: float) -> None:
        super().__init__()
        self.variant = variant
        self.spec = spec
        self.num_classes = num_classes
        self.width = width
        self.family = spec.family
        self.crop_size = CROP_SIZE[spec.family]
        rf, stride, center = feature_geometry(spec)
        assert stride == OUTPUT_STRIDE, f"{variant}: output stride {stride}, expected {OUTPUT_STRIDE}"
        self.output_stride = stride
        # Feature j is centred at input 8j + center; Caffe crops floor(-center) (7 for vgg128_noup, 0 for pool3).
        self.upsample_offset = math.floor(-center)

        layers: list[tuple[str, nn.Module]] = []
        tap_channels = {"data": 3}
        in_ch = 3
        pools = pool_defs(spec)
        for block, (pname, kind, k, s, p) in zip(TRUNK, pools, strict=False):
            for name, out, dilation in block:
                out = _scaled(out, width)
                layers.append((name, nn.Conv2d(in_ch, out, 3, padding=dilation, dilation=dilation)))
                layers.append((name.replace("conv", "relu"), nn.ReLU(inplace=True)))
                in_ch = out
            layers.append((pname, _pool(kind, k, s, p)))
            tap_channels[pname] = in_ch
        for pname, kind, k, s, p in pools[len(TRUNK) :]:
            layers.append((pname, _pool(kind, k, s, p)))
        self.features = nn.Sequential(OrderedDict(layers))

        fc = _scaled(spec.fc_channels, width)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Conv2d(
                    in_ch, fc, spec.fc6_kernel, padding=spec.fc6_padding, dilation=spec.fc6_dilation
                ),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout(0.5),
                fc7=nn.Conv2d(fc, fc, 1),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout(0.5),
                fc8=nn.Conv2d(fc, num_classes, 1),
            )
        )
        self.msc: nn.ModuleDict | None = None
        if spec.msc:
            hidden = _scaled(MSC_CHANNELS, width)
            self.msc = nn.ModuleDict(
                {tap: _MScBranch(tap_channels[tap], s, hidden, num_classes) for tap, s in MSC_TAPS}
            )
        self._init_weights()

    def _init_weights(self) -> None:
        # Trunk, fc6, fc7: the reference leaves them to the VGG-16 init (weights.vgg16_init) or a checkpoint; for a
        # model trained from scratch we use torchvision VGG's choice (Kaiming normal, fan_out, bias 0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # Reference init: fc8 N(0, 0.01); MSc branch convs N(0, 0.001) (pool4_fc 0.005), branch scores N(0, 0.01).
        nn.init.normal_(self.classifier.fc8.weight, std=0.01)
        if self.msc is not None:
            for tap, branch in self.msc.items():
                nn.init.normal_(branch.conv.weight, std=0.001)
                nn.init.normal_(branch.fc.weight, std=0.005 if tap == "pool4" else 0.001)
                nn.init.normal_(branch.ms.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 3, H, W) float, BGR minus the Caffe mean
        if self.msc is not None:
            x = self._pad_for_msc(x)
        taps: dict[str, Tensor] = {"data": x}
        for name, layer in self.features.named_children():
            x = layer(x)
            if self.msc is not None and name in self.msc:
                taps[name] = x
        out = self.classifier(x)  # (N, C, h, w), stride 8
        if self.msc is not None:
            for tap, branch in self.msc.items():
                out = out + branch(taps[tap])  # the paper's 640-channel concat + classifier, as a sum
        return out

    def _pad_for_msc(self, x: Tensor) -> Tensor:
        # The stride-8 branch convs round down where the ceil-mode trunk rounds up; they agree only for sizes
        # 8k + 1 (Caffe only ever fed 321 and 513). Pad bottom/right with 0 (= the mean, as Caffe pads) to the next
        # such size, which leaves the logits' size what the trunk alone would give.
        h, w = x.shape[-2:]
        pad_h, pad_w = (-(h - 1)) % OUTPUT_STRIDE, (-(w - 1)) % OUTPUT_STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, num_classes={self.num_classes}, width={self.width}, "
            f"crop_size={self.crop_size}, upsample_offset={self.upsample_offset}"
        )


def build_model(variant: str, *, num_classes: int = 21, width: float = 1.0) -> DeepLab:
    """Build a DeepLab v1 variant (see ``VARIANTS``). ``width`` scales every channel count (tiny test/demo models)."""
    spec = variant_spec(variant)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive finite number, got {width}")
    return DeepLab(variant, spec, num_classes=num_classes, width=float(width))
