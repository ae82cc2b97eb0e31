"""A second S3 implementation (s3rver, npm) besides moto: the storage layer and the whole workflow through the CLI.

s3rver keeps aws-chunked framing inside an object when a client sends request checksums, so these tests show
that the default for a custom endpoint (``request_checksum_calculation = when_required``) reaches both boto3 and
pyarrow, and that nothing but ``AWS_ENDPOINT_URL`` and the credentials is needed to run every command.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage import StorageConfig, filesystem, read_bytes, s3_client, storage_settings, write_bytes
from tests.s3compat import S3RVER_ENV

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "pipeline" / "assets" / "demo-largefov.pt"


@pytest.fixture
def s3rver_env(s3rver, monkeypatch, fresh_clients):
    """This process sees s3rver through the AWS environment only (as a user's shell would)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {**S3RVER_ENV, "AWS_ENDPOINT_URL": s3rver.endpoint_url}.items():
        monkeypatch.setenv(name, value)
    return s3rver


def _table(n: int = 5000) -> pa.Table:
    return pa.table({"i": pa.array(range(n), pa.int64()), "s": [f"row-{k}" for k in range(n)]})


def test_parquet_through_pyarrow_reads_back_with_the_custom_endpoint_default(s3rver_env):
    cfg = storage_settings()  # endpoint from AWS_ENDPOINT_URL: checksums only when required
    assert (cfg.endpoint_url, cfg.request_checksum_calculation) == (s3rver_env.endpoint_url, "when_required")
    fs, path = filesystem("s3://data/unit/t.parquet", cfg)
    pq.write_table(_table(), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(_table())
    write_bytes("s3://data/unit/b.bin", b"0123456789" * 1000, cfg)  # boto3 and pyarrow paths both
    assert read_bytes("s3://data/unit/b.bin", cfg) == b"0123456789" * 1000
    s3_client(cfg).put_object(Bucket="data", Key="unit/c.bin", Body=io.BytesIO(b"abc" * 999))
    assert read_bytes("s3://data/unit/c.bin", cfg) == b"abc" * 999


def test_aws_default_checksums_corrupt_parquet_on_s3rver(s3rver_env):
    """Why the setting exists: with AWS's default, s3rver stores the chunk framing and the Parquet file is broken."""
    cfg = storage_settings({"request_checksum_calculation": "when_supported"})
    fs, path = filesystem("s3://data/unit/bad.parquet", cfg)
    pq.write_table(_table(), path, filesystem=fs)
    with pytest.raises(pa.ArrowInvalid, match="magic bytes"):
        pq.read_table(path, filesystem=fs)


def _deeplab(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"deeplab {args[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_whole_workflow_through_the_cli_with_only_endpoint_and_credentials(s3rver_env, tmp_path):
    """make-scenes, segment, evaluate, export and a re-run that processes nothing, against s3rver, with nothing
    but AWS_ENDPOINT_URL and the credentials in the environment (no --endpoint-url, no region, no config)."""
    s3rver = s3rver_env
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(
        {**S3RVER_ENV, "AWS_ENDPOINT_URL": s3rver.endpoint_url, "DEEPLAB_LOG_DIR": str(tmp_path / "logs")}
    )
    env["PYTHONPATH"] = str(ROOT)
    data, out = "s3://data/flow/scenes", "s3://data/flow/out"
    _deeplab(["make-scenes", "--output", data, "--count", "6", "--size", "64x48"], env, tmp_path)
    segment = [
        "segment",
        "--input",
        data,
        "--output",
        out,
        "--model",
        str(MODEL),
        "--no-crf",
        "--no-evaluate",
    ]
    first = _deeplab(segment, env, tmp_path)
    assert "6 processed now, 0 done before" in first.stdout, first.stdout
    assert "errors        0" in first.stdout, first.stdout  # the scenes' classes are the model's (6)

    cfg = StorageConfig(endpoint_url=s3rver.endpoint_url)  # this process reads what the commands wrote
    manifest_text = read_bytes(f"{out}/_manifest.json", cfg).decode()
    storage = json.loads(manifest_text)["config"]["storage"]
    assert storage["endpoint_url"] == s3rver.endpoint_url
    assert storage["request_checksum_calculation"] == "when_required"
    assert "region" in storage
    assert "S3RVER" not in manifest_text  # the access key (and secret) are never recorded

    _deeplab(["evaluate", "--masks", out, "--no-ray"], env, tmp_path)
    assert read_bytes(f"{out}/report/report.html", cfg)
    _deeplab(["export", "--masks", out, "--to", "s3://data/flow/png", "--no-ray"], env, tmp_path)
    pngs = s3_client(cfg).list_objects_v2(Bucket="data", Prefix="flow/png/")["Contents"]
    assert sum(o["Key"].endswith(".png") for o in pngs) == 6

    again = _deeplab(segment, env, tmp_path)
    assert "0 processed now, 6 done before" in again.stdout, again.stdout
