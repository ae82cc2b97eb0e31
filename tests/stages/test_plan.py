"""Plan stage: units listed in Ray tasks into OUTPUT/_plan, done items left out, every input format, manifests."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.config import ReadConfig, load_job_config
from pipeline.flow import plan_job
from pipeline.segment import JobError, run_segment
from pipeline.stages.plan import PlanSource, list_inputs, list_unit, plan_unit
from pipeline.stages.write import IdIndex
from pipeline.storage import StorageConfig, join, list_files, s3_client, write_bytes
from tests.test_segment import tiny_checkpoint

LOCAL = StorageConfig()


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _plan_rows(plan_uri: str, kind: str, storage_cfg: StorageConfig) -> list[dict]:
    rows: list[dict] = []
    for uri in list_files(join(plan_uri, kind), storage_cfg, (".parquet",)):
        from pipeline.storage import read_bytes

        rows.extend(pq.read_table(io.BytesIO(read_bytes(uri, storage_cfg))).to_pylist())
    return sorted(rows, key=lambda r: r[S.ID])


def test_dir_unit_ids_labels_collisions_and_subdirs(tmp_path):
    root = tmp_path / "images"
    for name in ("a.jpg", "a.png", "b.jpg", ".DS_Store", "sub/c.jpg", "sub/deeper/d.jpg", ".hidden/e.jpg"):
        _touch(root / name)
    _touch(tmp_path / "labels" / "b.png")
    _touch(tmp_path / "labels" / "sub" / "c.png")
    source = PlanSource("images", str(root), str(tmp_path / "labels"))
    [items], subunits, _ = list_unit(source, ("dir", ""), LOCAL)
    # Colliding stems keep their extension; hidden names are not data; labels by <image_id>.png.
    assert items[S.ID] == ["a.jpg", "a.png", "b"]
    assert items[S.LABEL_SOURCE] == [None, None, str(tmp_path / "labels" / "b.png")]
    assert subunits == [("dir", "sub")]
    [items], subunits, _ = list_unit(source, ("dir", "sub"), LOCAL)
    assert items[S.ID] == ["sub/c"] and items[S.SOURCE] == [str(root / "sub" / "c.jpg")]
    assert items[S.LABEL_SOURCE] == [str(tmp_path / "labels" / "sub" / "c.png")]
    assert subunits == [("dir", "sub/deeper")]
    fmt, every = list_inputs(str(root), LOCAL, labels_uri=str(tmp_path / "labels"))
    assert fmt == "images" and [i[S.ID] for i in every] == ["a.jpg", "a.png", "b", "sub/c", "sub/deeper/d"]


def test_plan_unit_writes_todo_without_done_ids_and_every_input(tmp_path):
    root = tmp_path / "images"
    for i in range(5):
        _touch(root / f"img{i}.jpg")
    done, _ = IdIndex.from_ids(["img1", "img3", "not-an-input"])
    plan_uri = str(tmp_path / "_plan")
    result = plan_unit(PlanSource("images", str(root)), ("dir", ""), done, plan_uri, LOCAL)
    assert (result.inputs, result.todo, result.labelled) == (5, 3, 0)
    assert [r[S.ID] for r in _plan_rows(plan_uri, "todo", LOCAL)] == ["img0", "img2", "img4"]
    assert [r[S.ID] for r in _plan_rows(plan_uri, "inputs", LOCAL)] == [f"img{i}" for i in range(5)]
    # write_files=False (segment --dry-run): the same counts, no file
    dry_uri = str(tmp_path / "_dry")
    dry = plan_unit(PlanSource("images", str(root)), ("dir", ""), done, dry_uri, LOCAL, write_files=False)
    assert (dry.inputs, dry.todo, dry.labelled) == (5, 3, 0) and not (tmp_path / "_dry").exists()


def test_id_index_membership_and_duplicates():
    ids = [f"id/{i}" for i in range(2000)]
    index, dups = IdIndex.from_ids(ids + ids[:7])
    assert len(index) == 2000 and dups == 7
    probe = ["id/0", "id/1999", "id/2000", "", "ID/0"]
    assert index.contains(probe).tolist() == [True, True, False, False, False]
    assert not IdIndex().contains(["x"]).any()


def test_manifest_csv_and_parquet(tmp_path):
    (tmp_path / "m").mkdir()
    csv = "image_uri,label_uri,image_id\nimgs/a.jpg,labels/a.png,\n/abs/b.png,,bee\ns3://bkt/k/c.jpeg,,\n"
    (tmp_path / "m" / "list.csv").write_text(csv)
    fmt, items = list_inputs(str(tmp_path / "m" / "list.csv"), LOCAL)
    assert fmt == "manifest"
    by_id = {i[S.ID]: i for i in items}
    # Relative URIs are relative to the manifest's folder; ids default to the key/path without extension.
    base = str(tmp_path / "m")
    assert sorted(by_id) == sorted([f"{base.lstrip('/')}/imgs/a", "bee", "bkt/k/c"])
    a = by_id[f"{base.lstrip('/')}/imgs/a"]
    assert a[S.SOURCE] == f"{base}/imgs/a.jpg" and a[S.LABEL_SOURCE] == f"{base}/labels/a.png"
    assert by_id["bee"][S.SOURCE] == "/abs/b.png" and by_id["bee"][S.LABEL_SOURCE] is None
    table = pa.table({"source": ["s3://b/x.jpg", "s3://b/y.jpg"], "id": ["x", "y"]})
    pq.write_table(table, tmp_path / "m" / "more.parquet")
    fmt, items = list_inputs(str(tmp_path / "m"), LOCAL, input_format="manifest")
    assert fmt == "manifest" and len(items) == 5 and {"x", "y"} <= {i[S.ID] for i in items}
    pq.write_table(pa.table({"path": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no image URI column: expected one of"):
        list_inputs(str(tmp_path / "bad.parquet"), LOCAL)


def test_plan_job_in_ray_tasks_over_s3_prefixes_voc_split_and_shards(ray_local, storage_cfg, bucket):
    """Breadth-first listing on a real S3 endpoint: nested prefixes, labels, a VOC split, resume by the index."""
    client = s3_client(storage_cfg)
    name = bucket.removeprefix("s3://")
    for key in (
        "voc/JPEGImages/x/1.jpg",
        "voc/JPEGImages/x/2.jpg",
        "voc/JPEGImages/3.jpg",
        "voc/JPEGImages/4.jpg",
    ):
        client.put_object(Bucket=name, Key=key, Body=b"j")
    client.put_object(Bucket=name, Key="voc/SegmentationClass/x/2.png", Body=b"p")
    client.put_object(Bucket=name, Key="voc/ImageSets/Segmentation/val.txt", Body=b"x/2\n3\nmissing\n")
    done_ref = ray_local.put(IdIndex.from_ids(["3"])[0])
    out = f"{bucket}/out"
    job = plan_job(ReadConfig(input_uri=f"{bucket}/voc"), out, storage_cfg, done_ref)
    assert (job.fmt, job.inputs, job.todo, job.labelled, job.units) == ("voc", 4, 3, 1, 2)
    todo = _plan_rows(job.uri, "todo", storage_cfg)
    assert [r[S.ID] for r in todo] == ["4", "x/1", "x/2"]
    assert todo[2][S.LABEL_SOURCE] == f"{bucket}/voc/SegmentationClass/x/2.png"
    # A second plan replaces the first (no stale plan files), here with a split.
    job = plan_job(ReadConfig(input_uri=f"{bucket}/voc", split="val"), out, storage_cfg, done_ref)
    assert (job.inputs, job.todo) == (2, 1)
    assert [r[S.ID] for r in _plan_rows(job.uri, "inputs", storage_cfg)] == ["3", "x/2"]

    # Shards: one unit per shard file, sources point into the shard.
    shard = io.BytesIO()
    pq.write_table(pa.table({"image_id": ["s1", "s2"], "image": [b"a", b"b"], "label": [b"l", None]}), shard)
    write_bytes(f"{bucket}/shards/shard-00000.parquet", shard.getvalue(), storage_cfg)
    manifest = b'{"format": "deeplab-shards/1", "shards": [{"path": "shard-00000.parquet"}]}'
    write_bytes(f"{bucket}/shards/_manifest.json", manifest, storage_cfg)
    job = plan_job(ReadConfig(input_uri=f"{bucket}/shards"), out, storage_cfg, done_ref)
    rows = _plan_rows(job.uri, "todo", storage_cfg)
    assert job.fmt == "shards" and [r[S.SHARD] for r in rows] == [f"{bucket}/shards/shard-00000.parquet"] * 2
    assert [r[S.LABEL_SOURCE] is not None for r in rows] == [True, False]


def test_a_bad_manifest_fails_the_job_in_one_line(ray_local, tmp_path):
    """A manifest without an image column: the job stops before any work, naming the file and the columns."""
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "list.parquet")
    cfg, crf_raw = load_job_config(
        input=str(tmp_path / "list.parquet"),
        output=str(tmp_path / "out"),
        model=tiny_checkpoint(tmp_path, 3),
        evaluate=False,
    )
    with pytest.raises(JobError) as err:
        run_segment(cfg, crf_raw)
    message = str(err.value)
    assert "no image URI column: expected one of" in message and "list.parquet" in message
    assert len(message.splitlines()) == 1, message
    assert not (tmp_path / "out" / "masks").exists()


def test_duplicate_manifest_ids_fail_before_any_work(ray_local, tmp_path):
    pq.write_table(
        pa.table({"image_uri": ["/x/a.jpg", "/y/a.jpg"], "image_id": ["a", "a"]}), tmp_path / "m.parquet"
    )
    cfg, crf_raw = load_job_config(
        input=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"), model=tiny_checkpoint(tmp_path, 3)
    )
    with pytest.raises(JobError, match="1 image ids name more than one input") as err:
        run_segment(cfg, crf_raw)
    assert "'a' <- /x/a.jpg" in str(err.value) and "'a' <- /y/a.jpg" in str(err.value)  # both keys named
    assert not (tmp_path / "out" / "masks").exists()


def test_plan_unit_streams_a_manifest_into_block_sized_todo_files(tmp_path, monkeypatch):
    import pipeline.stages.plan as plan

    monkeypatch.setattr(
        plan, "PLAN_ROWS_PER_FILE", 7
    )  # several listing chunks, todo rows carried across them
    pq.write_table(pa.table({"image_uri": [f"/d/{i:02d}.jpg" for i in range(20)]}), tmp_path / "m.parquet")
    done, _ = IdIndex.from_ids([f"d/{i:02d}" for i in (0, 5, 6, 13, 19)])
    plan_uri = str(tmp_path / "_plan")
    source = PlanSource("manifest", str(tmp_path / "m.parquet"))
    result = plan_unit(source, ("manifest", source.image_root), done, plan_uri, LOCAL, todo_rows_per_file=4)
    assert (result.inputs, result.todo) == (20, 15)
    sizes = sorted(pq.read_metadata(p).num_rows for p in list_files(join(plan_uri, "todo"), LOCAL))
    assert sizes == [3, 4, 4, 4]  # one block per file; only the last is short
    todo = [r[S.ID] for r in _plan_rows(plan_uri, "todo", LOCAL)]
    assert todo == [f"d/{i:02d}" for i in range(20) if i not in (0, 5, 6, 13, 19)]
    assert len(_plan_rows(plan_uri, "inputs", LOCAL)) == 20
