"""Cluster definitions: ray_cluster.yaml through Ray's own validator, KubeRay manifests' structure, no secrets."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
K8S = ROOT / "infra" / "k8s"
INFRA_FILES = [
    CLUSTER_YAML,
    ROOT / "infra" / "Dockerfile",
    *sorted(K8S.glob("*.yaml")),
    *sorted((ROOT / "infra" / "local").glob("*")),
]
# Key names and value shapes of real credentials. The local S3 placeholders live in pipeline/services.py only.
SECRET_PATTERNS = [
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r"AWS_SECRET"),
    re.compile(r"AWS_SESSION_TOKEN"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*\S"),  # a token value, as opposed to RAY_AUTH_TOKEN_PATH
]


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_ray_cluster_yaml_passes_rays_validator():
    prepared = prepare_config(_cluster())
    validate_config(prepared)  # raises on schema violations
    types = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws"
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    crf = [t for t in types.values() if t["resources"].get("crf", 0) >= 1 and not t["resources"].get("GPU")]
    assert gpu and crf, f"expected a GPU worker type and a CRF CPU worker type, got {json.dumps(types)[:300]}"
    for t in gpu + crf:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"]
        assert "IamInstanceProfile" in t["node_config"]
    assert "IamInstanceProfile" in types[prepared["head_node_type"]]["node_config"]


def test_ray_cluster_yaml_validator_is_live():
    """The same validator rejects what Ray would reject: proves the test above can fail."""
    bad = copy.deepcopy(_cluster())
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # resources must be integers
    with pytest.raises(Exception, match="integer"):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(_cluster())
    bad["available_node_types"]["cpu_worker"]["instance_type"] = "c7i.4xlarge"  # unknown key
    with pytest.raises(Exception, match="Additional properties"):
        validate_config(prepare_config(bad))


def test_ray_cluster_yaml_image_setup_and_auth():
    cfg = _cluster()
    docker = cfg["docker"]
    assert docker["image"].endswith("-cpu") and docker["container_name"]
    assert cfg["available_node_types"]["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")
    assert any("pip install" in c and "deeplab-pipeline" in c for c in cfg["setup_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    # Token auth must be on every node, and the token comes from a mounted file, never an inline value.
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    out = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec["workerGroupSpecs"]]
    return out


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu-workers", "cpu-workers"}
    gpu = groups["gpu-workers"]
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-gpu")
    cpu = groups["cpu-workers"]
    assert json.loads(json.loads(cpu["rayStartParams"]["resources"])) == {"crf": 16}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for name, pod in _pod_specs(spec):
        assert pod["serviceAccountName"] == "deeplab-ray", name
        for c in pod["containers"]:
            assert c["resources"]["limits"], f"{name}/{c['name']} needs resource limits"
            assert not any("AWS" in e.get("name", "") for e in c.get("env", [])), f"{name}: AWS keys in env"


def test_raycluster_manifest_structure():
    (doc,) = _docs("raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(doc["spec"])


def test_rayjob_manifest_runs_segment_job():
    (doc,) = _docs("rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "jobs.segment"]
    flags = dict(zip(entry[3::2], entry[4::2], strict=True))
    assert all(flags[k].startswith("s3://") for k in ("--input", "--output", "--model"))
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    _check_cluster_spec(spec["rayClusterSpec"])


def test_service_account_uses_irsa_not_keys():
    (doc,) = _docs("serviceaccount.yaml")
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == (
        "v1",
        "ServiceAccount",
        "deeplab-ray",
    )
    assert doc["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


@pytest.mark.parametrize("path", INFRA_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_secrets_in_infra_files(path: Path):
    text = path.read_text()
    hits = [p.pattern for p in SECRET_PATTERNS if p.search(text)]
    assert not hits, f"{path.relative_to(ROOT)} matches secret patterns {hits}"


def test_secret_scan_catches_a_planted_key():
    planted = "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    value: abc\n"
    assert any(p.search(planted) for p in SECRET_PATTERNS)
    assert any(p.search("aws_access_key_id = AKIAABCDEFGHIJKLMNOP") for p in SECRET_PATTERNS)


def test_dockerfile_has_cpu_and_cuda_variants():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=rayproject/ray:2\.60\.0-py311-cpu$", text, re.MULTILINE)
    assert "BASE=rayproject/ray:2.60.0-py311-gpu" in text  # the documented CUDA build
    assert "ARG TORCH_INDEX=cpu" in text and "download.pytorch.org/whl/${TORCH_INDEX}" in text
    assert "-c constraints.txt" in text and re.search(r"pip install [^\n]*\.\s", text)
    ignored = (ROOT / "infra" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
