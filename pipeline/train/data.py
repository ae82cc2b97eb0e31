"""Training data for ``deeplab train``: the class list, and a worker's share of (image, label) pairs in memory."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.storage import StorageConfig
from pipeline.train.config import TrainConfig

__all__ = ["resolve_classes", "load_pairs", "VOID"]

log = logging.getLogger(__name__)

_IMAGE_DIR, _LABEL_DIR, _SETS_DIR = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation"
VOID = 255


def _is_shards(uri: str, cfg: StorageConfig) -> bool:
    return storage.exists(storage.join(uri, "_manifest.json"), cfg)


def resolve_classes(config: TrainConfig, storage_cfg: StorageConfig) -> TrainConfig:
    """Fill num_classes / class_names from the config, the shard manifest or ``dataset.json`` (in that order)."""
    import dataclasses

    from pipeline.demo.scenes import class_names as default_names

    meta: dict = {}
    for name in ("_manifest.json", "dataset.json"):
        uri = storage.join(config.train_input, name)
        if storage.exists(uri, storage_cfg):
            meta = json.loads(storage.read_bytes(uri, storage_cfg))
            break
    num_classes = config.num_classes or meta.get("num_classes")
    if num_classes is None:
        raise ValueError(
            f"num_classes not given and {config.train_input} has no _manifest.json or dataset.json"
        )
    names = tuple(config.class_names) or (
        tuple(meta["class_names"])
        if meta.get("num_classes") == num_classes and meta.get("class_names")
        else ()
    )
    names = names or tuple(default_names(num_classes))
    return dataclasses.replace(config, num_classes=int(num_classes), class_names=names)


def _decode_pair(image: bytes, label: bytes | None, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    if label is None:
        raise ValueError(f"training image {image_id} has no label")
    lab = np.asarray(Image.open(io.BytesIO(label)))
    if lab.ndim != 2 or lab.shape != rgb.shape[:2]:
        raise ValueError(
            f"label of {image_id}: expected a 2-D {rgb.shape[:2]} index PNG, got shape {lab.shape}"
        )
    return rgb, lab.astype(np.uint8)


def load_pairs(
    uri: str, split: str | None, storage_cfg: StorageConfig, *, rank: int = 0, world: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """This worker's (rgb uint8 (H, W, 3), label uint8 (H, W)) pairs from shards or a VOC root, in id order."""
    from pipeline.stages import shards

    if _is_shards(uri, storage_cfg):
        manifest = shards.read_manifest(uri, storage_cfg)
        if split is not None and manifest.get("split") != split:
            raise ValueError(
                f"{uri} holds split {manifest.get('split')!r}, expected {split!r}: shard each split to its own "
                "prefix (deeplab shard --split ...) or pass the split as none"
            )
        uris = shards.shard_uris(uri, manifest)
        mine = uris[rank::world] if len(uris) >= world else uris
        rows = [r for u in mine for r in shards.read_shard_rows(u, storage_cfg)]
        if len(uris) < world:
            rows = rows[rank::world]
        return [_decode_pair(r["image"], r["label"], r["image_id"]) for r in rows]
    pairs = shards.list_voc_pairs(uri, storage_cfg, split=split)[rank::world]
    out = []
    for image_id, image_uri, label_uri in pairs:
        label = storage.read_bytes(label_uri, storage_cfg) if label_uri else None
        out.append(_decode_pair(storage.read_bytes(image_uri, storage_cfg), label, image_id))
    return out
