"""Tests for pipeline/model/weights.py: checkpoints (local and S3), safety, Caffe v1 import from hand-written wire bytes,
VGG-16 initialisation."""

from __future__ import annotations

import hashlib
import io
import struct

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.model.deeplab import build_model
from pipeline.model.weights import (
    CAFFE_MEAN_BGR,
    VOC_CLASSES,
    CheckpointError,
    caffe_state_dict,
    checkpoint_digest,
    import_caffe,
    load_checkpoint,
    load_checkpoint_bytes,
    read_caffemodel,
    save_checkpoint,
    vgg16_init,
)

torch.set_num_threads(1)

TINY = 1 / 16


def tiny(variant: str = "deeplab-largefov", **kw):
    torch.manual_seed(0)
    return build_model(variant, width=TINY, **kw).eval()


# --- a minimal protobuf wire-format writer, independent of pipeline/model/weights.py ---------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def f_varint(field: int, n: int) -> bytes:
    return key(field, 0) + varint(n)


def f_bytes(field: int, payload: bytes) -> bytes:
    return key(field, 2) + varint(len(payload)) + payload


def blob_proto(array: np.ndarray, *, packed: bool = True) -> bytes:
    """BlobProto: num 1, channels 2, height 3, width 4 (4-D, left-padded with 1s), data 5 float32."""
    shape = (1,) * (4 - array.ndim) + tuple(array.shape)
    msg = b"".join(f_varint(i + 1, d) for i, d in enumerate(shape))
    flat = np.ascontiguousarray(array, dtype="<f4").ravel()
    if packed:
        msg += f_bytes(5, flat.tobytes())
    else:
        msg += b"".join(key(5, 5) + struct.pack("<f", v) for v in flat.tolist())
    return msg


def v1_layer(name: str, type_id: int, blobs: list[np.ndarray], *, packed: bool = True) -> bytes:
    """V1LayerParameter: name 4, type 5 (enum), blobs 6; plus a bottom (2) string Caffe writes too."""
    msg = f_bytes(2, b"bottom") + f_bytes(4, name.encode()) + f_varint(5, type_id)
    return msg + b"".join(f_bytes(6, blob_proto(b, packed=packed)) for b in blobs)


CONVOLUTION, RELU, POOLING = 4, 18, 17


def caffe_net(layers: list[tuple[str, list[np.ndarray]]], *, packed: bool = True) -> bytes:
    """NetParameter: name 1, layers 2 (old V1 format). Weightless layers interleaved like a real prototxt."""
    out = f_bytes(1, b"deeplab")
    for name, blobs in layers:
        out += f_bytes(2, v1_layer(name, CONVOLUTION, blobs, packed=packed))
        out += f_bytes(2, v1_layer(name.replace("conv", "relu"), RELU, []))
    return out


def caffe_layers_for(model, *, fc8_name: str = "fc8_voc12", msc_suffix: str = "") -> list:
    """Caffe layer names and random blobs (weight (n, c, h, w), bias (1, 1, 1, n)) in the model's shapes."""
    rng = np.random.default_rng(1)
    layers = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Conv2d):
            continue
        parts = name.split(".")
        if parts[0] == "features":
            caffe_name = parts[1]
        elif parts[0] == "classifier":
            caffe_name = fc8_name if parts[1] == "fc8" else parts[1]
        else:
            caffe_name = f"{parts[1]}_{parts[2]}{msc_suffix}"
        w = rng.standard_normal(tuple(mod.weight.shape), dtype=np.float32) * 0.05
        b = rng.standard_normal(mod.bias.shape[0], dtype=np.float32).reshape(1, 1, 1, -1) * 0.05
        layers.append((caffe_name, [w, b]))
    return layers


def test_wire_writer_sanity():
    # 300 -> ac 02, the protobuf docs' example
    assert varint(300) == b"\xac\x02" and key(2, 2) == b"\x12"


def test_caffe_import_bit_exact_and_same_forward(tmp_path):
    variant = "deeplab-msc-largefov"
    model = tiny(variant)
    layers = caffe_layers_for(model, msc_suffix="_ms1")
    path = tmp_path / "net.caffemodel"
    path.write_bytes(caffe_net(layers))

    meta = import_caffe(str(path), variant=variant, output_uri=str(tmp_path / "out.pt"), width=TINY)
    assert meta["variant"] == variant and meta["num_classes"] == 21
    assert meta["class_names"] == list(VOC_CLASSES)
    assert meta["provenance"]["caffemodel_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    imported, _ = load_checkpoint(str(tmp_path / "out.pt"), expected_variant=variant)

    state = imported.state_dict()
    for caffe_name, (w, b) in layers:
        if caffe_name.startswith("conv"):
            prefix = f"features.{caffe_name}"
        elif caffe_name.startswith("fc"):
            prefix = f"classifier.{caffe_name[:3]}"
        else:
            tap, kind = caffe_name.split("_")[:2]
            prefix = f"msc.{tap}.{kind}"
        assert np.array_equal(state[f"{prefix}.weight"].numpy(), w)  # bit for bit
        assert np.array_equal(state[f"{prefix}.bias"].numpy(), b.ravel())

    # the same weights loaded directly give the same forward output
    direct = tiny(variant)
    with torch.no_grad():
        for name, mod in direct.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.copy_(state[f"{name}.weight"])
                mod.bias.copy_(state[f"{name}.bias"])
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(imported(x), direct(x))


def test_caffe_import_full_width_largefov(tmp_path):
    # The released variant at its real size (82 MB of float32 data), as `deeplab import-caffe` would see it.
    torch.manual_seed(0)
    ref = build_model("deeplab-largefov").eval()
    layers = caffe_layers_for(ref)
    path = tmp_path / "train_iter_6000.caffemodel"
    path.write_bytes(caffe_net(layers))
    out = str(tmp_path / "lfov.pt")
    meta = import_caffe(str(path), variant="deeplab-largefov", output_uri=out)
    assert meta["width"] == 1.0
    model, _ = load_checkpoint(out, expected_variant="deeplab-largefov", expected_num_classes=21)
    blobs = dict(layers)
    model.requires_grad_(False)
    assert np.array_equal(model.features.conv1_1.weight.numpy(), blobs["conv1_1"][0])
    assert np.array_equal(model.classifier.fc6.weight.numpy(), blobs["fc6"][0])
    assert np.array_equal(model.classifier.fc8.bias.numpy(), blobs["fc8_voc12"][1].ravel())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                caffe_name = name.split(".")[1].replace("fc8", "fc8_voc12")
                mod.weight.copy_(torch.from_numpy(blobs[caffe_name][0]))
                mod.bias.copy_(torch.from_numpy(blobs[caffe_name][1].ravel()))
        x = torch.randn(1, 3, 41, 41)
        assert torch.equal(model(x), ref(x))


def test_caffe_import_unpacked_floats_and_bias_layout():
    model = tiny("deeplab-largefov", num_classes=3)
    layers = caffe_layers_for(model, fc8_name="fc8_pascal")
    blobs = read_caffemodel(caffe_net(layers, packed=False))
    assert set(blobs) == {name for name, _ in layers}  # relu layers (no blobs) dropped
    fc7_w, fc7_b = blobs["fc7"]
    assert fc7_w.shape == layers[-2][1][0].shape and fc7_b.shape[:3] == (1, 1, 1)
    state = caffe_state_dict(blobs, model)
    assert torch.equal(state["classifier.fc8.weight"], torch.from_numpy(layers[-1][1][0]))


def test_caffe_import_errors_name_expected_and_actual(tmp_path):
    model = tiny("deeplab-largefov")
    layers = caffe_layers_for(model)
    bad = [(n, [w[:, :, :2, :2], b]) if n == "fc6" else (n, [w, b]) for n, (w, b) in layers]
    with pytest.raises(
        CheckpointError, match=r"'fc6' weight has shape \(64, 32, 2, 2\), expected \(64, 32, 3, 3\)"
    ):
        caffe_state_dict(read_caffemodel(caffe_net(bad)), model)
    with pytest.raises(CheckpointError, match=r"lacks weights .*classifier.fc7.bias"):
        caffe_state_dict(read_caffemodel(caffe_net([x for x in layers if x[0] != "fc7"])), model)
    with pytest.raises(CheckpointError, match="no place for: \\['mystery'\\]"):
        caffe_state_dict(read_caffemodel(caffe_net([*layers, ("mystery", layers[0][1])])), model)
    path = tmp_path / "n.caffemodel"
    path.write_bytes(caffe_net(layers))
    with pytest.raises(CheckpointError, match=r"expected \(5, 64, 1, 1\)"):
        import_caffe(
            str(path),
            variant="deeplab-largefov",
            output_uri=str(tmp_path / "o.pt"),
            num_classes=5,
            width=TINY,
        )


def test_checkpoint_round_trip_local(tmp_path):
    model = tiny("deeplab-msc", num_classes=4)
    uri = str(tmp_path / "sub" / "m.pt")
    names = ["bg", "a", "b", "c"]
    saved = save_checkpoint(model, uri, class_names=names, provenance={"source": "test"})
    data = (tmp_path / "sub" / "m.pt").read_bytes()
    assert saved["digest"] == checkpoint_digest(data) == hashlib.sha256(data).hexdigest()

    loaded, meta = load_checkpoint(uri, expected_variant="deeplab-msc", expected_num_classes=4)
    assert not loaded.training
    assert meta["variant"] == "deeplab-msc" and meta["num_classes"] == 4 and meta["class_names"] == names
    assert meta["width"] == TINY and meta["mean"] == list(CAFFE_MEAN_BGR) and meta["format_version"] == 1
    assert meta["provenance"] == {"source": "test"} and meta["digest"] == saved["digest"]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_checkpoint_round_trip_s3(bucket, storage_cfg):
    model = tiny("deeplab")
    uri = f"{bucket}/models/deeplab.pt"
    saved = save_checkpoint(
        model, uri, class_names=list(VOC_CLASSES), provenance={"source": "s3"}, storage_cfg=storage_cfg
    )
    assert storage.exists(uri, storage_cfg)
    loaded, meta = load_checkpoint(uri, storage_cfg=storage_cfg, expected_variant="deeplab")
    assert meta["digest"] == saved["digest"]
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mismatches_fail_with_expected_and_actual(tmp_path):
    uri = str(tmp_path / "m.pt")
    save_checkpoint(tiny("deeplab-largefov"), uri, class_names=list(VOC_CLASSES), provenance={})
    with pytest.raises(CheckpointError, match="holds variant 'deeplab-largefov', expected 'deeplab'"):
        load_checkpoint(uri, expected_variant="deeplab")
    with pytest.raises(CheckpointError, match="num_classes 21, expected 3"):
        load_checkpoint(uri, expected_num_classes=3)
    with pytest.raises(CheckpointError, match="class_names has 2 entries, expected num_classes = 21"):
        save_checkpoint(tiny(), uri, class_names=["a", "b"], provenance={})

    # a tensor whose shape disagrees with the declared variant/width
    obj = torch.load(uri, weights_only=True)
    obj["state_dict"]["classifier.fc8.weight"] = torch.zeros(21, 7, 1, 1)
    bad = tmp_path / "bad.pt"
    torch.save(obj, bad)
    with pytest.raises(
        CheckpointError, match=r"fc8.weight has shape \(21, 7, 1, 1\), expected \(21, 64, 1, 1\)"
    ):
        load_checkpoint(str(bad))


def test_load_checkpoint_bytes_and_garbage(tmp_path):
    uri = str(tmp_path / "m.pt")
    saved = save_checkpoint(tiny(), uri, class_names=list(VOC_CLASSES), provenance={})
    model, meta = load_checkpoint_bytes((tmp_path / "m.pt").read_bytes(), expected_variant="deeplab-largefov")
    assert meta["digest"] == saved["digest"] and model.variant == "deeplab-largefov"
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint_bytes(b"not a checkpoint", source="model x")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError, match=r"expected a dict with 'state_dict' and 'meta', got \['weights'\]"
    ):
        load_checkpoint(str(tmp_path / "other.pt"))


class Payload:
    """Not a tensor: unpickling it would run arbitrary code paths."""


def test_pickled_object_is_refused(tmp_path):
    uri = str(tmp_path / "m.pt")
    save_checkpoint(tiny(), uri, class_names=list(VOC_CLASSES), provenance={})
    obj = torch.load(uri, weights_only=True)
    obj["meta"]["provenance"] = Payload()
    buf = io.BytesIO()
    torch.save(obj, buf)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(str(tmp_path / "evil.pt"))


def fake_vgg16(width: float) -> dict[str, torch.Tensor]:
    """torchvision vgg16 state-dict layout at a scaled width, random values."""
    g = torch.Generator().manual_seed(3)
    chans = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    sd, in_c, i = {}, 3, 0
    for c in chans:
        if c == "M":
            i += 1  # MaxPool2d
            continue
        c = max(1, round(c * width))
        sd[f"features.{i}.weight"] = torch.randn(c, in_c, 3, 3, generator=g)
        sd[f"features.{i}.bias"] = torch.randn(c, generator=g)
        in_c, i = c, i + 2  # Conv2d, ReLU
    fc = max(1, round(4096 * width))
    sd["classifier.0.weight"] = torch.randn(fc, in_c * 49, generator=g)
    sd["classifier.0.bias"] = torch.randn(fc, generator=g)
    sd["classifier.3.weight"] = torch.randn(fc, fc, generator=g)
    sd["classifier.3.bias"] = torch.randn(fc, generator=g)
    sd["classifier.6.weight"] = torch.randn(1000, fc, generator=g)
    sd["classifier.6.bias"] = torch.randn(1000, generator=g)
    return sd


@pytest.mark.parametrize(
    ("variant", "taps", "step"),
    [("deeplab-largefov", [0, 3, 6], 4), ("deeplab", [0, 2, 4, 6], 1), ("deeplab-7x7", list(range(7)), 1)],
)
def test_vgg16_init_decimates_fc6(variant, taps, step):
    vgg = fake_vgg16(TINY)
    model = tiny(variant)
    fc8_before = model.classifier.fc8.weight.clone()
    vgg16_init(model, vgg)
    assert torch.equal(model.features.conv1_1.weight, vgg["features.0.weight"])
    assert torch.equal(model.features.conv5_3.bias, vgg["features.28.bias"])
    assert torch.equal(model.features.conv3_1.weight, vgg["features.10.weight"])
    full6 = vgg["classifier.0.weight"].reshape(-1, 32, 7, 7)
    w6 = model.classifier.fc6.weight
    assert w6.shape[-1] == len(taps)
    for a, ta in enumerate(taps):
        for b, tb in enumerate(taps):
            assert torch.equal(w6[:, :, a, b], full6[::step, :, ta, tb])
    assert torch.equal(model.classifier.fc6.bias, vgg["classifier.0.bias"][::step])
    assert torch.equal(model.classifier.fc7.weight[:, :, 0, 0], vgg["classifier.3.weight"][::step, ::step])
    assert torch.equal(model.classifier.fc8.weight, fc8_before)  # scores keep their N(0, 0.01) init


def test_vgg16_init_wrong_width_fails():
    with pytest.raises(CheckpointError, match=r"expected \(\*, 1568\)"):
        vgg16_init(tiny(), fake_vgg16(1 / 8))
