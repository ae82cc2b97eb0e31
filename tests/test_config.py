"""Job config: a flag overrides one key of its section, never the file's whole section; loading it needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.config import load_job_config

# One non-default key per section in the file, and a different key of the same section as the override.
FILE_KEYS = {
    "read": {"items_per_block": 7},
    "write": {"rows_per_file": 11},
    "dcnn": {"batch_size": 3},
    "decode": {"max_pixels": 12345678},
    "pools": {"crf_min_actors": 2},
    "storage": {"max_attempts": 5},
    "crf": {"iterations": 4},
}
OVERRIDES = {
    "read": {"split": "val"},
    "write": {"output_uri": "s3://b/other"},
    "dcnn": {"autocast": "bf16"},
    "decode": {"num_classes": 5},
    "pools": {"crf_max_actors": 6},
    "storage": {"endpoint_url": "http://127.0.0.1:9"},
    "crf": {"bi_w": 5.0},
}


@pytest.mark.parametrize("section", sorted(FILE_KEYS))
def test_an_override_merges_key_by_key(tmp_path, section):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": "in", "output": "out", "model": "m.pt", **FILE_KEYS}))
    cfg, crf_raw = load_job_config(str(path), **{section: OVERRIDES[section]})
    got = crf_raw if section == "crf" else vars(getattr(cfg, section))
    for key, value in {**FILE_KEYS[section], **OVERRIDES[section]}.items():
        assert got[key] == value, (section, key)


def test_cli_endpoint_flag_keeps_the_files_storage_keys(tmp_path):
    """The reported case: --endpoint-url with --config dropped storage.max_attempts."""
    from pipeline.cli import build_parser
    from pipeline.config import load_job_config_from_args

    path = tmp_path / "job.yaml"
    path.write_text("input: in\noutput: out\nmodel: m.pt\nstorage: {max_attempts: 2, region: eu-west-1}\n")
    args = build_parser().parse_args(
        ["segment", "--config", str(path), "--endpoint-url", "http://127.0.0.1:9"]
    )
    cfg, _ = load_job_config_from_args(args)
    assert (cfg.storage.endpoint_url, cfg.storage.max_attempts, cfg.storage.region) == (
        "http://127.0.0.1:9",
        2,
        "eu-west-1",
    )


def test_the_job_configuration_loads_without_torch():
    """A config error must not wait for torch (1-2 s): config, the job driver and the CLI import it only when they
    read a model."""
    code = "import sys, pipeline.cli, pipeline.config, pipeline.segment; print(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
