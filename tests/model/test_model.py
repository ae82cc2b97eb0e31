"""Tests for pipeline/model/deeplab.py: every variant, stride-8 geometry, parameter counts, receptive fields, upsampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.model.deeplab import VARIANTS, DeepLab, build_model, receptive_field, upsample_logits

torch.set_num_threads(1)

TINY = 1 / 16
POOL3 = ("deeplab-msc", "deeplab-largefov", "deeplab-msc-largefov")
NOUP = ("deeplab", "deeplab-7x7", "deeplab-4x4")

# Reference counts at 21 classes (docs/deeplab-v1-reference.md, re-derived from the prototxts).
PARAMS_21 = {
    "deeplab": 65_140_565,
    "deeplab-7x7": 134_346_581,
    "deeplab-4x4": 65_140_565,
    "deeplab-largefov": 20_505_429,
}
MSC_EXTRA = 1_206_121
PARAMS_21["deeplab-msc"] = PARAMS_21["deeplab"] + MSC_EXTRA
PARAMS_21["deeplab-msc-largefov"] = PARAMS_21["deeplab-largefov"] + MSC_EXTRA

# The paper's Table 2 (RF of the base network; MSc adds branches, not field of view).
PAPER_RF = {
    "deeplab-7x7": 224,
    "deeplab": 128,
    "deeplab-4x4": 224,
    "deeplab-largefov": 224,
    "deeplab-msc": 128,
    "deeplab-msc-largefov": 224,
}


def tiny(variant: str, **kw) -> DeepLab:
    torch.manual_seed(0)
    return build_model(variant, width=TINY, **kw).eval()


def test_registry_names():
    assert set(VARIANTS) == set(PARAMS_21)
    with pytest.raises(ValueError, match="unknown DeepLab variant 'deeplab-v2'"):
        build_model("deeplab-v2")


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_match_reference(variant):
    with torch.device("meta"):  # no memory, no init cost: counting needs no forward
        model = build_model(variant)
    assert sum(p.numel() for p in model.parameters()) == PARAMS_21[variant]


def test_msc_branch_parameter_count():
    with torch.device("meta"):
        model = build_model("deeplab-msc-largefov")
    assert model.msc is not None
    assert sum(p.numel() for p in model.msc.parameters()) == MSC_EXTRA


@pytest.mark.parametrize("variant", VARIANTS)
def test_receptive_field_matches_paper(variant):
    assert receptive_field(variant) == PAPER_RF[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_on_small_input(variant):
    model = tiny(variant, num_classes=5)
    x = torch.randn(2, 3, 57, 43)
    with torch.no_grad():
        out = model(x)
    assert out.shape[:2] == (2, 5)
    assert torch.isfinite(out).all()
    assert model.variant == variant and model.num_classes == 5 and model.width == TINY
    # the stride-8 grid covers the image after upsampling and cropping at the model's offset
    h, w = out.shape[-2:]
    assert 8 * (h - 1) + 1 >= model.upsample_offset + 57 and 8 * (w - 1) + 1 >= model.upsample_offset + 43


@pytest.mark.parametrize(
    ("size", "expected"),
    [(321, 41), (513, 65), (320, 41), (322, 42), (306, 40), (65, 9), (64, 9), (1, 1)],
)
def test_pool3_family_stride8_sizes(size, expected):
    model = tiny("deeplab-largefov")
    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size + 8))
    assert tuple(out.shape[-2:]) == (expected, expected + 1)


@pytest.mark.parametrize(("size", "expected"), [(514, 67), (513, 66), (321, 42), (306, 41), (66, 11)])
def test_vgg128_noup_stride8_sizes(size, expected):
    # Test-time pool4 padding (p1): 514 -> 67 as in the reference (306 -> 39 is the p0 training net).
    model = tiny("deeplab")
    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size))
    assert tuple(out.shape[-2:]) == (expected, expected)


@pytest.mark.parametrize("size", [321, 320, 100, 513])
def test_msc_odd_and_even_sizes_match_single_scale_geometry(size):
    msc, base = tiny("deeplab-msc-largefov"), tiny("deeplab-largefov")
    x = torch.randn(1, 3, size, size - 3)
    with torch.no_grad():
        assert msc(x).shape == base(x).shape


def test_family_attributes():
    for v in POOL3:
        m = tiny(v)
        assert (m.crop_size, m.upsample_offset, m.output_stride) == (513, 0, 8)
    for v in NOUP:
        m = tiny(v)
        assert (m.crop_size, m.upsample_offset, m.output_stride) == (514, 7, 8)
    # Caffe crop geometry: 514 -> 67 -> 529 = 7 + 514 + 8; 513 -> 65 -> 513
    assert 8 * (67 - 1) + 1 == 7 + 514 + 8


def test_layer_definitions():
    lfov = tiny("deeplab-largefov")
    assert lfov.features.pool1.kernel_size == 3 and lfov.features.pool1.stride == 2
    assert lfov.features.pool1.ceil_mode
    assert isinstance(lfov.features.pool5a, nn.AvgPool2d) and lfov.features.pool5a.count_include_pad
    fc6 = lfov.classifier.fc6
    assert (fc6.kernel_size, fc6.dilation, fc6.padding) == ((3, 3), (12, 12), (12, 12))
    for name in ("conv5_1", "conv5_2", "conv5_3"):
        conv = getattr(lfov.features, name)
        assert conv.dilation == (2, 2) and conv.padding == (2, 2)
    assert lfov.features.conv4_3.dilation == (1, 1)

    dl = tiny("deeplab")
    assert dl.features.pool1.kernel_size == 2 and dl.features.pool4.stride == 1
    assert not hasattr(dl.features, "pool5a")
    assert (dl.classifier.fc6.kernel_size, dl.classifier.fc6.dilation) == ((4, 4), (4, 4))
    assert tiny("deeplab-7x7").classifier.fc6.kernel_size == (7, 7)
    assert tiny("deeplab-4x4").classifier.fc6.dilation == (8, 8)
    assert not hasattr(tiny("deeplab-msc").features, "pool5a")


def test_dropout_is_elementwise():
    model = tiny("deeplab-msc-largefov")
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)]
    assert len(drops) == 2 + 5 * 2
    assert all(type(m) is nn.Dropout and m.p == 0.5 for m in drops)
    # in train mode the mask varies inside a channel (Dropout2d would zero whole channels)
    model.train()
    x = torch.ones(1, 8, 16, 16)
    y = model.classifier.drop6(x)
    per_channel = (y == 0).float().mean(dim=(2, 3))
    assert ((per_channel > 0) & (per_channel < 1)).any()


def test_no_relu_after_scores():
    model = tiny("deeplab-msc")
    names = [n for n, _ in model.classifier.named_children()]
    assert names[-1] == "fc8"
    assert all(list(b.named_children())[-1][0] == "ms" for b in model.msc.values())


def test_msc_branches_are_summed_with_fc8():
    msc, base = tiny("deeplab-msc-largefov"), tiny("deeplab-largefov")
    base.load_state_dict({k: v for k, v in msc.state_dict().items() if not k.startswith("msc.")})
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        branches = sum(branch(t) for branch, t in _branch_inputs(msc, x))
        assert torch.allclose(msc(x), base(x) + branches, atol=1e-5)
        for branch in msc.msc.values():
            branch.ms.weight.zero_()
            branch.ms.bias.zero_()
        assert torch.allclose(msc(x), base(x), atol=1e-6)


def _branch_inputs(model, x):
    taps = {"data": x}
    for name, layer in model.features.named_children():
        x = layer(x)
        taps[name] = x
    return [(branch, taps[tap]) for tap, branch in model.msc.items()]


def test_msc_branch_strides_land_at_stride8():
    model = tiny("deeplab-msc")
    strides = {tap: b.conv.stride[0] for tap, b in model.msc.items()}
    assert strides == {"data": 8, "pool1": 4, "pool2": 2, "pool3": 1, "pool4": 1}


def test_init_follows_reference():
    torch.manual_seed(0)
    model = build_model("deeplab-msc-largefov", width=0.5)
    fc8 = model.classifier.fc8
    assert abs(fc8.weight.std().item() - 0.01) < 0.002 and fc8.bias.abs().max().item() == 0
    assert abs(model.msc["pool4"].fc.weight.std().item() - 0.005) < 0.0005
    assert abs(model.msc["pool1"].fc.weight.std().item() - 0.001) < 0.0002
    assert abs(model.msc["pool2"].conv.weight.std().item() - 0.001) < 0.0002
    assert abs(model.msc["data"].ms.weight.std().item() - 0.01) < 0.003


def test_width_scales_channels_and_keeps_at_least_one():
    m = build_model("deeplab-largefov", width=0.5)
    assert m.features.conv1_1.out_channels == 32 and m.classifier.fc6.out_channels == 512
    m = build_model("deeplab-msc", width=1e-4, num_classes=3)
    assert m.features.conv5_3.out_channels == 1 and m.classifier.fc7.out_channels == 1
    assert m.msc["pool1"].conv.out_channels == 1
    with torch.no_grad():
        assert m.eval()(torch.zeros(1, 3, 17, 17)).shape == (1, 3, 3, 3)
    with pytest.raises(ValueError, match="width"):
        build_model("deeplab", width=0)
    with pytest.raises(TypeError):
        build_model("deeplab", 21)  # keyword-only


def test_upsample_logits_caffe_interp():
    logits = torch.randn(2, 4, 65, 65)
    up = upsample_logits(logits, 513, 513)
    assert up.shape == (2, 4, 513, 513) and up.dtype == torch.float32
    # align_corners=True with factor 8: every 8th pixel is a source value, midpoints are averages
    assert torch.allclose(up[..., ::8, ::8], logits, atol=1e-6)
    mid = (logits[..., 0, 0] + logits[..., 0, 1]) / 2
    assert torch.allclose(up[..., 0, 4], mid, atol=1e-6)
    # top-left crop, 3-D input
    small = upsample_logits(logits[0], 500, 321)
    assert small.shape == (4, 500, 321)
    assert torch.allclose(small, up[0, :, :500, :321], atol=1e-6)


def test_upsample_logits_offset_and_cropped_logits():
    logits = torch.randn(3, 67, 67)
    up = upsample_logits(logits, 514, 514, offset=7)
    assert up.shape == (3, 514, 514)
    full = torch.nn.functional.interpolate(
        logits[None], size=(529, 529), mode="bilinear", align_corners=True
    )[0]
    assert torch.equal(up, full[:, 7:521, 7:521])
    # only the first rows/cols needed for a 100x50 crop: same values as from the full logits
    part = upsample_logits(logits[:, :15, :8], 100, 50, offset=7)
    assert torch.allclose(part, full[:, 7:107, 7:57], atol=1e-6)
    with pytest.raises(ValueError, match="need at least 107x57"):
        upsample_logits(logits[:, :14, :8], 100, 50, offset=7)


def test_upsample_logits_half_input():
    logits = torch.randn(2, 5, 5).half()
    up = upsample_logits(logits, 33, 33)
    assert up.dtype == torch.float32
    assert torch.allclose(up[:, ::8, ::8], logits.float())
