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
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

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

OUTPUT_STRIDE = 8  # every DeepLab v1 variant scores at stride 8 (pool4/pool5 stride 1, atrous conv5/fc6)

# Caffe Interp upsamples by this factor with align_corners semantics: h -> 8 * (h - 1) + 1.
_UPSAMPLE_FACTOR = OUTPUT_STRIDE


def upsample_logits(logits: Tensor, height: int, width: int, *, offset: int = 0) -> Tensor:
    """Caffe ``Interp`` + crop: stride-8 scores (C, h, w) or (N, C, h, w) -> (..., height, width), float32.

    Bilinear x8 with ``align_corners=True`` to ``8 * (h - 1) + 1`` (65 -> 513), then the crop
    ``[offset : offset + height, offset : offset + width]`` (top-left for the pool3 family, offset 7 for
    vgg128_noup). Because the factor is exactly 8, upsampling only the first rows/columns of the logits gives the
    same values as upsampling all of them: callers may pass logits already cropped to what this crop needs.
    """
    if logits.dim() not in (3, 4):
        raise ValueError(f"logits must be (C, h, w) or (N, C, h, w), got shape {tuple(logits.shape)}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    squeeze = logits.dim() == 3
    x = logits.unsqueeze(0) if squeeze else logits
    h, w = x.shape[-2:]
    up_h, up_w = _UPSAMPLE_FACTOR * (h - 1) + 1, _UPSAMPLE_FACTOR * (w - 1) + 1
    if up_h < offset + height or up_w < offset + width:
        raise ValueError(
            f"logits {h}x{w} upsample to {up_h}x{up_w}, too small for a {height}x{width} crop at offset {offset}: "
            f"need at least {offset + height}x{offset + width}"
        )
    # float32: half-precision bilinear is not available on every CPU build and the CRF wants float32 anyway.
    x = x.float()
    if (up_h, up_w) != (h, w):
        x = F.interpolate(x, size=(up_h, up_w), mode="bilinear", align_corners=True)
    x = x[..., offset : offset + height, offset : offset + width]
    return x[0] if squeeze else x


# --- variant registry -------------------------------------------------------------------------------------------

# Pooling layers per family as (name, kind, kernel, stride, padding); every pool uses Caffe's ceil rounding.
FAMILIES: dict[str, tuple[tuple[str, str, int, int, int], ...]] = {
    "vgg128_noup": (
        ("pool1", "max", 2, 2, 1),
        ("pool2", "max", 2, 2, 1),
        ("pool3", "max", 2, 2, 1),
        ("pool4", "max", 2, 1, 1),
        ("pool5", "max", 3, 1, 1),
    ),
    "pool3": (
        ("pool1", "max", 3, 2, 1),
        ("pool2", "max", 3, 2, 1),
        ("pool3", "max", 3, 2, 1),
        ("pool4", "max", 3, 1, 1),
        ("pool5", "max", 3, 1, 1),
    ),
}
_POOL5A = ("pool5a", "avg", 3, 1, 1)  # only in the official LargeFOV prototxts

# Caffe test crop per family: the canonical input that gives 65 (pool3) or 67 (vgg128_noup) features.
_CROP_SIZE = {"pool3": 513, "vgg128_noup": 514}

# VGG-16 trunk: (name, out channels, dilation); all 3x3, stride 1, padding = dilation (size preserving).
_TRUNK = (
    (("conv1_1", 64, 1), ("conv1_2", 64, 1)),
    (("conv2_1", 128, 1), ("conv2_2", 128, 1)),
    (("conv3_1", 256, 1), ("conv3_2", 256, 1), ("conv3_3", 256, 1)),
    (("conv4_1", 512, 1), ("conv4_2", 512, 1), ("conv4_3", 512, 1)),
    (("conv5_1", 512, 2), ("conv5_2", 512, 2), ("conv5_3", 512, 2)),
)

# MSc taps and the stride of each branch's first conv, so that every branch lands at stride 8.
_MSC_TAPS = (("data", 8), ("pool1", 4), ("pool2", 2), ("pool3", 1), ("pool4", 1))
_MSC_CHANNELS = 128


@dataclass(frozen=True)
class VariantSpec:
    """One DeepLab v1 variant: pooling family, fc6 geometry, fc width, pool5a and MSc branches."""

    family: str  # key of FAMILIES
    fc6_kernel: int
    fc6_dilation: int
    fc6_padding: int
    fc_channels: int  # fc6/fc7 width at width=1.0
    pool5a: bool
    msc: bool


_REGISTRY: dict[str, VariantSpec] = {
    "deeplab": VariantSpec("vgg128_noup", 4, 4, 6, 4096, pool5a=False, msc=False),
    "deeplab-msc": VariantSpec("pool3", 4, 4, 6, 4096, pool5a=False, msc=True),
    "deeplab-7x7": VariantSpec("vgg128_noup", 7, 4, 12, 4096, pool5a=False, msc=False),
    "deeplab-4x4": VariantSpec("vgg128_noup", 4, 8, 12, 4096, pool5a=False, msc=False),
    "deeplab-largefov": VariantSpec("pool3", 3, 12, 12, 1024, pool5a=True, msc=False),
    "deeplab-msc-largefov": VariantSpec("pool3", 3, 12, 12, 1024, pool5a=True, msc=True),
}

VARIANTS: tuple[str, ...] = tuple(_REGISTRY)


def variant_spec(variant: str) -> VariantSpec:
    try:
        return _REGISTRY[variant]
    except KeyError:
        raise ValueError(
            f"unknown DeepLab variant {variant!r}; expected one of {', '.join(VARIANTS)}"
        ) from None


def _pool_defs(spec: VariantSpec) -> tuple[tuple[str, str, int, int, int], ...]:
    return FAMILIES[spec.family] + ((_POOL5A,) if spec.pool5a else ())


def _layer_geometry(spec: VariantSpec) -> list[tuple[int, int, int, int]]:
    """The trunk + fc6 as (kernel, stride, padding, dilation) in forward order (MSc branches excluded)."""
    layers: list[tuple[int, int, int, int]] = []
    pools = _pool_defs(spec)
    for block, pool in zip(_TRUNK, pools, strict=False):
        layers += [(3, 1, dilation, dilation) for _, _, dilation in block]
        layers.append((pool[2], pool[3], pool[4], 1))
    layers += [(p[2], p[3], p[4], 1) for p in pools[len(_TRUNK) :]]
    layers.append((spec.fc6_kernel, 1, spec.fc6_padding, spec.fc6_dilation))
    return layers


def _feature_geometry(spec: VariantSpec) -> tuple[int, int, float]:
    """(theoretical receptive field, output stride, input coordinate of feature 0's centre) by the usual arithmetic."""
    rf, jump, center = 1, 1, 0.0
    for kernel, stride, padding, dilation in _layer_geometry(spec):
        span = dilation * (kernel - 1)
        rf += span * jump
        center += (span / 2 - padding) * jump
        jump *= stride
    return rf, jump, center


def receptive_field(variant: str) -> int:
    """fc6's field of view in pixels as the paper's Table 2 measures it (224 / 128 / 224 / 224).

    The paper counts on the grid of the original VGG-16, whose pool5 cells are 2**num_pools = 32 px (its 7x7 fc6
    sees 7 * 32 = 224 px, the ImageNet crop): an atrous fc6 with kernel k and dilation d at output stride s spans
    s * d * (k - 1) px between its outer taps, plus one such cell. (The theoretical receptive field of the whole
    stack is much larger, e.g. 435 px for LargeFOV; it is not what Table 2 reports.)
    """
    spec = variant_spec(variant)
    _, stride, _ = _feature_geometry(spec)
    vgg_cell = 2 ** len(FAMILIES[spec.family])  # every VGG-16 pool halves: 5 pools -> 32 px
    return stride * spec.fc6_dilation * (spec.fc6_kernel - 1) + vgg_cell


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
        self.crop_size = _CROP_SIZE[spec.family]
        rf, stride, center = _feature_geometry(spec)
        assert stride == OUTPUT_STRIDE, f"{variant}: output stride {stride}, expected {OUTPUT_STRIDE}"
        self.output_stride = stride
        # Feature j is centred at input 8j + center; Caffe crops floor(-center) (7 for vgg128_noup, 0 for pool3).
        self.upsample_offset = math.floor(-center)

        layers: list[tuple[str, nn.Module]] = []
        tap_channels = {"data": 3}
        in_ch = 3
        pools = _pool_defs(spec)
        for block, (pname, kind, k, s, p) in zip(_TRUNK, pools, strict=False):
            for name, out, dilation in block:
                out = _scaled(out, width)
                layers.append((name, nn.Conv2d(in_ch, out, 3, padding=dilation, dilation=dilation)))
                layers.append((name.replace("conv", "relu"), nn.ReLU(inplace=True)))
                in_ch = out
            layers.append((pname, _pool(kind, k, s, p)))
            tap_channels[pname] = in_ch
        for pname, kind, k, s, p in pools[len(_TRUNK) :]:
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
            hidden = _scaled(_MSC_CHANNELS, width)
            self.msc = nn.ModuleDict(
                {tap: _MScBranch(tap_channels[tap], s, hidden, num_classes) for tap, s in _MSC_TAPS}
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
