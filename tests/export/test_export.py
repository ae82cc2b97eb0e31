"""deeplab export / inspect: VOC PNGs equal to the stored masks, palette, nested ids, resume, error rows, COCO RLE
round trip, overlays (object and shard sources), S3 on Ray after a real segment run, and the inspect output."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.demo.scenes import encode_jpeg, make_scene, scene_class_names
from pipeline.export import masks as export
from pipeline.model.deeplab import build_model
from pipeline.model.weights import describe_checkpoint, inspect_main, save_checkpoint
from pipeline.stages.encode import EncodeConfig, encode_batch, to_table
from pipeline.storage import list_files, read_bytes, write_bytes

NUM_CLASSES = 4


def _mask(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, (h, w), dtype=np.uint8)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _write_output(root: Path, rows: list[dict], class_names: list[str] | None = None) -> dict[str, dict]:
    """An OUTPUT/ like a segment run's, built with encode_batch: ``rows`` are {id, status, raw, mask, source}."""
    n = len(rows)
    batch = {
        S.ID: np.array([r["id"] for r in rows], dtype=object),
        S.SOURCE: np.array([r.get("source", f"/in/{r['id']}.jpg") for r in rows], dtype=object),
        S.STATUS: np.array([r.get("status", S.OK) for r in rows], dtype=object),
        S.ERROR: np.array([r.get("error") for r in rows], dtype=object),
        S.HEIGHT: np.array([r["raw"].shape[0] if "raw" in r else 0 for r in rows]),
        S.WIDTH: np.array([r["raw"].shape[1] if "raw" in r else 0 for r in rows]),
        S.RAW_MASK: S.object_column(r.get("raw", np.zeros((0, 0), np.uint8)) for r in rows),
        S.MASK: S.object_column(r.get("mask", np.zeros((0, 0), np.uint8)) for r in rows),
        S.LABEL: S.object_column(np.zeros((0, 0), np.uint8) for _ in range(n)),
    }
    table = to_table(encode_batch(batch, EncodeConfig(NUM_CLASSES, "deeplab-largefov", "0" * 64)))
    (root / "masks").mkdir(parents=True)
    pq.write_table(table.slice(0, 2), root / "masks" / "part-a.parquet")
    pq.write_table(table.slice(2), root / "masks" / "part-b.parquet")
    if class_names:
        (root / "_manifest.json").write_text(json.dumps({"class_names": class_names}))
    return {r[S.ID]: r for r in table.to_pylist()}


@pytest.fixture
def output(tmp_path) -> tuple[Path, dict[str, dict]]:
    rows = [
        {"id": "flat", "raw": _mask(1), "mask": _mask(2)},
        {"id": "a/b/nested", "raw": _mask(3), "mask": _mask(4)},
        {"id": "a/other", "raw": _mask(5), "mask": _mask(6)},
        {"id": "broken", "status": S.ErrorKind.DECODE, "error": "not an image"},
        {
            "id": "a/missing",
            "status": S.ErrorKind.READ,
            "error": "cannot read /in/a/missing.jpg: object not found",
        },
    ]
    root = tmp_path / "out"
    return root, _write_output(root, rows, class_names=scene_class_names(NUM_CLASSES))


def _errors_csv(dest: Path) -> list[dict]:
    with open(dest / "_errors.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_png_export_equals_stored_masks_voc_palette_nested_ids_and_lists_error_rows(output, tmp_path):
    root, stored = output
    dest = tmp_path / "png"
    result = export.export_masks(str(root), str(dest), storage_cfg=None, use_ray=False)
    assert (result["written"], result["skipped"], result["not_ok"], result["failed"]) == (3, 0, 2, 0)
    pngs = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png"))
    assert pngs == ["a/b/nested.png", "a/other.png", "flat.png"]  # one per ok row, folders kept
    for image_id in ("flat", "a/b/nested", "a/other"):
        with Image.open(dest / f"{image_id}.png") as im:
            assert im.mode == "P" and im.getpalette() == S.voc_palette()  # all 256 colours, 255 = void
            np.testing.assert_array_equal(np.asarray(im), _png(stored[image_id]["mask_png"]))
    assert S.voc_palette()[3 * 255 : 3 * 256] == [224, 224, 192] and S.voc_palette()[3:6] == [128, 0, 0]
    assert [(r["image_id"], r["status"]) for r in _errors_csv(dest)] == [
        ("a/missing", "read_error"),
        ("broken", "decode_error"),
    ]
    assert _errors_csv(dest)[1]["error"] == "not an image"
    # --raw exports the DCNN masks, which differ from the final ones here; mixing both in one DIR is refused.
    raw = export.export_masks(str(root), str(tmp_path / "raw"), storage_cfg=None, raw=True, use_ray=False)
    assert raw["written"] == 3
    for image_id in ("flat", "a/b/nested"):
        got = _png((tmp_path / "raw" / f"{image_id}.png").read_bytes())
        np.testing.assert_array_equal(got, _png(stored[image_id]["raw_mask_png"]))
        assert not np.array_equal(got, _png(stored[image_id]["mask_png"]))
    with pytest.raises(export.ExportError, match="masks_kind 'final'"):
        export.export_masks(str(root), str(dest), storage_cfg=None, raw=True, use_ray=False)


def test_resume_skips_what_is_there_and_recreates_a_deleted_file(output, tmp_path):
    root, stored = output
    dest = tmp_path / "png"
    export.export_masks(str(root), str(dest), storage_cfg=None, use_ray=False)
    marker = b"left alone"
    (dest / "flat.png").write_bytes(marker)  # a file that is there is not rewritten
    (dest / "a" / "b" / "nested.png").unlink()
    again = export.export_masks(str(root), str(dest), storage_cfg=None, use_ray=False)
    assert (again["written"], again["skipped"], again["not_ok"]) == (1, 2, 2)
    assert (dest / "flat.png").read_bytes() == marker
    np.testing.assert_array_equal(
        _png((dest / "a/b/nested.png").read_bytes()), _png(stored["a/b/nested"]["mask_png"])
    )
    assert len(_errors_csv(dest)) == 2  # error rows listed on every run
    assert not [p for p in dest.rglob(".*")]  # no temp files left


def test_coco_rle_decodes_back_to_the_masks(output, tmp_path):
    from pycocotools import mask as coco_mask

    root, stored = output
    dest = tmp_path / "coco"
    result = export.export_masks(str(root), str(dest), storage_cfg=None, fmt="coco", use_ray=False)
    assert result["written"] == 3 and result["coco_json"] == str(dest / "coco.json")
    assert not list(dest.rglob("*.png"))
    doc = json.loads((dest / "coco.json").read_text())
    assert doc["categories"] == [{"id": i, "name": n} for i, n in enumerate(scene_class_names(NUM_CLASSES))]
    assert [im["deeplab_image_id"] for im in doc["images"]] == ["a/b/nested", "a/other", "flat"]
    assert [im["file_name"] for im in doc["images"]] == ["a/b/nested.jpg", "a/other.jpg", "flat.jpg"]
    assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])
    for image in doc["images"]:
        expected = _png(stored[image["deeplab_image_id"]]["mask_png"])
        assert (image["height"], image["width"]) == expected.shape
        decoded = np.full(expected.shape, 255, np.uint8)
        anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        assert sorted(a["category_id"] for a in anns) == sorted(np.unique(expected).tolist())
        for ann in anns:
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            binary = coco_mask.decode(rle).astype(bool)
            assert ann["area"] == int(binary.sum()) and not (decoded[binary] != 255).any()  # disjoint
            decoded[binary] = ann["category_id"]
        np.testing.assert_array_equal(decoded, expected)


def test_overlays_from_object_and_shard_sources_and_export_errors(tmp_path):
    rgb, _ = make_scene(24, 32, seed=1, num_classes=NUM_CLASSES)
    image_path = tmp_path / "in" / "pic.png"  # lossless, so the blend is checked exactly
    image_path.parent.mkdir()
    Image.fromarray(rgb).save(image_path)
    shard = tmp_path / "in" / "shard-00000.parquet"
    pq.write_table(
        pa.table(
            {"image_id": ["in/shard"], "image": [encode_jpeg(rgb)], "label": pa.array([None], pa.binary())}
        ),
        shard,
    )
    mask = np.kron(_mask(7, 3, 4), np.ones((8, 8), np.uint8))  # 8x8 blocks: regions, as real masks have
    rows = [
        {"id": "pic", "raw": mask, "mask": mask, "source": str(image_path)},
        {"id": "in/shard", "raw": mask, "mask": mask, "source": f"{shard}#in/shard"},
        {"id": "gone", "raw": mask, "mask": mask, "source": str(tmp_path / "in" / "gone.jpg")},
        {"id": "small", "raw": mask[:8, :8], "mask": mask[:8, :8], "source": str(image_path)},
    ]
    root = tmp_path / "out"
    _write_output(root, rows)
    dest = tmp_path / "ov"
    result = export.export_masks(str(root), str(dest), storage_cfg=None, overlay=True, use_ray=False)
    assert (result["written"], result["failed"]) == (2, 2)
    with Image.open(dest / "pic.overlay.jpg") as im:
        got = np.asarray(im.convert("RGB")).astype(int)
    want = export.overlay_image(rgb, mask).astype(int)
    assert got.shape == rgb.shape and np.abs(got - want).mean() < 3  # JPEG
    assert np.array_equal(want[mask == 0], rgb[mask == 0]) and not np.array_equal(
        want[mask == 1], rgb[mask == 1]
    )
    assert (dest / "in" / "shard.overlay.jpg").is_file() and (dest / "in" / "shard.png").is_file()
    failed = {r["image_id"]: r for r in _errors_csv(dest)}
    assert set(failed) == {"gone", "small"} and {r["status"] for r in failed.values()} == {"export_error"}
    assert "FileNotFoundError" in failed["gone"]["error"] and "8x8" in failed["small"]["error"]
    assert export.export_main(["--masks", str(root), "--to", str(dest), "--overlay", "--no-ray"]) == 1


def test_segment_on_ray_then_export_s3_to_s3_and_local(ray_local, storage_cfg, bucket, tmp_path, capsys):
    """The bar, end to end: a real segment run (4 tiny scenes on S3), exported on Ray Data from S3 to S3, and by the
    CLI to a local DIR: one VOC-palette PNG per ok row, equal pixel for pixel to the stored mask."""
    import torch

    from pipeline.config import load_job_config
    from pipeline.demo.scenes import write_voc_dataset
    from pipeline.segment import run_segment

    torch.manual_seed(0)
    model_uri = f"{bucket}/tiny.pt"
    names = scene_class_names(NUM_CLASSES)
    model = build_model("deeplab-largefov", num_classes=NUM_CLASSES, width=1 / 16)
    save_checkpoint(
        model, model_uri, class_names=names, provenance={"source": "test"}, storage_cfg=storage_cfg
    )
    write_voc_dataset(
        f"{bucket}/voc", count=4, size=(48, 40), num_classes=NUM_CLASSES, seed=3, storage_cfg=storage_cfg
    )
    cfg, crf_raw = load_job_config(
        input=f"{bucket}/voc",
        output=f"{bucket}/out",
        model=model_uri,
        storage={"endpoint_url": storage_cfg.endpoint_url, "max_attempts": 3},
        dcnn={"batch_size": 2, "min_input_size": 49},
        evaluate=False,
    )
    run_segment(cfg, crf_raw)
    stored = {}
    for uri in list_files(f"{bucket}/out/masks", storage_cfg, suffixes=(".parquet",)):
        for row in pq.read_table(io.BytesIO(read_bytes(uri, storage_cfg))).to_pylist():
            stored[row["image_id"]] = row
    assert len(stored) == 4 and {r["status"] for r in stored.values()} == {"ok"}

    result = export.export_masks(f"{bucket}/out", f"{bucket}/png", storage_cfg=storage_cfg, use_ray=True)
    assert (result["written"], result["skipped"], result["not_ok"]) == (4, 0, 0)
    exported = list_files(f"{bucket}/png", storage_cfg, suffixes=(".png",))
    assert [u.rsplit("/", 1)[1] for u in exported] == [f"{i}.png" for i in sorted(stored)]
    for image_id, row in stored.items():
        with Image.open(io.BytesIO(read_bytes(f"{bucket}/png/{image_id}.png", storage_cfg))) as im:
            assert im.mode == "P" and im.getpalette() == S.voc_palette()
            np.testing.assert_array_equal(np.asarray(im), _png(row["mask_png"]))
    again = export.export_masks(f"{bucket}/out", f"{bucket}/png", storage_cfg=storage_cfg, use_ray=False)
    assert (again["written"], again["skipped"]) == (0, 4)  # resume on S3 (exists = one HEAD per object)

    from pipeline.cli import main

    local = str(tmp_path / "local")
    argv = ["export", "--masks", f"{bucket}/out", "--to", local, "--format", "coco"]
    assert main([*argv, "--endpoint-url", storage_cfg.endpoint_url]) == 0
    assert "exported 4 final masks" in capsys.readouterr().out
    doc = json.loads((tmp_path / "local" / "coco.json").read_text())
    assert [c["name"] for c in doc["categories"]] == names  # from the job manifest (the checkpoint's names)


def test_inspect_prints_variant_classes_provenance_digest_and_parameters(
    tmp_path, capsys, storage_cfg, bucket
):
    import hashlib

    model = build_model("deeplab-largefov", num_classes=3, width=1 / 16)
    path = tmp_path / "m.pt"
    save_checkpoint(
        model, str(path), class_names=["background", "blob", "pole"], provenance={"source": "unit test"}
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    num_params = sum(p.numel() for p in model.parameters())
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "variant       deeplab-largefov" in out and "width         0.0625" in out
    assert "classes       3: 0 background, 1 blob, 2 pole" in out
    assert f"sha256        {digest}" in out and f"parameters    {num_params:,}" in out
    assert "provenance    source: unit test" in out
    write_bytes(f"{bucket}/m.pt", path.read_bytes(), storage_cfg)
    info = describe_checkpoint(f"{bucket}/m.pt", storage_cfg=storage_cfg)
    assert (
        info["digest"] == digest
        and info["num_parameters"] == num_params
        and info["num_bytes"] == path.stat().st_size
    )
    path.write_bytes(b"not a checkpoint")
    assert inspect_main([str(path)]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err


def test_ids_that_would_share_a_file_are_refused_and_errors_csv_holds_no_formula(tmp_path):
    rows = [
        {"id": "a/b", "raw": _mask(1), "mask": _mask(2)},
        {"id": "a//b", "raw": _mask(3), "mask": _mask(4)},  # a filesystem writes it to a/b.png as well
        {"id": "=HYPERLINK(1)", "status": S.ErrorKind.DECODE, "error": "=cmd|' /C calc'!A0"},
    ]
    root = tmp_path / "out"
    stored = _write_output(root, rows)
    dest = tmp_path / "png"
    result = export.export_masks(str(root), str(dest), use_ray=False)
    assert (result["written"], result["failed"], result["not_ok"]) == (1, 1, 1)
    assert np.array_equal(_png((dest / "a" / "b.png").read_bytes()), _png(stored["a/b"]["mask_png"]))
    errors = {r[S.ID]: r for r in _errors_csv(dest)}
    assert "would write the file of id 'a/b'" in errors["a//b"][S.ERROR]
    assert errors["'=HYPERLINK(1)"][S.ERROR].startswith("'=cmd")  # shown as text by a spreadsheet
