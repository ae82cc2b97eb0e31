"""Cluster definitions: ray_cluster.yaml through Ray's own validator, KubeRay manifests' structure, no secrets."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
K8S = ROOT / "infra" / "k8s"
INFRA_FILES = [
    CLUSTER_YAML,
    ROOT / "infra" / "Dockerfile",
    ROOT / "infra" / "cluster-job.yaml",
    ROOT / "infra" / "check_torch.py",
    *sorted(K8S.glob("*.yaml")),
    *sorted(p for p in (ROOT / "infra" / "local").glob("*") if p.is_file()),  # not the npm folder
]
# Key names and value shapes of real credentials. The local S3 placeholders live in pipeline/cluster/services.py only.
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
    assert json.loads(json.loads(cpu["rayStartParams"]["resources"])) == {"crf": 15}
    assert "crf" not in gpu["rayStartParams"].get("resources", "")  # CRF actors stay off the GPU nodes
    for g in groups.values():
        _check_pod_fits_its_node(g)
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for name, pod in _pod_specs(spec):
        assert pod["serviceAccountName"] == "deeplab-ray", name
        for c in pod["containers"]:
            assert c["resources"]["limits"], f"{name}/{c['name']} needs resource limits"
            assert not any("AWS" in e.get("name", "") for e in c.get("env", [])), f"{name}: AWS keys in env"


# What the kubelet of an EKS node can give pods (EKS AMI formula: kube-reserved CPU 6 % of the first core, 1 % of
# the second, 0.5 % of cores 3-4, 0.25 % above; memory 255 MiB + 11 MiB per pod of the instance's max pods, plus
# 100 MiB eviction threshold; from the instance's usable memory, ~96 % of nominal), minus room for the daemon sets
# every node runs (CNI, kube-proxy, NVIDIA device plugin, CSI): 300 millicores and 512 MiB.
NODE_ALLOCATABLE = {  # instance type: (vCPUs, nominal GiB, max pods)
    "g5.xlarge": (4, 16, 58),
    "c7i.4xlarge": (16, 32, 234),
}
DAEMONSET_CPU_M, DAEMONSET_MEM_MI = 300, 512


def _allocatable(instance_type: str) -> tuple[int, int]:
    """(millicores, MiB) a pod can request on that instance type."""
    vcpus, gib, max_pods = NODE_ALLOCATABLE[instance_type]
    reserved_m = 60 + (10 if vcpus > 1 else 0) + 5 * min(max(vcpus - 2, 0), 2) + 2.5 * max(vcpus - 4, 0)
    mem_mi = gib * 1024 * 0.96 - (255 + 11 * max_pods) - 100
    return int(vcpus * 1000 - reserved_m - DAEMONSET_CPU_M), int(mem_mi - DAEMONSET_MEM_MI)


def _millicores(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def _mebibytes(q: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    return int(float(q[:-2]) * units[q[-2:]])


def _check_pod_fits_its_node(group: dict) -> None:
    pod = group["template"]["spec"]
    instance = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
    cpu_m, mem_mi = _allocatable(instance)
    (container,) = pod["containers"]
    req, lim = container["resources"]["requests"], container["resources"]["limits"]
    assert req == lim, (
        f"{group['groupName']}: requests == limits (Guaranteed QoS, Ray sizes itself from limits)"
    )
    assert _millicores(req["cpu"]) <= cpu_m, (
        f"{group['groupName']}: {req['cpu']} CPU > {cpu_m}m on {instance}"
    )
    assert _mebibytes(req["memory"]) <= mem_mi, (
        f"{group['groupName']}: {req['memory']} > {mem_mi}Mi on {instance}"
    )
    ray_cpus = int(group["rayStartParams"]["num-cpus"])
    assert ray_cpus <= _millicores(req["cpu"]) / 1000, "Ray's CPU slots within the pod's CPUs"


def test_allocatable_model_rejects_whole_node_requests():
    """The old GPU pod (4 CPU / 16Gi on a g5.xlarge, Pending forever) fails the fit check."""
    group = {
        "groupName": "gpu-workers",
        "rayStartParams": {"num-gpus": "1", "num-cpus": "4"},
        "template": {
            "spec": {
                "nodeSelector": {"node.kubernetes.io/instance-type": "g5.xlarge"},
                "containers": [
                    {
                        "resources": {
                            "requests": {"cpu": "4", "memory": "16Gi"},
                            "limits": {"cpu": "4", "memory": "16Gi"},
                        }
                    }
                ],
            }
        },
    }
    with pytest.raises(AssertionError, match="4 CPU"):
        _check_pod_fits_its_node(group)
    cpu_m, mem_mi = _allocatable("g5.xlarge")
    assert 3500 <= cpu_m < 4000 and 13 * 1024 <= mem_mi < 16 * 1024


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
    assert flags["--config"] == "/home/ray/deeplab-pipeline/infra/cluster-job.yaml"  # where the image has it
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
    # The documented CUDA build names its CUDA explicitly, and the wheel index says the same CUDA.
    assert "BASE=rayproject/ray:2.60.0-py311-cu128 --build-arg TORCH_INDEX=cu128" in text
    assert "-py311-gpu" not in text
    assert (
        'python infra/check_torch.py "${TORCH_INDEX}"' in text
    )  # the build-time assert on torch.version.cuda
    assert re.search(r"^COPY .*infra/check_torch\.py infra/cluster-job\.yaml \./infra/$", text, re.MULTILINE)
    assert "ARG TORCH_INDEX=cpu" in text and "download.pytorch.org/whl/${TORCH_INDEX}" in text
    assert "-c constraints.txt" in text and re.search(r"pip install [^\n]*\.\s", text)
    ignored = (ROOT / "infra" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_check_torch_fails_a_build_with_the_wrong_wheel(capsys):
    import sys

    sys.path.insert(0, str(ROOT / "infra"))
    try:
        from check_torch import check, expected_cuda, main
    finally:
        sys.path.pop(0)
    assert (expected_cuda("cpu"), expected_cuda("cu128"), expected_cuda("cu118")) == (None, "12.8", "11.8")
    assert check("cu128", "12.8", "12.8.1") == []
    assert check("cpu", None, None) == []
    assert "torch.version.cuda is None" in check("cu128", None, "12.8.1")[0]  # CPU wheel in a CUDA image
    assert "base image has CUDA 11.8" in check("cu128", "12.8", "11.8.0")[0]
    with pytest.raises(ValueError, match="cpu' or 'cuXYZ"):
        expected_cuda("rocm6.2")
    # This machine's torch is the CPU build: the CPU image's check passes, a CUDA image's fails the build.
    assert main(["cpu"]) == 0
    assert main(["cu128"]) == 1
    assert "promises torch built for CUDA 12.8, but torch.version.cuda is None" in capsys.readouterr().err


def test_ray_cluster_yaml_uses_a_current_gpu_machine_image():
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    types = _cluster()["available_node_types"]
    for name, t in types.items():
        image = t["node_config"]["ImageId"]
        assert image not in DEFAULT_AMI.values(), f"{name}: Ray's default AMI (Ubuntu 18.04 DLAMI, 2021)"
        assert image == (
            "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
        ), name
    assert _cluster()["auth"]["ssh_user"] == "ubuntu"  # the DLAMI's user


def test_cluster_job_config_keeps_crf_actors_off_gpu_nodes():
    from pipeline.cluster.pools import plan_pools
    from pipeline.config import load_job_config

    cfg, _ = load_job_config(
        str(ROOT / "infra" / "cluster-job.yaml"), input="s3://b/in", output="s3://b/out", model="s3://b/m.pt"
    )
    assert cfg.pools.crf_resource == "crf"
    types = _cluster()["available_node_types"]
    gpu, cpu = types["gpu_worker"]["resources"], types["cpu_worker"]["resources"]
    assert cfg.pools.crf_resource in cpu and cfg.pools.crf_resource not in gpu
    for manifest in ("raycluster.yaml", "rayjob.yaml"):
        (doc,) = _docs(manifest)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = {g["groupName"]: g["rayStartParams"] for g in spec["workerGroupSpecs"]}
        assert cfg.pools.crf_resource in json.loads(json.loads(groups["cpu-workers"]["resources"]))
    # One GPU node + one CPU node of ray_cluster.yaml: every CRF actor asks for `crf`, which only CPU nodes have.
    plan = plan_pools({k: gpu.get(k, 0) + cpu.get(k, 0) for k in {*gpu, *cpu}}, cfg.pools)
    assert plan.crf_resources == {"crf": 1.0} and plan.crf_size[1] == cpu["crf"]
