"""Local services for the embedded default and the tests: an S3 endpoint (moto in server mode) on 127.0.0.1.

It is a real HTTP endpoint, so boto3, pyarrow and every Ray worker process reach it. We stop only what we started.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

__all__ = ["LocalS3", "free_port", "stop_process", "LOCAL_S3_ENV"]

log = logging.getLogger(__name__)

# moto accepts any credentials; these are placeholders, not secrets.
LOCAL_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "local-demo",
    "AWS_SECRET_ACCESS_KEY": "local-demo-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def stop_process(proc: subprocess.Popen | None) -> None:
    """Stop a server this process started: SIGTERM, then SIGKILL after 10 s; nothing when it already ended."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalS3:
    """``with LocalS3() as s3: s3.endpoint_url`` -- a moto S3 server bound to 127.0.0.1 on a free port."""

    host: str = "127.0.0.1"
    port: int = 0
    log_path: str | None = None
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LocalS3:
        if self.port == 0:
            self.port = free_port(self.host)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, **LOCAL_S3_ENV}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"local S3 (moto server) exited with code {self._proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1).read()  # noqa: S310
                log.info("local S3 endpoint at %s", self.endpoint_url)
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"local S3 (moto server) did not answer on {self.endpoint_url} in {timeout_s:.0f}s"
        )

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
