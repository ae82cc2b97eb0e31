"""Cluster operation, local side: a throwaway `ray start --head` on 127.0.0.1 and a local S3 endpoint.

Used by ``infra/local/*.sh``, the job-submission tests and local demos. Everything binds to 127.0.0.1 on free
ports, lives under one directory (temp dir, logs, pid file, token), and stopping kills only the processes this
helper started (recorded by PID and start time, so a reused PID is never hit). We never call ``ray stop``: it
would stop every Ray cluster of this user, including other people's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cluster.services import LocalS3, free_port
from pipeline.console.files import UnsafePath, create_private_file, private_dir

__all__ = [
    "AUTH_MODES",
    "HeadInfo",
    "LocalHead",
    "descendants",
    "kill_recorded",
    "localhead_main",
    "start_local_s3",
    "stop_local_s3",
]

log = logging.getLogger(__name__)

AUTH_MODES = ("disabled", "token")
HEAD_INFO_FILE = "head.json"
TOKEN_FILE = "auth_token"
S3_INFO_FILE = "s3.json"
# Unix socket paths are limited to 107 bytes and Ray puts `/session_<date>_<time>_<pid>/sockets/plasma_store` (up
# to 64) under the temp dir, so a long pytest tmp_path can break `ray start`; past this length: a short /tmp dir.
_MAX_TEMP_DIR_LEN = 107 - 64


@dataclass(frozen=True)
class HeadInfo:
    """What a started head exposes; written to ``<base_dir>/head.json`` (the token itself never is)."""

    gcs_address: str
    dashboard_url: str
    auth_mode: str
    token_file: str | None
    temp_dir: str
    pids: tuple[tuple[int, float], ...]  # (pid, start ticks from /proc) of every process we started


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) from /proc, or None if the process is gone.

    psutil is not a dependency of this project, and the local helpers only need Linux.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _alive(pid: int, started: float) -> bool:
    st = _stat(pid)
    # A zombie still has a /proc entry; it is dead for our purposes.
    if st is None or st[1] != int(started):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _record(pid: int) -> tuple[int, float] | None:
    st = _stat(pid)
    return (pid, float(st[1])) if st else None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...) from /proc; gone processes are skipped."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st:
                children.setdefault(st[0], []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def kill_recorded(
    pids: list[tuple[int, float]] | tuple[tuple[int, float], ...], *, grace_s: float = 15.0
) -> int:
    """Stop recorded processes: SIGTERM the first (the root), then SIGKILL whatever of the recorded set is left.

    The set is the records plus their current descendants (Ray workers and job drivers forked after start). A
    PID counts as ours only if its start time matches the record, so a PID reused since is left alone. Returns
    how many of our processes were alive.
    """
    targets: dict[int, float] = {}
    for pid, started in pids:
        if not _alive(pid, started):
            continue
        targets[pid] = started
        for rec in (_record(c) for c in descendants(pid)):
            if rec:
                targets.setdefault(*rec)
    if not targets:
        return 0
    root = next(iter(targets))
    # `ray start --block` drains the node and shuts its daemons down in order on SIGTERM (a few seconds).
    # SIGTERM to every daemon at once instead leaves raylet and the autoscaler monitor hanging in shutdown.
    _signal(root, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in targets.items()):
        time.sleep(0.2)
    for pid, started in targets.items():
        if _alive(pid, started):
            _signal(pid, signal.SIGKILL)
    return len(targets)


@dataclass
class LocalHead:
    """``with LocalHead(base_dir) as head: head.dashboard_url`` -- a `ray start --head --block` on 127.0.0.1.

    ``auth_mode`` is passed to Ray explicitly (RAY_AUTH_MODE), so a ``~/.ray/auth_token`` on the machine never
    switches the mode behind our back. In ``token`` mode the token (given, or random) is written to
    ``<base_dir>/auth_token`` (0600) and handed to Ray by RAY_AUTH_TOKEN_PATH, so Ray never writes
    ``~/.ray/auth_token`` itself.
    """

    base_dir: str | os.PathLike[str]
    num_cpus: int = 2
    num_gpus: int = 0
    resources: dict[str, int] = field(default_factory=dict)
    auth_mode: str = "disabled"
    token: str | None = None
    object_store_memory_bytes: int = 200 << 20
    extra_env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    info: HeadInfo | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.auth_mode not in AUTH_MODES:
            raise ValueError(f"auth_mode must be one of {AUTH_MODES}, got {self.auth_mode!r}")
        if self.num_cpus < 1 or self.num_gpus < 0:
            raise ValueError(f"need num_cpus >= 1 and num_gpus >= 0, got {self.num_cpus} and {self.num_gpus}")

    @property
    def dashboard_url(self) -> str:
        if self.info is None:
            raise RuntimeError("LocalHead is not started")
        return self.info.dashboard_url

    @property
    def gcs_address(self) -> str:
        if self.info is None:
            raise RuntimeError("LocalHead is not started")
        return self.info.gcs_address

    def _temp_dir(self, base: Path) -> Path:
        temp = base / "ray"
        if len(str(temp)) > _MAX_TEMP_DIR_LEN:
            temp = Path(tempfile.mkdtemp(prefix="dlray-", dir="/tmp"))
        temp.mkdir(parents=True, exist_ok=True)
        return temp

    # One function on purpose (~80 lines): the `ray start` command, its wait and its record, in the order they happen.
    def start(self, timeout_s: float = 90.0) -> LocalHead:
        base = private_dir(Path(self.base_dir).resolve(), what="head folder")  # holds the token
        temp = self._temp_dir(base)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
        env.update(self.extra_env)
        env["RAY_AUTH_MODE"] = self.auth_mode
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # A job's entrypoint ("python -m jobs.segment") runs with the head's PATH: put this interpreter's bin
        # first, so jobs get the Python (and packages) that started the head even when no venv is activated.
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p)])
        token_file: Path | None = None
        if self.auth_mode == "token":
            token_file = base / TOKEN_FILE
            token = self.token or secrets.token_hex(32)
            create_private_file(token_file, token.encode(), what="token file")  # O_EXCL | O_NOFOLLOW, 0600
            env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
        ports = {
            "--port": free_port(),
            "--dashboard-port": free_port(),
            # Ray's defaults for these are fixed numbers; a second local head (another test, another user) would
            # collide with them, so every listener gets a free port.
            "--ray-client-server-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            f"--num-gpus={self.num_gpus}",
            f"--object-store-memory={self.object_store_memory_bytes}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            *(f"{k}={v}" for k, v in ports.items()),
        ]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        log_path = base / "ray-start.log"
        with open(log_path, "ab") as out:
            # Own session: the head and everything it forks form one process group that we alone own.
            self._proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        dashboard_url = f"http://127.0.0.1:{ports['--dashboard-port']}"
        headers = {"Authorization": f"Bearer {token_file.read_text()}"} if token_file else {}
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ray start exited with code {self._proc.returncode}; log tail:\n{tail}")
            if _jobs_api_ready(dashboard_url, headers):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"local Ray head did not serve {dashboard_url} within {timeout_s:.0f}s")
            time.sleep(0.5)
        recorded = [r for r in (_record(p) for p in [self._proc.pid, *descendants(self._proc.pid)]) if r]
        self.info = HeadInfo(
            gcs_address=f"127.0.0.1:{ports['--port']}",
            dashboard_url=dashboard_url,
            auth_mode=self.auth_mode,
            token_file=str(token_file) if token_file else None,
            temp_dir=str(temp),
            pids=tuple(recorded),
        )
        (base / HEAD_INFO_FILE).write_text(json.dumps(_info_dict(self.info), indent=2))
        log.info("local Ray head at %s (auth %s, %d processes)", dashboard_url, self.auth_mode, len(recorded))
        return self

    def stop(self) -> None:
        """Stop the processes this head started (the ray start process group and recorded daemons)."""
        pids: list[tuple[int, float]] = list(self.info.pids) if self.info else []
        if self._proc is not None:
            rec = _record(self._proc.pid)
            if rec and self._proc.poll() is None:
                pids.insert(0, rec)
                # `ray start --block` tears its daemons down on SIGTERM; collect the tree first anyway.
                pids += [r for r in (_record(p) for p in descendants(self._proc.pid)) if r]
        kill_recorded(pids)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._proc = None
        if self.info is not None:
            _remove_fallback_temp(self.info.temp_dir, Path(self.base_dir))
        self.info = None

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _remove_fallback_temp(temp_dir: str, base_dir: Path) -> None:
    """Delete the short /tmp temp dir made when ``base_dir`` was too long (one under ``base_dir`` stays)."""
    temp = Path(temp_dir)
    if temp.name.startswith("dlray-") and base_dir.resolve() not in temp.parents:
        shutil.rmtree(temp, ignore_errors=True)


def _info_dict(info: HeadInfo) -> dict:
    return {
        "gcs_address": info.gcs_address,
        "dashboard_url": info.dashboard_url,
        "auth_mode": info.auth_mode,
        "token_file": info.token_file,
        "temp_dir": info.temp_dir,
        "pids": [list(p) for p in info.pids],
    }


def _jobs_api_ready(dashboard_url: str, headers: dict[str, str]) -> bool:
    req = urllib.request.Request(f"{dashboard_url}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_local_s3(base_dir: str | os.PathLike[str]) -> dict:
    """Start a detached moto S3 server on 127.0.0.1; record its pid and endpoint in ``<base_dir>/s3.json``."""
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    s3 = LocalS3(log_path=str(base / "s3.log")).start()
    # Detach: the server must outlive this command; the record is how stop finds it.
    proc = s3._proc
    assert proc is not None
    rec = _record(proc.pid)
    s3._proc = None
    info = {"endpoint_url": s3.endpoint_url, "pids": [list(rec)] if rec else []}
    (base / S3_INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def stop_local_s3(base_dir: str | os.PathLike[str]) -> int:
    """Stop the moto server recorded in ``<base_dir>/s3.json``; returns how many processes were alive."""
    path = Path(base_dir).resolve() / S3_INFO_FILE
    if not path.exists():
        return 0
    info = json.loads(path.read_text())
    n = kill_recorded([tuple(p) for p in info["pids"]])
    path.unlink()
    return n


def _stop_head_dir(base: Path) -> int:
    path = base / HEAD_INFO_FILE
    if not path.exists():
        return 0
    info = json.loads(path.read_text())
    n = kill_recorded([tuple(p) for p in info["pids"]])
    _remove_fallback_temp(info["temp_dir"], base)
    path.unlink()
    return n


def localhead_main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.cluster.localhead start-head|stop-head|start-s3|stop-s3 --dir DIR`` (used by infra/local)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.cluster.localhead", description=localhead_main.__doc__
    )
    parser.add_argument("action", choices=["start-head", "stop-head", "start-s3", "stop-s3"])
    parser.add_argument(
        "--dir", required=True, help="state directory: Ray temp dir, logs, pid records, token"
    )
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--num-gpus", type=int, default=0)
    parser.add_argument("--resources", default="{}", help="custom resources as JSON, e.g. '{\"crf\": 2}'")
    parser.add_argument("--auth-mode", choices=AUTH_MODES, default="token")
    args = parser.parse_args(argv)
    base = Path(args.dir)
    if args.action == "start-head":
        if (base / HEAD_INFO_FILE).exists():
            print(f"a head is already recorded in {base / HEAD_INFO_FILE}; stop it first", file=sys.stderr)
            return 1
        try:
            head = LocalHead(
                base,
                num_cpus=args.num_cpus,
                num_gpus=args.num_gpus,
                resources=json.loads(args.resources),
                auth_mode=args.auth_mode,
            ).start()
        except UnsafePath as e:
            print(f"localhead: error: {e}", file=sys.stderr)
            return 2
        head._proc = None  # detach: the head outlives this command; stop-head finds it through head.json
        assert head.info is not None
        print(f"dashboard: {head.info.dashboard_url}")
        print(f"gcs:       {head.info.gcs_address}")
        if head.info.token_file:
            print(f"token:     {head.info.token_file} (pass --token-file or RAY_AUTH_TOKEN_PATH)")
        return 0
    if args.action == "stop-head":
        print(f"stopped {_stop_head_dir(base)} processes")
        return 0
    if args.action == "start-s3":
        info = start_local_s3(base)
        print(f"endpoint: {info['endpoint_url']}")
        return 0
    print(f"stopped {stop_local_s3(base)} processes")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(localhead_main())
