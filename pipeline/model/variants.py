"""The DeepLab v1 variant table (reference section 1): pooling families, the VGG-16 trunk, fc6 geometry, MSc taps,
and the arithmetic on them (receptive field, output stride). Plain Python, no torch: the job's configuration
checks variant names without importing the network (``pipeline/model/deeplab.py`` builds it from this table).
"""

from __future__ import annotations

from dataclasses import dataclass

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
POOL5A = ("pool5a", "avg", 3, 1, 1)  # only in the official LargeFOV prototxts

# Caffe test crop per family: the canonical input that gives 65 (pool3) or 67 (vgg128_noup) features.
CROP_SIZE = {"pool3": 513, "vgg128_noup": 514}

# VGG-16 trunk: (name, out channels, dilation); all 3x3, stride 1, padding = dilation (size preserving).
TRUNK = (
    (("conv1_1", 64, 1), ("conv1_2", 64, 1)),
    (("conv2_1", 128, 1), ("conv2_2", 128, 1)),
    (("conv3_1", 256, 1), ("conv3_2", 256, 1), ("conv3_3", 256, 1)),
    (("conv4_1", 512, 1), ("conv4_2", 512, 1), ("conv4_3", 512, 1)),
    (("conv5_1", 512, 2), ("conv5_2", 512, 2), ("conv5_3", 512, 2)),
)

# MSc taps and the stride of each branch's first conv, so that every branch lands at stride 8.
MSC_TAPS = (("data", 8), ("pool1", 4), ("pool2", 2), ("pool3", 1), ("pool4", 1))
MSC_CHANNELS = 128


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


def pool_defs(spec: VariantSpec) -> tuple[tuple[str, str, int, int, int], ...]:
    return FAMILIES[spec.family] + ((POOL5A,) if spec.pool5a else ())


def layer_geometry(spec: VariantSpec) -> list[tuple[int, int, int, int]]:
    """The trunk + fc6 as (kernel, stride, padding, dilation) in forward order (MSc branches excluded)."""
    layers: list[tuple[int, int, int, int]] = []
    pools = pool_defs(spec)
    for block, pool in zip(TRUNK, pools, strict=False):
        layers += [(3, 1, dilation, dilation) for _, _, dilation in block]
        layers.append((pool[2], pool[3], pool[4], 1))
    layers += [(p[2], p[3], p[4], 1) for p in pools[len(TRUNK) :]]
    layers.append((spec.fc6_kernel, 1, spec.fc6_padding, spec.fc6_dilation))
    return layers


def feature_geometry(spec: VariantSpec) -> tuple[int, int, float]:
    """(theoretical receptive field, output stride, input coordinate of feature 0's centre) by the usual arithmetic."""
    rf, jump, center = 1, 1, 0.0
    for kernel, stride, padding, dilation in layer_geometry(spec):
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
    _, stride, _ = feature_geometry(spec)
    vgg_cell = 2 ** len(FAMILIES[spec.family])  # every VGG-16 pool halves: 5 pools -> 32 px
    return stride * spec.fc6_dilation * (spec.fc6_kernel - 1) + vgg_cell


# --- upsampling geometry ----------------------------------------------------------------------------------------

OUTPUT_STRIDE = 8  # every DeepLab v1 variant scores at stride 8 (pool4/pool5 stride 1, atrous conv5/fc6)


def upsampled_size(h: int, w: int, height: int, width: int, offset: int) -> tuple[int, int]:
    """Caffe Interp's x8 size with align_corners, 8 * (h - 1) + 1 by 8 * (w - 1) + 1, checked to cover the crop
    [offset : offset + height, offset : offset + width]; raises ValueError otherwise."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    up_h, up_w = OUTPUT_STRIDE * (h - 1) + 1, OUTPUT_STRIDE * (w - 1) + 1
    if up_h < offset + height or up_w < offset + width:
        raise ValueError(
            f"logits {h}x{w} upsample to {up_h}x{up_w}, too small for a {height}x{width} crop at offset {offset}: "
            f"need at least {offset + height}x{offset + width}"
        )
    return up_h, up_w
