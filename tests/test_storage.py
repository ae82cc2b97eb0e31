"""Storage settings built one way everywhere, buckets' regions, request checksums, and credentials that refresh."""

from __future__ import annotations

import json
import sys

import pytest

from pipeline import storage
from pipeline.cli import build_parser
from pipeline.cluster.services import LocalS3
from pipeline.config import ConfigError, load_job_config, load_job_config_from_args
from pipeline.storage import StorageConfig, storage_settings

JOB = {"input": "in", "output": "out", "model": "m.pt"}


def test_settings_layers_flags_file_environment_defaults():
    env = {
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "http://s3-only:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_REGION": "eu-central-1",
    }
    # The S3-specific endpoint and AWS_REGION win over their generic forms, as in boto3.
    cfg = storage_settings(environ=env)
    assert (cfg.endpoint_url, cfg.region) == ("http://s3-only:2", "eu-central-1")
    cfg = storage_settings(file={"region": "ap-south-1", "max_attempts": 4}, environ=env)
    assert (cfg.endpoint_url, cfg.region, cfg.max_attempts) == ("http://s3-only:2", "ap-south-1", 4)
    cfg = storage_settings({"endpoint_url": "http://flag:3"}, {"endpoint_url": "http://file:4"}, env)
    assert cfg.endpoint_url == "http://flag:3"
    ignored = storage_settings(environ={**env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"})
    assert (ignored.endpoint_url, ignored.region) == (None, "eu-central-1")  # boto3 ignores them too
    defaults = storage_settings(environ={})
    assert (defaults.endpoint_url, defaults.region) == (None, None)


def test_request_checksums_default_by_endpoint_and_follow_the_setting():
    assert storage_settings(environ={}).request_checksum_calculation == "when_supported"  # AWS's default
    custom = storage_settings(environ={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert custom.request_checksum_calculation == "when_required"
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_SUPPORTED"}
    assert storage_settings(environ=env).request_checksum_calculation == "when_supported"
    assert StorageConfig(endpoint_url="http://x:1").checksum_mode == "when_required"
    assert storage.s3_client(custom).meta.config.request_checksum_calculation == "when_required"
    with pytest.raises(ValueError, match="request_checksum_calculation must be one of"):
        StorageConfig(request_checksum_calculation="always")


def test_segment_takes_the_aws_environment_and_records_it(monkeypatch, tmp_path):
    """The bar's case: AWS_ENDPOINT_URL and AWS_DEFAULT_REGION alone reach `deeplab segment`'s config, whose
    to_dict() is what the run's _manifest.json records; no credential appears there."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    args = build_parser().parse_args(["segment", "--input", "in", "--output", "out", "--model", "m.pt"])
    cfg, _ = load_job_config_from_args(args)
    recorded = cfg.to_dict()["storage"]
    assert recorded["endpoint_url"] == "http://127.0.0.1:9000" and recorded["region"] == "eu-west-3"
    assert recorded["request_checksum_calculation"] == "when_required"
    assert "very-secret-value" not in json.dumps(cfg.to_dict(), default=str)
    # A config file's key beats the environment; a flag beats both.
    path = tmp_path / "job.yaml"
    path.write_text("storage: {region: us-west-2, endpoint_url: 'http://file:1'}\n")
    cfg, _ = load_job_config(str(path), **JOB)
    assert (cfg.storage.region, cfg.storage.endpoint_url) == ("us-west-2", "http://file:1")
    args = build_parser().parse_args(
        ["segment", "--config", str(path), *("--input", "in", "--output", "out", "--model", "m.pt")]
        + ["--endpoint-url", "http://flag:2", "--region", "sa-east-1"]
    )
    cfg, _ = load_job_config_from_args(args)
    assert (cfg.storage.region, cfg.storage.endpoint_url) == ("sa-east-1", "http://flag:2")


def test_config_file_on_s3(storage_cfg, bucket, monkeypatch):
    """`segment --config s3://...` reads the YAML through storage with the environment's endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", storage_cfg.endpoint_url)
    name = bucket.removeprefix("s3://")
    storage.s3_client(storage_cfg).put_object(Bucket=name, Key="cfg/crf.yaml", Body=b"crf: {iterations: 3}\n")
    cfg, crf_raw = load_job_config(f"{bucket}/cfg/crf.yaml", **JOB)
    assert crf_raw == {"iterations": 3} and cfg.storage.endpoint_url == storage_cfg.endpoint_url
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml: no such file or object"):
        load_job_config(f"{bucket}/cfg/missing.yaml", **JOB)


def test_a_buckets_region_is_asked_on_aws_and_reaches_pyarrow(storage_cfg, monkeypatch):
    """On AWS (no endpoint) without a region, pyarrow signs for the bucket's own region (asked once)."""
    client = storage.s3_client(storage_cfg)
    client.create_bucket(Bucket="paris-data", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    assert storage.ask_bucket_region(client, "paris-data") == "eu-west-3"
    asked: list[str] = []

    def moto_client(cfg, region=None):  # "AWS" played by the moto server
        asked.append(cfg.endpoint_url or "aws")
        return client

    monkeypatch.setattr(storage, "s3_client", moto_client)
    storage.bucket_region.cache_clear()
    try:
        aws = StorageConfig()
        fs, path = storage.filesystem("s3://paris-data/a/b.jpg", aws)
        assert (fs.region, path) == ("eu-west-3", "paris-data/a/b.jpg")
        storage.filesystem("s3://paris-data/c.jpg", aws)
        assert asked == ["aws"]  # once per bucket and process
        fs, _ = storage.filesystem("s3://paris-data/c.jpg", StorageConfig(region="us-west-1"))
        assert fs.region == "us-west-1"  # a given region is used as it is
    finally:
        storage.bucket_region.cache_clear()


# A credential_process that hands out whichever key the test made current, expiring in 11 minutes: inside
# botocore's 15-minute refresh window, so every use refreshes (the rotation of an STS or IRSA session).
CREDENTIAL_PROCESS = r"""
import datetime, json, pathlib, sys
state = pathlib.Path(sys.argv[1])
key = json.loads((state / "current.json").read_text())
with open(state / "calls", "a") as f:
    f.write(key["AccessKeyId"] + "\n")
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=11)
print(json.dumps({"Version": 1, "AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"],
                  "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}))
"""


@pytest.mark.integration
def test_credentials_rotate_during_a_run(tmp_path, monkeypatch, fresh_clients):
    """A moto server that checks access keys (IAM auth on): the key in use is deleted mid-run, the credential
    process hands out the next one, and pyarrow's writes and boto3's reads keep working."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")  # the moto server's first 3 calls set up IAM
    with LocalS3() as server:
        iam = boto3.client(  # the unauthenticated set-up calls: any key
            "iam", endpoint_url=server.endpoint_url, region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup",
        )  # fmt: skip
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(policy))
        admin = iam.create_access_key(UserName="admin")["AccessKey"]
        admin_iam = boto3.client(
            "iam",
            endpoint_url=server.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=admin["AccessKeyId"],
            aws_secret_access_key=admin["SecretAccessKey"],
        )
        admin_iam.create_user(UserName="job")
        admin_iam.put_user_policy(UserName="job", PolicyName="all", PolicyDocument=json.dumps(policy))

        def make_current() -> str:
            key = admin_iam.create_access_key(UserName="job")["AccessKey"]
            (tmp_path / "current.json").write_text(json.dumps(key, default=str))
            return key["AccessKeyId"]

        first = make_current()
        (tmp_path / "helper.py").write_text(CREDENTIAL_PROCESS)
        (tmp_path / "config").write_text(
            f"[default]\ncredential_process = {sys.executable} {tmp_path / 'helper.py'} {tmp_path}\n"
        )
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        cfg = StorageConfig(endpoint_url=server.endpoint_url)
        storage.s3_client(cfg).create_bucket(Bucket="rotating")
        table = pa.table({"i": list(range(100))})

        def write_and_read(name: str) -> None:
            fs, path = storage.filesystem(f"s3://rotating/{name}.parquet", cfg)  # pyarrow writes
            pq.write_table(table, path, filesystem=fs)
            data = storage.read_bytes(f"s3://rotating/{name}.parquet", cfg)  # boto3 reads
            assert pq.read_table(pa.BufferReader(data)).equals(table)

        write_and_read("before")
        held = storage._filesystems[(cfg, "us-east-1")]
        assert held[1].access_key == first
        second = make_current()  # rotation: the next key is current, the one in use is revoked
        admin_iam.delete_access_key(UserName="job", AccessKeyId=first)
        write_and_read("after")
        assert storage._filesystems[(cfg, "us-east-1")][1].access_key == second  # pyarrow's was rebuilt
        calls = (tmp_path / "calls").read_text().split()
        assert calls.count(first) >= 1 and calls.count(second) >= 1  # the process was asked again
        listing = storage.list_files("s3://rotating", cfg)
        assert listing == ["s3://rotating/after.parquet", "s3://rotating/before.parquet"]


@pytest.mark.integration
def test_segment_through_the_cli_records_the_environments_endpoint_and_region(
    local_s3, storage_cfg, bucket, tmp_path
):
    """The bar: AWS_ENDPOINT_URL and AWS_DEFAULT_REGION alone (no flag, no config) reach `deeplab segment`, and
    its _manifest.json records both."""
    import os
    import subprocess
    from pathlib import Path

    from pipeline.demo.scenes import write_voc_dataset

    root = Path(__file__).resolve().parent.parent
    write_voc_dataset(f"{bucket}/scenes", count=2, size=(48, 32), num_classes=6, storage_cfg=storage_cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(
        AWS_ACCESS_KEY_ID=os.environ["AWS_ACCESS_KEY_ID"],
        AWS_SECRET_ACCESS_KEY=os.environ["AWS_SECRET_ACCESS_KEY"],
        AWS_ENDPOINT_URL=local_s3.endpoint_url,
        AWS_DEFAULT_REGION="eu-west-3",
        PYTHONPATH=str(root),
        DEEPLAB_LOG_DIR=str(tmp_path / "logs"),
    )
    model = root / "pipeline" / "assets" / "demo-largefov.pt"
    args = ["segment", "--input", f"{bucket}/scenes", "--output", f"{bucket}/out", "--model", str(model)]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args, "--no-crf", "--no-evaluate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = storage.read_bytes(f"{bucket}/out/_manifest.json", storage_cfg).decode()
    recorded = json.loads(manifest)["config"]["storage"]
    assert (recorded["endpoint_url"], recorded["region"]) == (local_s3.endpoint_url, "eu-west-3")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in manifest
