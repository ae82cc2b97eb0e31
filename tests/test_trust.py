"""Trust boundaries: what a manifest may name, error text that never echoes file contents, private local files,
no token over plain http to another machine, and one line (not a traceback) for every error a user can cause."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cluster.submit import SubmitError, check_transport, submit_main
from pipeline.console.files import UnsafePath, create_private_file, open_log_file, private_dir
from pipeline.stages.labels import decode_label_png, label_class_warning
from pipeline.stages.plan import list_inputs
from pipeline.storage import StorageConfig, check_source_allowed, s3_client

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "pipeline" / "assets" / "demo-largefov.pt"
LOCAL = StorageConfig()
PASSWD_LINE = b"root:x:0:0:root:/root:/bin/bash\n"


# --- the manifest rule -------------------------------------------------------------------------------------------


def test_an_s3_manifest_names_only_s3_objects():
    check_source_allowed("s3://data/a.jpg", "s3://lists/m.csv")
    check_source_allowed("s3://other-bucket/a.jpg", "s3://lists/m.csv")
    for source in ("/etc/passwd", "../../etc/passwd", "file:///etc/passwd", "http://10.0.0.1/a.jpg"):
        with pytest.raises(PermissionError, match="an s3:// manifest may name only s3:// objects"):
            check_source_allowed(source, "s3://lists/m.csv")


def test_a_local_manifest_names_local_paths_and_s3_objects_only():
    check_source_allowed("/data/a.jpg", "/lists/m.csv")
    check_source_allowed("s3://data/a.jpg", "/lists/m.csv")
    with pytest.raises(PermissionError, match="a local manifest may name only local paths and s3://"):
        check_source_allowed("http://example.com/a.jpg", "/lists/m.csv")


def test_allowed_prefixes_replace_the_default_rule():
    allowed = ("s3://data/images/", "/srv/labels")
    check_source_allowed("s3://data/images/x/1.jpg", "s3://lists/m.csv", allowed)
    check_source_allowed("/srv/labels/1.png", "s3://lists/m.csv", allowed)  # allowed explicitly
    for source in (
        "s3://data/images-other/1.jpg",
        "s3://data/1.jpg",
        "/srv/labels/../../etc/passwd",
        "/srv/l",
    ):
        with pytest.raises(PermissionError, match="outside read.allowed_prefixes"):
            check_source_allowed(source, "s3://lists/m.csv", allowed)


def test_an_s3_manifest_naming_a_local_file_fails_without_reading_it(storage_cfg, bucket, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(PASSWD_LINE)
    name = bucket.removeprefix("s3://")
    csv = f"image_uri\ns3://{name}/a.jpg\n{secret}\n".encode()
    s3_client(storage_cfg).put_object(Bucket=name, Key="lists/m.csv", Body=csv)
    with pytest.raises(PermissionError) as err:
        list_inputs(f"{bucket}/lists/m.csv", storage_cfg)
    assert str(secret) in str(err.value) and "root:" not in str(err.value)


def test_read_allowed_prefixes_reaches_the_listing_tasks(storage_cfg, bucket, tmp_path):
    from pipeline.stages.plan import plan_source, plan_unit
    from pipeline.stages.write import IdIndex

    (tmp_path / "img.jpg").write_bytes(b"x")
    name = bucket.removeprefix("s3://")
    s3_client(storage_cfg).put_object(
        Bucket=name, Key="m.csv", Body=f"image_uri\n{tmp_path}/img.jpg\n".encode()
    )
    done, _ = IdIndex.from_ids([])
    for allowed, ok in (((), False), ((str(tmp_path) + "/",), True)):
        source = plan_source(f"{bucket}/m.csv", "manifest", None, storage_cfg, allowed)
        unit = ("manifest", f"{bucket}/m.csv")
        if ok:
            assert plan_unit(source, unit, done, "", storage_cfg, write_files=False).inputs == 1
        else:
            with pytest.raises(PermissionError):
                plan_unit(source, unit, done, "", storage_cfg, write_files=False)


def test_a_list_typed_manifest_column_is_one_line(tmp_path):
    pq.write_table(pa.table({"image_uri": [["/d/a.jpg", "/d/b.jpg"]]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"column 'image_uri' must hold strings, got list<"):
        list_inputs(str(tmp_path / "m.parquet"), LOCAL)


# --- labels: never echo contents, never decode a bomb ----------------------------------------------------------


def _png(array: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_label_errors_do_not_echo_contents_and_a_bomb_is_not_decoded():
    with pytest.raises(ValueError) as err:
        decode_label_png(PASSWD_LINE * 4)
    assert "root" not in str(err.value) and "bytes" in str(err.value)
    bomb = _png(np.zeros((2000, 3000), np.uint8))  # 6 Mpx of zeros: a few KB compressed
    with pytest.raises(ValueError, match="over the limit of 1,000,000: not decoded"):
        decode_label_png(bomb, max_pixels=1_000_000)
    with pytest.raises(ValueError, match="label PNG header claims"):  # 10 Gpx: Pillow's own bomb error
        decode_label_png(_bomb_png())
    assert decode_label_png(_png(np.full((4, 5), 3, np.uint8))).shape == (4, 5)


def test_label_class_warning_names_classes_the_model_lacks(tmp_path):
    labels = []
    for k, top in enumerate((3, 20)):
        path = tmp_path / f"{k}.png"
        arr = np.zeros((8, 8), np.uint8)
        arr[0, :3] = (1, top, 255)  # 255 is void, never a class
        path.write_bytes(_png(arr))
        labels.append(str(path))
    (tmp_path / "bad.png").write_bytes(PASSWD_LINE)  # unreadable: skipped, the job reports its row
    warning = label_class_warning([str(tmp_path / "bad.png"), *labels], 6, LOCAL, class_names=["bg", "a"])
    assert warning is not None and "[20]" in warning and "has 6 classes (bg, a)" in warning
    assert label_class_warning(labels, 21, LOCAL) is None


def test_make_scenes_defaults_to_the_shipped_models_classes(tmp_path):
    from pipeline.demo.scenes import make_scenes_main

    assert make_scenes_main(["--output", str(tmp_path / "d"), "--count", "2", "--size", "32x24"]) == 0
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert meta["num_classes"] == 6
    assert meta["class_names"] == ["background", "blob", "pole", "rect", "ring", "ellipse"]


# --- private local files -----------------------------------------------------------------------------------------


def test_token_file_is_never_written_through_a_planted_file_or_link(tmp_path):
    target = tmp_path / "victim"
    target.write_text("theirs")
    token = tmp_path / "auth_token"
    token.symlink_to(target)
    with pytest.raises(UnsafePath, match="not a regular file"):
        create_private_file(token, b"tok", what="token file")
    assert target.read_text() == "theirs"
    token.unlink()
    token.write_text("planted")
    os.chmod(token, 0o666)
    with pytest.raises(UnsafePath, match="mode 0666"):
        create_private_file(token, b"tok", what="token file")
    os.chmod(token, 0o644)
    os.chown(token, 65534, 65534)  # another user's file under the name
    with pytest.raises(UnsafePath, match="belongs to another user"):
        create_private_file(token, b"tok", what="token file")
    token.unlink()
    create_private_file(token, b"tok", what="token file")
    create_private_file(token, b"tok2", what="token file")  # a restart replaces our own
    assert token.read_bytes() == b"tok2" and (os.stat(token).st_mode & 0o777) == 0o600


def test_log_files_and_folders_are_checked(tmp_path):
    log = tmp_path / "x.log"
    fd = open_log_file(log)
    os.close(fd)
    assert (os.stat(log).st_mode & 0o777) == 0o600
    os.close(open_log_file(log))  # our own existing log: appended to
    (tmp_path / "link.log").symlink_to(log)
    with pytest.raises(OSError):  # O_NOFOLLOW: ELOOP
        open_log_file(tmp_path / "link.log")
    os.mkfifo(tmp_path / "fifo.log")
    with pytest.raises(OSError):  # no reader: fails at once (ENXIO), never blocks
        open_log_file(tmp_path / "fifo.log")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafePath, match="mode 0777"):
        private_dir(shared, what="log folder")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to another user"):
        private_dir(theirs, what="log folder")
    assert (os.stat(private_dir(tmp_path / "new" / "logs")).st_mode & 0o777) == 0o700


# --- submit over the network -------------------------------------------------------------------------------------


def test_submit_refuses_plain_http_to_another_machine(tmp_path, capsys):
    for ok in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://head:8265"):
        check_transport(ok)
    with pytest.raises(SubmitError, match="refusing plain http:// to 10.0.0.7"):
        check_transport("http://10.0.0.7:8265")
    check_transport("http://10.0.0.7:8265", insecure=True)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "segment.py").write_text("")
    rc = submit_main(["--address", "http://head.example:8265", "--working-dir", str(tmp_path), "segment"])
    assert rc == 2 and "--insecure" in capsys.readouterr().err


# --- one line for a user's error ---------------------------------------------------------------------------------


def _deeplab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}, **(env or {})}
    env.pop("DEEPLAB_LOG_DIR", None)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.integration
def test_evaluate_on_an_output_without_masks_is_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    tmp = {"TMPDIR": str(tmp_path)}  # the default log folder, <tmp>/deeplab-<uid>/logs, made here
    proc = _deeplab("evaluate", "--masks", str(tmp_path / "out"), "--no-ray", cwd=tmp_path, env=tmp)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("deeplab evaluate: error: ") and "no Parquet files under" in lines[0]
    assert (os.stat(tmp_path / f"deeplab-{os.getuid()}").st_mode & 0o777) == 0o700
    verbose = _deeplab(
        "--verbose", "evaluate", "--masks", str(tmp_path / "out"), "--no-ray", cwd=tmp_path, env=tmp
    )
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.integration
def test_a_config_that_is_not_there_or_not_yaml_is_one_line(tmp_path):
    (tmp_path / "job.yaml").write_bytes(PASSWD_LINE + b"  bad: [\n")
    for config in (str(tmp_path / "job.yaml"), "s3://no-such-bucket-here/job.yaml"):
        proc = _deeplab(
            "segment", "--config", config, "--input", "i", "--output", "o", "--model", "m.pt", cwd=tmp_path
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "root:x" not in proc.stderr
        assert "not valid YAML" in lines[0] or "cannot read config file s3://" in lines[0], lines[0]


@pytest.mark.integration
@pytest.mark.parametrize("broken", ["head", "list"])
def test_storage_errors_during_the_format_check_are_one_line(local_s3, storage_cfg, bucket, tmp_path, broken):
    """The input's format check (a HEAD through pyarrow, a listing through boto3) meets a store that answers 500
    to it and nothing else: one line naming the cause, no traceback, before any Ray is joined (the address given
    has none: joining it first would fail on Ray instead)."""
    from pipeline.demo.scenes import write_voc_dataset
    from tests.faultproxy import FaultProxy

    write_voc_dataset(f"{bucket}/scenes", count=1, size=(32, 24), num_classes=6, storage_cfg=storage_cfg)
    (tmp_path / "job.yaml").write_text("storage: {max_attempts: 1}\n")
    name = bucket.removeprefix("s3://")
    faults = (
        {"persistent": {"_manifest.json": "internal"}}  # pyarrow's HEAD of OUTPUT/_manifest.json
        if broken == "head"
        else {"every": 1, "kinds": ("internal",), "eligible": lambda m, p: m == "GET" and p == f"/{name}"}
    )  # boto3's listing of the bucket (the HEAD of the bucket, the access check, passes)
    with FaultProxy(local_s3.endpoint_url, **faults) as proxy:
        args = ["segment", "--config", str(tmp_path / "job.yaml"), "--endpoint-url", proxy.endpoint_url]
        args += [
            "--input",
            f"{bucket}/scenes",
            "--output",
            f"{bucket}/out",
            "--model",
            str(MODEL),
            "--dry-run",
            "--address",
            "127.0.0.1:1",
        ]
        env = {"AWS_ACCESS_KEY_ID": "local-demo", "AWS_SECRET_ACCESS_KEY": "local-demo-secret"}
        proc = _deeplab(*args, cwd=tmp_path, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode in (1, 2) and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("deeplab segment: error: ") and ("500" in lines[0] or "nternal" in lines[0]), (
        lines[0]
    )


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (CRC fixed, so only the size is a lie)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.integration
def test_evaluate_with_a_decompression_bomb_label_counts_it_and_goes_on(tmp_path):
    from tests.metrics.test_evaluate import make_output

    root = tmp_path / "out"
    labels = make_output(str(root), LOCAL, with_label_source=False)
    Path(labels, "b.png").write_bytes(_bomb_png())  # 10 Gpx claimed
    proc = _deeplab("evaluate", "--masks", str(root), "--labels", labels, "--no-ray", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "errors" in proc.stdout
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert metrics["num_eval_errors"] == 3  # b (the bomb), e and f (no label file): counted, not decoded
    assert "label PNG header claims" in json.dumps(metrics)


def test_plan_label_warning_samples_the_first_todo_file(tmp_path):
    from pipeline.stages.labels import plan_label_warning

    arr = np.zeros((8, 8), np.uint8)
    arr[0, 0] = 20  # a VOC class: the 6-class model has no such class
    (tmp_path / "l.png").write_bytes(_png(arr))
    todo = tmp_path / "_plan" / "todo"
    todo.mkdir(parents=True)
    rows = {"image_id": ["a", "b"], "label_source": [None, str(tmp_path / "l.png")]}
    pq.write_table(pa.table(rows), todo / "u-0.parquet")
    warning = plan_label_warning(str(todo), 6, LOCAL)
    assert warning is not None and "[20]" in warning
    assert plan_label_warning(str(todo), 21, LOCAL) is None
    assert plan_label_warning(str(tmp_path / "nothing"), 6, LOCAL) is None
