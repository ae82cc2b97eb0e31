"""Scene generator: determinism, label validity (values, void band, palette PNG), DeepLab-like scores."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.demo import scenes
from pipeline.storage import list_files, read_bytes


def test_make_scene_is_deterministic_and_seed_dependent():
    a_rgb, a_lab = scenes.make_scene(96, 128, seed=5, num_classes=6)
    b_rgb, b_lab = scenes.make_scene(96, 128, seed=5, num_classes=6)
    c_rgb, _ = scenes.make_scene(96, 128, seed=6, num_classes=6)
    assert np.array_equal(a_rgb, b_rgb) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_rgb, c_rgb)


@pytest.mark.parametrize("num_classes", [3, 6, 21])
def test_labels_are_valid_with_a_thin_void_band(num_classes):
    seen: set[int] = set()
    for seed in range(12):
        rgb, lab = scenes.make_scene(120, 160, seed=seed, num_classes=num_classes)
        assert rgb.shape == (120, 160, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
        assert lab.shape == (120, 160) and lab.dtype == np.uint8
        values = set(np.unique(lab).tolist())
        assert values <= set(range(num_classes)) | {255}, values
        seen |= values
        void = lab == 255
        # Void is a band along boundaries, not a region: between 0 and ~25 % of the image, and every void pixel
        # is within 2 px of two different classes (the band is at most 4 px wide).
        assert void.mean() < 0.25
        assert 0 in values  # background always visible
        if void.any():
            assert values - {0, 255}  # void only appears around objects
            # The band is thin: every void pixel has a labelled pixel within 8 px (dilate the valid set by 8;
            # small wheels, whose rim and spokes are thinner than the band, are void almost throughout, as in VOC).
            near_valid = np.zeros_like(void)
            padded = np.pad(~void, 8)
            for dy in range(17):
                for dx in range(17):
                    near_valid |= padded[dy : dy + 120, dx : dx + 160]
            assert near_valid[void].all()
    assert len(seen - {255}) >= min(num_classes, 4)  # several object classes appear across scenes


def test_scene_is_not_noise_and_colour_edges_follow_labels():
    rgb, lab = scenes.make_scene(120, 160, seed=3, num_classes=6)
    img = rgb.astype(np.float32)
    grad = np.abs(np.diff(img, axis=1)).sum(-1)  # (H, W-1)
    boundary = lab[:, 1:] != lab[:, :-1]
    interior = (lab[:, 1:] == lab[:, :-1]) & (lab[:, 1:] != 255)
    # Neighbouring pixels are correlated (not uniform noise) and colour changes concentrate at label changes.
    assert grad[interior].mean() < 30
    assert grad[boundary].mean() > grad[interior].mean()


def test_simulate_scores_are_peaked_probabilities_coarse_at_boundaries():
    _, lab = scenes.make_scene(120, 160, seed=2, num_classes=6)
    probs = scenes.simulate_scores(lab, 6, seed=0)
    assert probs.shape == (6, 120, 160) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    valid = lab != 255
    pred = probs.argmax(0)
    assert (pred == lab)[valid].mean() > 0.9
    assert np.median(probs.max(0)) > 0.9  # most pixels confident
    assert np.array_equal(probs, scenes.simulate_scores(lab, 6, seed=0))
    # near the void band the scores are blurred: lower confidence than far inside regions
    near = np.zeros_like(valid)
    near[:, 1:] |= ~valid[:, :-1]
    near[:, :-1] |= ~valid[:, 1:]
    near &= valid
    assert probs.max(0)[near].mean() < probs.max(0)[valid & ~near].mean()


def test_class_names():
    assert scenes.class_names(21)[15] == "person"
    assert scenes.class_names(4) == ["background", "class_1", "class_2", "class_3"]
    with pytest.raises(ValueError, match="num_classes"):
        scenes.class_names(1)


def test_scene_class_names_say_what_each_class_draws():
    assert scenes.scene_class_names(6) == ["background", "blob", "pole", "rect", "ring", "ellipse"]
    names = scenes.scene_class_names(21)
    assert len(set(names)) == 21 and names[7] == "blob_2" and names[20] == "pole_4"
    for cls in range(1, 21):  # the name is the shape the generator draws for that index, at any class count
        assert names[cls].split("_")[0] == scenes._class_style(cls, 21).shape
        assert scenes.scene_class_names(cls + 1)[cls] == names[cls]
    with pytest.raises(ValueError, match="num_classes"):
        scenes.scene_class_names(1)


def test_make_scenes_names_classes_after_their_shapes_by_default(tmp_path):
    import json

    assert scenes.make_scenes_main(["--output", str(tmp_path / "s"), "--count", "1", "--size", "32x24",
                                    "--num-classes", "4"]) == 0  # fmt: skip
    meta = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert meta["class_names"] == ["background", "blob", "pole", "rect"]
    scenes.write_voc_dataset(str(tmp_path / "d"), count=1, size=(32, 24), num_classes=4)
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["class_names"][1] == "blob"
    assert scenes.make_scenes_main(["--output", str(tmp_path / "g"), "--count", "1", "--size", "32x24",
                                    "--num-classes", "4", "--class-names", "generic"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "g" / "dataset.json").read_text())["class_names"][1] == "class_1"


def test_write_voc_dataset_layout_and_same_bytes(tmp_path):
    out1, out2 = str(tmp_path / "a"), str(tmp_path / "b")
    s1 = scenes.write_voc_dataset(out1, count=5, size=(64, 48), num_classes=4, seed=9, val_fraction=0.4)
    scenes.write_voc_dataset(out2, count=5, size=(64, 48), num_classes=4, seed=9, val_fraction=0.4)
    files1 = [f[len(out1) :] for f in list_files(out1, None)]
    files2 = [f[len(out2) :] for f in list_files(out2, None)]
    assert files1 == files2 and len(files1) == 5 * 2 + 2 + 1
    for rel in files1:
        assert read_bytes(out1 + rel, None) == read_bytes(out2 + rel, None), rel
    assert len(s1["val"]) == 2 and len(s1["train"]) == 3 and not set(s1["val"]) & set(s1["train"])
    train_txt = (tmp_path / "a/ImageSets/Segmentation/train.txt").read_text().split()
    assert train_txt == s1["train"]
    png = Image.open(io.BytesIO((tmp_path / "a/SegmentationClass/scene_000000.png").read_bytes()))
    assert png.mode == "P"
    assert png.getpalette()[:9] == [
        0,
        0,
        0,
        128,
        0,
        0,
        0,
        128,
        0,
    ]  # VOC palette: background, class 1, class 2
    _, lab = scenes.make_scene(48, 64, seed=scenes.scene_seed(9, 0), num_classes=4)
    assert np.array_equal(np.asarray(png), lab)  # index = class, lossless
    jpg = Image.open(tmp_path / "a/JPEGImages/scene_000000.jpg")
    assert jpg.format == "JPEG" and jpg.size == (64, 48)


def test_write_voc_dataset_to_s3(bucket, storage_cfg):
    scenes.write_voc_dataset(
        f"{bucket}/voc", count=3, size=(48, 32), num_classes=3, seed=1, storage_cfg=storage_cfg
    )
    files = list_files(f"{bucket}/voc", storage_cfg)
    assert sum(f.endswith(".jpg") for f in files) == 3 and sum(f.endswith(".png") for f in files) == 3
    assert f"{bucket}/voc/ImageSets/Segmentation/val.txt" in files


def test_make_scenes_main(tmp_path):
    assert (
        scenes.make_scenes_main(
            ["--output", str(tmp_path), "--count", "2", "--size", "40x32", "--num-classes", "3"]
        )
        == 0
    )
    assert Image.open(tmp_path / "JPEGImages/scene_000001.jpg").size == (40, 32)
