"""Training: the recipe's pieces, loss goes down, checkpoint save/load/resume, and a real TorchTrainer run on S3."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.train import build_parser, config_from_args, train_main
from pipeline.demo import scenes
from pipeline.model.deeplab import build_model
from pipeline.model.weights import load_checkpoint
from pipeline.stages import shards
from pipeline.storage import StorageConfig, exists, read_bytes
from pipeline.train.config import TrainConfig
from pipeline.train.data import resolve_classes
from pipeline.train.ddp import run_training, train_loop_per_worker
from pipeline.train.recipe import lr_at, miou, param_groups, preprocess, stride8_targets

TINY = {"width": 0.0625, "batch_size": 2, "crop_size": 33, "threads_per_worker": 1, "base_lr": 1e-2}


def test_stride8_targets_follow_the_family_offset():
    labels = torch.arange(40 * 33, dtype=torch.int64).reshape(1, 40, 33) % 200
    t = stride8_targets(labels, 5, 5, offset=0)
    assert torch.equal(t[0], labels[0, ::8, ::8][:5, :5])  # pool3 family: label[::8, ::8]
    t7 = stride8_targets(labels, 7, 5, offset=7)  # vgg128_noup: score j sits at pixel 8j - 7
    assert (t7[0, 0] == 255).all() and (t7[0, :, 0] == 255).all()  # pixel -7: outside
    assert t7[0, 1, 1] == labels[0, 1, 1] and t7[0, 2, 3] == labels[0, 9, 17]
    assert t7[0, 5, 4] == labels[0, 33, 25] and (t7[0, 6] == 255).all()  # row 6 -> pixel 41 >= 40: outside


def test_param_groups_follow_caffe_multipliers():
    cfg = TrainConfig(train_input="x", output="y", base_lr=1e-3, variant="deeplab-msc-largefov")
    model = build_model(cfg.variant, num_classes=3, width=0.0625)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["score_weight"]["lr"] == pytest.approx(1e-2) and groups["score_bias"][
        "lr"
    ] == pytest.approx(2e-2)
    assert groups["trunk_weight"]["lr"] == pytest.approx(1e-3) and groups["trunk_bias"][
        "lr"
    ] == pytest.approx(2e-3)
    assert groups["trunk_bias"]["weight_decay"] == 0 and groups["trunk_weight"]["weight_decay"] == 5e-4
    score = {id(p) for p in groups["score_weight"]["params"]}
    assert id(model.classifier.fc8.weight) in score and id(model.msc["pool2"].ms.weight) in score
    assert id(model.msc["pool2"].fc.weight) not in score
    assert len(groups["score_weight"]["params"]) == 6  # fc8 + five *_ms convs
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_lr_steps_and_miou():
    cfg = TrainConfig(train_input="x", output="y", base_lr=1e-3, lr_step_iters=100, lr_gamma=0.1)
    assert lr_at(99, cfg) == pytest.approx(1e-3) and lr_at(100, cfg) == pytest.approx(1e-4)
    value, per_class = miou(np.array([[3, 1], [0, 4]]))
    assert per_class == pytest.approx([0.75, 0.8]) and value == pytest.approx(0.775)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(train_input="x", output="y", epochs=0)


def _fixed_batch_loss(model, rgb: np.ndarray, lab: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(preprocess(rgb[None, :33, :33]))
        target = stride8_targets(torch.from_numpy(lab[None, :33, :33]), *logits.shape[2:], offset=0)
        return float(F.cross_entropy(logits, target, ignore_index=255))


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("voc"))
    scenes.write_voc_dataset(root, count=10, size=(48, 40), num_classes=3, seed=4, val_fraction=0.2)
    return root


def test_training_steps_reduce_the_loss_and_resume_round_trips(tmp_path, tiny_voc):
    base = TrainConfig(train_input=tiny_voc, output=str(tmp_path / "a"), epochs=3, seed=1, **TINY)
    base = resolve_classes(base, StorageConfig())
    assert base.num_classes == 3 and base.class_names == ("background", "blob", "pole")
    torch.manual_seed(base.seed)
    initial = build_model(base.variant, num_classes=3, width=base.width)
    train_loop_per_worker({"train": base.to_dict(), "storage": {}})

    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and all("val_miou" in h for h in history)
    final, meta = load_checkpoint(str(tmp_path / "a" / "final.pt"), expected_variant=base.variant)
    assert meta["class_names"] == list(base.class_names) and meta["provenance"]["epoch"] == "3"
    # keep_checkpoints=2: epoch 1's files were deleted, 2 and 3 kept
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == [
        "epoch-0002.pt",
        "epoch-0002.state.pt",
        "epoch-0003.pt",
        "epoch-0003.state.pt",
    ]
    # Fitting the training data: the loss on a training image is lower after 3 epochs than at init.
    ids = (read_bytes(f"{tiny_voc}/ImageSets/Segmentation/train.txt", StorageConfig()).decode().split())[:3]
    before = after = 0.0
    for image_id in ids:
        rgb, lab = scenes.make_scene(40, 48, seed=scenes.scene_seed(4, int(image_id[-6:])), num_classes=3)
        before += _fixed_batch_loss(initial, rgb, lab)
        after += _fixed_batch_loss(final, rgb, lab)
    assert after < before * 0.8, (before, after)

    # Resume: 1 epoch, then the same config with epochs=3 continues from latest.json to the same weights.
    two = dataclasses.replace(base, output=str(tmp_path / "b"), epochs=1)
    train_loop_per_worker({"train": two.to_dict(), "storage": {}})
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["epoch"] == 1
    train_loop_per_worker({"train": dataclasses.replace(two, epochs=3).to_dict(), "storage": {}})
    resumed, _ = load_checkpoint(str(tmp_path / "b" / "final.pt"))
    history_b = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["epoch"] for h in history_b] == [1, 2, 3]
    assert history_b[2]["train_loss"] == pytest.approx(history[2]["train_loss"], rel=1e-4)
    for (name, a), (_, b) in zip(final.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_torch_trainer_on_s3_shards(ray_local, bucket, storage_cfg, tmp_path):
    scenes.write_voc_dataset(
        f"{bucket}/voc",
        count=10,
        size=(48, 40),
        num_classes=3,
        seed=2,
        val_fraction=0.2,
        storage_cfg=storage_cfg,
    )
    for split in ("train", "val"):
        shards.shard_dataset(
            f"{bucket}/voc",
            f"{bucket}/shards/{split}",
            images_per_shard=4,
            split=split,
            storage_cfg=storage_cfg,
        )
    cfg = TrainConfig(
        train_input=f"{bucket}/shards/train",
        val_input=f"{bucket}/shards/val",
        output=f"{bucket}/runs/tiny",
        epochs=2,
        ray_storage_path=str(tmp_path / "ray"),
        **TINY,
    )
    result = run_training(cfg, storage_cfg)
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_miou"] <= 1 for h in history)
    assert exists(f"{bucket}/runs/tiny/final.pt", storage_cfg)
    model, meta = load_checkpoint(result["final"], storage_cfg=storage_cfg, expected_num_classes=3)
    assert meta["variant"] == "deeplab-largefov" and model.width == TINY["width"]


def test_train_cli_parsing(tmp_path):
    args = build_parser().parse_args(
        [
            "--train-input",
            "s3://b/shards/train",
            "--output",
            "s3://b/run",
            "--val-split",
            "none",
            "--no-resume",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.val_split is None and cfg.resume is False and cfg.variant == "deeplab-largefov"
    assert train_main(["--train-input", "x", "--output", str(tmp_path), "--epochs", "0"]) == 2


def test_sums_are_reduced_where_the_backend_wants_them(monkeypatch):
    import torch.distributed as dist

    from pipeline.train import ddp as train

    # NCCL reduces device tensors only: the rank's GPU (cuda:1 here), not the CPU tensor it was before.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert train._collective_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert train._collective_device(torch.device("cpu")) == torch.device("cuda", 2)
    for backend in ("gloo", "cpu:gloo,cuda:nccl"):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert train._collective_device(torch.device("cuda", 1)) == torch.device("cpu")
    monkeypatch.undo()

    # A real gloo group (one process, world size faked to 2 so the reduce is not skipped): values and dtype.
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        seen = []
        real = dist.all_reduce
        monkeypatch.setattr(
            dist, "all_reduce", lambda t, *a, **k: (seen.append(t.device), real(t, *a, **k))[1]
        )
        out = train._all_reduce_sum(np.array([[3, 1], [0, 2**40]], np.int64))
        assert out.dtype == np.int64 and out.tolist() == [[3, 1], [0, 2**40]]
        assert seen == [torch.device("cpu")]
    finally:
        dist.destroy_process_group()


def test_optimizer_state_loads_onto_the_cpu(monkeypatch):
    import io

    from pipeline.train import ddp as train

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "epoch": 1}, buf)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    state = train._load_state(buf.getvalue())
    assert calls == [{"map_location": "cpu", "weights_only": True}]  # a GPU-saved state opens on any rank
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(state["optimizer"])
    torch.testing.assert_close(
        fresh.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )
