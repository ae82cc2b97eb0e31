"""Local services for cluster operation: the infra/local scripts start and stop only what they started."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.cluster.localhead import LocalHead, _alive, _record, kill_recorded

# Every test here starts a subprocess job, a Ray head or the demo: the integration tier.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "infra" / "local"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [str(LOCAL / script), *args], capture_output=True, text=True, timeout=120, env={**os.environ}
    )
    assert proc.returncode == 0, f"{script} failed: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_head_scripts_start_and_stop_only_recorded_processes(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = _run("start-head.sh", str(tmp_path), "--num-cpus", "1", "--auth-mode", "disabled")
        info = json.loads((tmp_path / "head.json").read_text())
        assert info["dashboard_url"] in out and info["dashboard_url"].startswith("http://127.0.0.1:")
        assert info["auth_mode"] == "disabled" and info["token_file"] is None
        assert info["temp_dir"] == str(tmp_path / "ray") or info["temp_dir"].startswith("/tmp/dlray-")
        with urllib.request.urlopen(f"{info['dashboard_url']}/api/version", timeout=5) as resp:
            assert json.load(resp)["ray_version"] == "2.60.0"
        pids = [tuple(p) for p in info["pids"]]
        assert len(pids) >= 3 and all(_alive(*p) for p in pids[:1])

        out = _run("stop-head.sh", str(tmp_path))
        assert "stopped" in out
        assert not any(_alive(*p) for p in pids), "a recorded head process survived stop-head"
        assert not (tmp_path / "head.json").exists()
        if info["temp_dir"].startswith("/tmp/dlray-"):  # short fallback for a long tmp_path: removed on stop
            assert not Path(info["temp_dir"]).exists()
        assert bystander.poll() is None, "stop-head killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


def test_s3_scripts_start_and_stop(tmp_path):
    out = _run("start-s3.sh", str(tmp_path))
    info = json.loads((tmp_path / "s3.json").read_text())
    assert info["endpoint_url"] in out and info["endpoint_url"].startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{info['endpoint_url']}/moto-api/", timeout=5) as resp:
        assert resp.status == 200
    (pid,) = [tuple(p) for p in info["pids"]]
    assert _alive(*pid)
    _run("stop-s3.sh", str(tmp_path))
    assert not _alive(*pid)
    assert not (tmp_path / "s3.json").exists()


def test_kill_recorded_ignores_reused_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid, started = _record(proc.pid)
        # Same pid, different start time: a recycled pid is not ours and must be left alone.
        assert kill_recorded([(pid, started + 1)], grace_s=0.1) == 0
        assert proc.poll() is None
        assert kill_recorded([(pid, started)], grace_s=5) == 1
        proc.wait(timeout=5)
        assert proc.returncode is not None
    finally:
        proc.kill()
        proc.wait()


def test_local_head_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="auth_mode"):
        LocalHead(tmp_path, auth_mode="tls")
    with pytest.raises(ValueError, match="num_cpus"):
        LocalHead(tmp_path, num_cpus=0)
    with pytest.raises(RuntimeError, match="not started"):
        _ = LocalHead(tmp_path).dashboard_url
    assert not (tmp_path / "head.json").exists()  # constructing starts nothing


def test_a_head_folder_too_long_for_ray_sockets_gets_a_short_temp_dir(tmp_path):
    """Ray's plasma socket (`<temp>/session_<date>_<time>_<pid>/sockets/plasma_store`) must fit 107 bytes: a head
    folder whose `ray` temp dir leaves less room gets a short /tmp/dlray-* one instead."""
    socket_tail = len("/session_2026-12-07_05-19-03_014823_4194304/sockets/plasma_store")
    head = LocalHead(tmp_path)
    stem = f"/tmp/h{os.getpid()}"
    fits = Path(stem + "x" * (107 - socket_tail - len(stem) - len("/ray")))  # <fits>/ray + tail: 107 bytes
    over = Path(str(fits) + "x")
    try:
        assert head._temp_dir(fits) == fits / "ray"
        temp = head._temp_dir(over)
        assert temp.name.startswith("dlray-") and len(str(temp)) + socket_tail <= 107
        assert not over.exists()
        temp.rmdir()
    finally:
        shutil.rmtree(fits, ignore_errors=True)
