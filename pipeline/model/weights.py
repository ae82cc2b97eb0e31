"""DCNN stage, the weights: checkpoint format, Caffe ``.caffemodel`` import and ImageNet VGG-16 initialisation.

Checkpoint (``.pt``, ``torch.save`` of a plain dict, loadable with ``weights_only=True``)::

    {"state_dict": {name: Tensor}, "meta": {"format_version": 1, "variant": str, "num_classes": int,
     "class_names": [str], "width": float, "mean": [B, G, R], "provenance": {str: str}}}

The meta dicts returned by ``save_checkpoint``, ``load_checkpoint`` and ``import_caffe`` carry one extra key,
``digest`` (sha256 hex of the checkpoint bytes), which is not stored in the file.

Caffe import needs no Caffe: the v1 ``NetParameter`` (``repeated V1LayerParameter layers = 2``; name 4, blobs 6;
``BlobProto`` num/channels/height/width 1-4, packed float data 5) is declared at run time with ``descriptor_pb2`` and
parsed by the ``protobuf`` package. The new format (``layer = 100``; name 1, blobs 7; ``BlobShape`` 7) is read too.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline import storage
from pipeline.model.deeplab import VARIANTS, DeepLab, build_model
from pipeline.schema import VOC_CLASSES
from pipeline.schema import class_names as class_names_for
from pipeline.storage import StorageConfig

__all__ = [
    "DEMO_CHECKPOINT",
    "FORMAT_VERSION",
    "CAFFE_MEAN_BGR",
    "VOC_CLASSES",
    "CheckpointError",
    "checkpoint_digest",
    "save_checkpoint",
    "load_checkpoint",
    "load_checkpoint_bytes",
    "describe_checkpoint",
    "format_description",
    "inspect_main",
    "read_caffemodel",
    "caffe_state_dict",
    "import_caffe",
    "load_vgg16_state_dict",
    "vgg16_init",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)  # subtracted from BGR 0..255 pixels, no scaling

# The checkpoint the project trained and ships (jobs/train_demo_model.py, docs/demo-model.md): the demo's model.
DEMO_CHECKPOINT = Path(__file__).parents[1] / "assets" / "demo-largefov.pt"


class CheckpointError(ValueError):
    """A checkpoint or weight file is unreadable, unsafe, or does not match what the caller expects."""


def checkpoint_digest(data: bytes) -> str:
    """sha256 hex of the checkpoint bytes (the ``model_digest`` written with every output row)."""
    return hashlib.sha256(data).hexdigest()


def _storage(cfg: StorageConfig | None) -> StorageConfig:
    return cfg if cfg is not None else StorageConfig.from_env()


# --- checkpoints ------------------------------------------------------------------------------------------------


def save_checkpoint(
    model: DeepLab,
    uri: str,
    *,
    class_names: list[str] | tuple[str, ...],
    provenance: dict[str, str],
    storage_cfg: StorageConfig | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a checkpoint to a local path or ``s3://`` URI; returns its meta plus ``digest``."""
    class_names = [str(c) for c in class_names]
    if len(class_names) != model.num_classes:
        raise CheckpointError(
            f"class_names has {len(class_names)} entries, expected num_classes = {model.num_classes}"
        )
    meta = {
        "format_version": FORMAT_VERSION,
        "variant": model.variant,
        "num_classes": model.num_classes,
        "class_names": class_names,
        "width": float(model.width),
        "mean": list(CAFFE_MEAN_BGR),
        "provenance": {str(k): str(v) for k, v in provenance.items()},
    }
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"state_dict": state, "meta": meta}, buf)
    data = buf.getvalue()
    storage.write_bytes(uri, data, _storage(storage_cfg))
    digest = checkpoint_digest(data)
    log.info("saved %s checkpoint %s (%d bytes, sha256 %s)", model.variant, uri, len(data), digest[:12])
    return {**meta, "digest": digest}


def load_checkpoint(
    uri: str,
    *,
    storage_cfg: StorageConfig | None = None,
    expected_variant: str | None = None,
    expected_num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[DeepLab, dict[str, Any]]:
    """Load a checkpoint (local path or ``s3://``) into a fresh model in eval mode; returns (model, meta + digest).

    Only tensors and plain containers are unpickled (``weights_only=True``): a file holding any other object is
    refused. A variant, class count or tensor shape that differs from what is expected fails naming both values.
    """
    data = storage.read_bytes(uri, _storage(storage_cfg))
    return load_checkpoint_bytes(
        data,
        expected_variant=expected_variant,
        expected_num_classes=expected_num_classes,
        map_location=map_location,
        source=f"checkpoint {uri}",
    )


def load_checkpoint_bytes(
    data: bytes,
    *,
    expected_variant: str | None = None,
    expected_num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
    source: str = "checkpoint",
) -> tuple[DeepLab, dict[str, Any]]:
    """``load_checkpoint`` for bytes already read (``source`` names them in error messages)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise CheckpointError(
            f"{source} is not a readable torch checkpoint (expected a torch.save zip archive)"
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing {source}: it holds objects other than tensors and plain containers "
            f"(torch.load weights_only=True): {e}"
        ) from e
    except (RuntimeError, EOFError) as e:  # not a torch.save file (zip), truncated
        raise CheckpointError(f"{source} is not a readable torch checkpoint: {e}") from e
    if not isinstance(obj, dict) or "state_dict" not in obj or "meta" not in obj:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{source}: expected a dict with 'state_dict' and 'meta', got {found}")
    meta, state = dict(obj["meta"]), obj["state_dict"]
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {version!r}, expected {FORMAT_VERSION}")
    missing = [k for k in ("variant", "num_classes", "class_names", "width", "mean") if k not in meta]
    if missing:
        raise CheckpointError(f"{source}: meta lacks {missing}")
    variant, num_classes = meta["variant"], int(meta["num_classes"])
    if variant not in VARIANTS:
        raise CheckpointError(f"{source}: unknown variant {variant!r}, expected one of {VARIANTS}")
    if expected_variant is not None and variant != expected_variant:
        raise CheckpointError(f"{source} holds variant {variant!r}, expected {expected_variant!r}")
    if expected_num_classes is not None and num_classes != expected_num_classes:
        raise CheckpointError(f"{source} has num_classes {num_classes}, expected {expected_num_classes}")
    if len(meta["class_names"]) != num_classes:
        raise CheckpointError(
            f"{source}: {len(meta['class_names'])} class names for num_classes {num_classes}"
        )
    model = build_model(variant, num_classes=num_classes, width=float(meta["width"]))
    _load_state(model, state, what=source)
    model.to(map_location).eval()
    meta["digest"] = checkpoint_digest(data)
    return model, meta


def _load_state(model: DeepLab, state: dict[str, Tensor], *, what: str) -> None:
    """``load_state_dict(strict=True)`` with messages that name the expected and actual keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{what} does not fit {model.variant} (width {model.width}): missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{what}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)} "
                f"for {model.variant} width {model.width} num_classes {model.num_classes}"
            )
    model.load_state_dict(state, strict=True)


def describe_checkpoint(uri: str, *, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """What ``deeplab inspect`` prints: the checkpoint's meta, digest, size and parameter count.

    Loads through ``load_checkpoint`` (``weights_only=True``, every shape checked), so a file this describes is one
    the segment job accepts.
    """
    cfg = _storage(storage_cfg)
    data = storage.read_bytes(uri, cfg)
    model, meta = load_checkpoint_bytes(data, source=f"checkpoint {uri}")
    return {
        "uri": uri,
        **meta,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_bytes": len(data),
    }


def format_description(info: dict[str, Any]) -> str:
    """The few lines ``deeplab inspect`` prints for ``describe_checkpoint``'s dict."""
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(info["class_names"]))
    lines = [
        f"checkpoint    {info['uri']} ({info['num_bytes']:,} bytes, format {info['format_version']})",
        f"variant       {info['variant']}",
        f"width         {info['width']:g}",
        f"classes       {info['num_classes']}: {classes}",
        f"parameters    {info['num_parameters']:,}",
        f"sha256        {info['digest']}",
    ]
    provenance = info.get("provenance") or {}
    if not provenance:
        lines.append("provenance    (none recorded)")
    for i, (key, value) in enumerate(sorted(provenance.items())):
        lines.append(f"{'provenance' if i == 0 else '':<14}{key}: {value}")
    return "\n".join(lines)


def inspect_main(argv: list[str] | None = None) -> int:
    """``deeplab inspect MODEL [--json] [--endpoint-url URL]``."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(
        prog="deeplab inspect",
        description="Show a checkpoint's variant, classes, provenance, digest and size.",
    )
    p.add_argument("model", help="checkpoint (.pt) path or s3:// URI")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    args = p.parse_args(argv)
    try:
        info = describe_checkpoint(
            args.model, storage_cfg=StorageConfig.from_env(endpoint_url=args.endpoint_url)
        )
    except (CheckpointError, FileNotFoundError) as e:
        print(f"deeplab inspect: error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, sort_keys=True) if args.json else format_description(info))
    return 0


# --- Caffe v1 import --------------------------------------------------------------------------------------------

_CAFFE_CLASSES: dict[str, Any] = {}


def _caffe_messages() -> dict[str, Any]:
    """Message classes for the parts of caffe.proto we read, declared at run time (no protoc, no Caffe)."""
    if _CAFFE_CLASSES:
        return _CAFFE_CLASSES
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    fdp = descriptor_pb2.FileDescriptorProto(
        name="deeplab_caffe_subset.proto", package="dlcaffe", syntax="proto2"
    )

    def message(name: str, fields: list[tuple[str, int, int, int, str | None]]) -> None:
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".dlcaffe.{type_name}"
            if ftype in (F.TYPE_FLOAT, F.TYPE_INT64) and label == rep:
                f.options.packed = True

    message("BlobShape", [("dim", 1, F.TYPE_INT64, rep, None)])
    blob_dims = [
        ("num", 1, F.TYPE_INT32, opt, None),
        ("channels", 2, F.TYPE_INT32, opt, None),
        ("height", 3, F.TYPE_INT32, opt, None),
        ("width", 4, F.TYPE_INT32, opt, None),
        ("shape", 7, F.TYPE_MESSAGE, opt, "BlobShape"),
    ]
    # Fast view: a packed float field is one length-delimited record on the wire, so declaring field 5 as bytes
    # hands us the raw little-endian float32 payload for np.frombuffer. Unpacked floats (wire type 5) land in
    # unknown fields instead, and such a blob is re-read with the float-typed view.
    message("BlobProtoRaw", [*blob_dims, ("data", 5, F.TYPE_BYTES, rep, None)])
    message("BlobProto", [*blob_dims, ("data", 5, F.TYPE_FLOAT, rep, None)])
    message(
        "V1LayerParameter",
        [("name", 4, F.TYPE_STRING, opt, None), ("blobs", 6, F.TYPE_MESSAGE, rep, "BlobProtoRaw")],
    )
    message(
        "LayerParameter",
        [("name", 1, F.TYPE_STRING, opt, None), ("blobs", 7, F.TYPE_MESSAGE, rep, "BlobProtoRaw")],
    )
    message(
        "NetParameter",
        [
            ("name", 1, F.TYPE_STRING, opt, None),
            ("layers", 2, F.TYPE_MESSAGE, rep, "V1LayerParameter"),
            ("layer", 100, F.TYPE_MESSAGE, rep, "LayerParameter"),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    for name in ("NetParameter", "BlobProto"):
        _CAFFE_CLASSES[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"dlcaffe.{name}"))
    return _CAFFE_CLASSES


def _blob_array(blob: Any, layer: str, index: int) -> np.ndarray:
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    raw = b"".join(blob.data)
    if len(raw) % 4:
        raise CheckpointError(f"caffemodel layer {layer!r} blob {index}: {len(raw)} data bytes, not float32s")
    values = np.frombuffer(raw, dtype="<f4")
    if values.size == 0 and int(np.prod(shape)) > 0:
        # Unpacked floats (or float data we could not see as one record): re-read with the float-typed view.
        full = _caffe_messages()["BlobProto"].FromString(blob.SerializeToString())
        values = np.fromiter(full.data, dtype=np.float32, count=len(full.data))
    if values.size != int(np.prod(shape)):
        raise CheckpointError(
            f"caffemodel layer {layer!r} blob {index}: shape {shape} needs {int(np.prod(shape))} floats, "
            f"file holds {values.size}"
        )
    return values.astype(np.float32).reshape(shape)


def read_caffemodel(data: bytes) -> dict[str, list[np.ndarray]]:
    """Parse ``.caffemodel`` bytes into {layer name: [blob arrays shaped (num, channels, height, width)]}.

    Layers without blobs (ReLU, pooling, dropout, data, loss) are left out.
    """
    net = _caffe_messages()["NetParameter"].FromString(data)
    out: dict[str, list[np.ndarray]] = {}
    for layer in [*net.layers, *net.layer]:
        if not layer.blobs:
            continue
        if layer.name in out:
            raise CheckpointError(f"caffemodel has two layers named {layer.name!r} with weights")
        out[layer.name] = [_blob_array(b, layer.name, i) for i, b in enumerate(layer.blobs)]
    if not out:
        raise CheckpointError("caffemodel holds no layer with weights (not a NetParameter file?)")
    return out


# Caffe layer name -> model module prefix. fc8 carries a dataset suffix (fc8_voc12, fc8_pascal); MSc layers are
# {data,pool1..4}_{conv,fc,ms} with an optional suffix.
_TRUNK_RE = re.compile(r"^(conv\d_\d)$")
_FC_RE = re.compile(r"^(fc6|fc7|fc8)(_\w+)?$")
_MSC_RE = re.compile(r"^(data|pool[1-4])_(conv|fc|ms)(_\w+)?$")


def _module_for_caffe_layer(name: str) -> str | None:
    if m := _TRUNK_RE.match(name):
        return f"features.{m.group(1)}"
    if m := _FC_RE.match(name):
        if m.group(1) != "fc8" and m.group(2):
            return None
        return f"classifier.{m.group(1)}"
    if m := _MSC_RE.match(name):
        return f"msc.{m.group(1)}.{m.group(2)}"
    return None


def caffe_state_dict(blobs: dict[str, list[np.ndarray]], model: DeepLab) -> dict[str, Tensor]:
    """Map Caffe layer blobs onto ``model``'s state-dict names, asserting every shape. Bias blobs (1, 1, 1, N)."""
    expected = model.state_dict()
    state: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    unknown = []
    for layer, arrays in blobs.items():
        prefix = _module_for_caffe_layer(layer)
        if prefix is None or f"{prefix}.weight" not in expected:
            unknown.append(layer)
            continue
        if prefix in sources:
            raise CheckpointError(f"caffemodel layers {sources[prefix]!r} and {layer!r} both map to {prefix}")
        sources[prefix] = layer
        if len(arrays) != 2:
            raise CheckpointError(
                f"caffemodel layer {layer!r}: {len(arrays)} blobs, expected 2 (weight, bias)"
            )
        weight, bias = arrays
        want_w = tuple(expected[f"{prefix}.weight"].shape)
        want_b = tuple(expected[f"{prefix}.bias"].shape)
        if weight.shape != want_w:
            raise CheckpointError(
                f"caffemodel layer {layer!r} weight has shape {weight.shape}, expected {want_w} for "
                f"{prefix}.weight of {model.variant} (num_classes {model.num_classes})"
            )
        if bias.size != want_b[0] or any(d != 1 for d in bias.shape[:-1]):
            raise CheckpointError(
                f"caffemodel layer {layer!r} bias has shape {bias.shape}, expected (1, 1, 1, {want_b[0]}) "
                f"for {prefix}.bias of {model.variant}"
            )
        # Caffe (num, channels, h, w) is PyTorch (out, in, kh, kw): no transpose.
        state[f"{prefix}.weight"] = torch.from_numpy(weight.copy())
        state[f"{prefix}.bias"] = torch.from_numpy(bias.reshape(want_b).copy())
    if unknown:
        raise CheckpointError(
            f"caffemodel layers with weights that {model.variant} has no place for: {unknown}"
        )
    missing = sorted(k for k in expected if k not in state)
    if missing:
        raise CheckpointError(f"caffemodel lacks weights for {model.variant}: {missing}")
    return state


def import_caffe(
    caffemodel_path: str,
    *,
    variant: str,
    output_uri: str,
    num_classes: int = 21,
    class_names: list[str] | None = None,
    width: float = 1.0,
    storage_cfg: StorageConfig | None = None,
) -> dict[str, Any]:
    """Convert a DeepLab v1 ``.caffemodel`` (local path or ``s3://``) into a checkpoint at ``output_uri``.

    Dilations, paddings and pooling come from ``variant`` (the caffemodel's dilation field is not read).
    Returns the checkpoint meta plus ``digest``. ``width`` is only for hand-made test files.
    """
    cfg = _storage(storage_cfg)
    data = storage.read_bytes(caffemodel_path, cfg)
    model = build_model(variant, num_classes=num_classes, width=width)
    state = caffe_state_dict(read_caffemodel(data), model)
    _load_state(model, state, what=f"caffemodel {caffemodel_path}")
    provenance = {
        "source": "caffe",
        "caffemodel": caffemodel_path,
        "caffemodel_sha256": checkpoint_digest(data),
    }
    names = class_names if class_names is not None else class_names_for(num_classes)
    meta = save_checkpoint(model, output_uri, class_names=names, provenance=provenance, storage_cfg=cfg)
    log.info("imported %s as %s -> %s", caffemodel_path, variant, output_uri)
    return meta


# --- ImageNet VGG-16 initialisation -----------------------------------------------------------------------------

# torchvision vgg16: features.N for the 13 convs in order, classifier.0 = fc6 (Linear 25088 -> 4096),
# classifier.3 = fc7. (classifier.6, the ImageNet scores, is not used.)
_VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_CONV_NAMES = (
    "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3",
)  # fmt: skip
_VGG_FC6_SIZE = 7


def load_vgg16_state_dict(uri: str, *, storage_cfg: StorageConfig | None = None) -> dict[str, Tensor]:
    """A torchvision-layout VGG-16 state dict from a ``.pth`` the user provides (``weights_only=True``)."""
    data = storage.read_bytes(uri, _storage(storage_cfg))
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing VGG-16 file {uri}: it holds non-tensor objects: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"VGG-16 file {uri}: expected a state dict, got {type(obj).__name__}")
    return obj


def vgg16_init(model: DeepLab, vgg_state_dict: dict[str, Tensor]) -> DeepLab:
    """Initialise the trunk, fc6 and fc7 of ``model`` from an ImageNet VGG-16 in torchvision's layout (in place).

    fc6's 7x7 kernel is decimated to the variant's kernel (taps 0,2,4,6 for 4x4; 0,3,6 for 3x3) and fc6/fc7
    channels are subsampled (every 4th for LargeFOV's 4096 -> 1024). fc8 and the MSc branches keep their init.
    Shapes follow the model, so width-scaled VGG dicts initialise width-scaled models.
    """
    target = model.state_dict()
    new: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in vgg_state_dict:
            raise CheckpointError(f"VGG-16 state dict lacks {key!r} (expected torchvision's vgg16 layout)")
        return vgg_state_dict[key].detach().float().cpu()

    for idx, name in zip(_VGG_CONV_INDICES, _VGG_CONV_NAMES, strict=True):
        new[f"features.{name}.weight"] = take(f"features.{idx}.weight")
        new[f"features.{name}.bias"] = take(f"features.{idx}.bias")

    fc6_w, fc6_b = take("classifier.0.weight"), take("classifier.0.bias")
    fc7_w, fc7_b = take("classifier.3.weight"), take("classifier.3.bias")
    want6 = tuple(target["classifier.fc6.weight"].shape)  # (fc, in_c, k, k)
    fc, in_c, k = want6[0], want6[1], want6[2]
    if fc6_w.shape[1] != in_c * _VGG_FC6_SIZE**2:
        raise CheckpointError(
            f"VGG-16 fc6 weight has shape {tuple(fc6_w.shape)}, expected (*, {in_c * _VGG_FC6_SIZE**2}) "
            f"= {in_c} channels x 7 x 7 for {model.variant} width {model.width}"
        )
    vgg_fc = fc6_w.shape[0]
    if vgg_fc % fc:
        raise CheckpointError(f"VGG-16 fc6 has {vgg_fc} channels, not a multiple of {model.variant}'s {fc}")
    step = vgg_fc // fc
    taps = torch.linspace(0, _VGG_FC6_SIZE - 1, k).round().long()  # 7 -> 4: 0,2,4,6; 7 -> 3: 0,3,6
    w6 = fc6_w.reshape(vgg_fc, in_c, _VGG_FC6_SIZE, _VGG_FC6_SIZE)[:, :, taps][:, :, :, taps]
    new["classifier.fc6.weight"] = w6[::step].contiguous()
    new["classifier.fc6.bias"] = fc6_b[::step].contiguous()
    new["classifier.fc7.weight"] = fc7_w[::step, ::step].reshape(fc, fc, 1, 1).contiguous()
    new["classifier.fc7.bias"] = fc7_b[::step].contiguous()

    for key, tensor in new.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise CheckpointError(
                f"VGG-16 init: {key} converts to shape {tuple(tensor.shape)}, expected {tuple(target[key].shape)} "
                f"for {model.variant} width {model.width}"
            )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, tensor in new.items():
            params[key].copy_(tensor)
    log.info("initialised %s from VGG-16 (fc6 taps %s, channel step %d)", model.variant, taps.tolist(), step)
    return model
