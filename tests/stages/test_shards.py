"""Parquet shards: round trip through the moto S3 server (every pair exactly once), manifest, layout."""

from __future__ import annotations

import collections

import pyarrow.parquet as pq
import pytest

from pipeline.demo import scenes
from pipeline.stages import shards
from pipeline.storage import filesystem, list_files, read_bytes


def test_shard_round_trip_on_s3(bucket, storage_cfg):
    voc = f"{bucket}/voc"
    summary = scenes.write_voc_dataset(
        voc, count=11, size=(48, 32), num_classes=4, seed=3, val_fraction=0.0, storage_cfg=storage_cfg
    )
    out = f"{bucket}/shards/all"
    manifest = shards.shard_dataset(voc, out, images_per_shard=4, storage_cfg=storage_cfg)
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 3]
    assert manifest["num_images"] == 11 and manifest["num_labelled"] == 11
    assert manifest["num_classes"] == 4 and manifest["class_names"] == scenes.scene_class_names(4)
    assert shards.read_manifest(out, storage_cfg) == manifest
    seen = collections.Counter()
    for uri in shards.shard_uris(out, manifest):
        for row in shards.read_shard_rows(uri, storage_cfg):
            seen[row["image_id"]] += 1
            # bytes come back exactly as stored in the VOC layout
            assert row["image"] == read_bytes(f"{voc}/JPEGImages/{row['image_id']}.jpg", storage_cfg)
            assert row["label"] == read_bytes(f"{voc}/SegmentationClass/{row['image_id']}.png", storage_cfg)
    assert sorted(seen) == sorted(summary["train"]) and set(seen.values()) == {1}
    fs, path = filesystem(shards.shard_uris(out, manifest)[0], storage_cfg)
    assert pq.read_schema(path, filesystem=fs).names == ["image_id", "image", "label"]


def test_split_and_missing_labels_local(tmp_path):
    voc = str(tmp_path / "voc")
    summary = scenes.write_voc_dataset(voc, count=6, size=(40, 32), num_classes=3, seed=0, val_fraction=0.5)
    (tmp_path / "voc" / "dataset.json").unlink()  # a plain VOC root: classes inferred from labels
    gone = summary["val"][0]
    (tmp_path / "voc" / "SegmentationClass" / f"{gone}.png").unlink()
    out = str(tmp_path / "shards")
    manifest = shards.shard_dataset(
        voc, out, images_per_shard=10, split="val", storage_cfg=None, num_classes=3
    )
    assert manifest["split"] == "val" and manifest["num_labelled"] == 2
    rows = shards.read_shard_rows(shards.shard_uris(out, manifest)[0], None)
    assert [r["image_id"] for r in rows] == summary["val"]
    assert [r["label"] is None for r in rows] == [i == gone for i in summary["val"]]
    assert list_files(out, None) == [f"{out}/_manifest.json", f"{out}/shard-00000.parquet"]


def test_shard_errors(tmp_path):
    with pytest.raises(ValueError, match="images_per_shard"):
        shards.shard_dataset(str(tmp_path), str(tmp_path / "o"), images_per_shard=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected images"):
        shards.shard_dataset(str(tmp_path / "empty"), str(tmp_path / "o"), images_per_shard=2)


def test_shard_main(tmp_path):
    scenes.write_voc_dataset(str(tmp_path / "voc"), count=3, size=(40, 32), num_classes=3, seed=0)
    assert (
        shards.shard_main(
            ["--input", str(tmp_path / "voc"), "--output", str(tmp_path / "s"), "--images-per-shard", "2"]
        )
        == 0
    )
    assert shards.read_manifest(str(tmp_path / "s"), None)["num_images"] == 3
