"""Test helper: s3rver (npm), a second, independent S3 implementation besides moto, on 127.0.0.1 with a free port.

Installed project-locally by ``npm ci --prefix infra/local/s3rver`` (the Makefile's test set-up). Node >= 17 needs
``--openssl-legacy-provider`` for s3rver's own continuation tokens (DES), or its truncated listings fail.
s3rver checks the access key id (``S3RVER``), keeps aws-chunked framing inside objects unless request checksums
are off (``storage.request_checksum_calculation``), and ignores conditional writes (If-None-Match, If-Match).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cluster.services import free_port, stop_process

__all__ = ["S3rver", "S3RVER_BIN", "S3RVER_ENV"]

ROOT = Path(__file__).resolve().parent.parent
S3RVER_BIN = ROOT / "infra" / "local" / "s3rver" / "node_modules" / ".bin" / "s3rver"
# s3rver's fixed credentials: placeholders, not secrets.
S3RVER_ENV = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}


@dataclass
class S3rver:
    """``with S3rver(buckets=("data",)) as s3: s3.endpoint_url`` -- one s3rver process, its files in a temp dir."""

    buckets: tuple[str, ...] = ("data",)
    host: str = "127.0.0.1"
    port: int = 0
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _dir: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> S3rver:
        if not S3RVER_BIN.exists():
            raise RuntimeError(
                f"s3rver is not installed ({S3RVER_BIN} missing): run `npm ci --prefix infra/local/s3rver` "
                "(make setup does)"
            )
        self.port = self.port or free_port(self.host)
        self._dir = tempfile.TemporaryDirectory(prefix="s3rver-")
        data, log = Path(self._dir.name) / "data", Path(self._dir.name) / "s3rver.log"
        data.mkdir()
        args = [str(S3RVER_BIN), "-d", str(data), "-a", self.host, "-p", str(self.port), "--silent"]
        for name in self.buckets:
            args += ["--configure-bucket", name]
        env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
        with open(log, "wb") as out:  # a file, not a pipe: nothing reads it while s3rver runs
            self._proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"s3rver exited with code {self._proc.returncode}: {err}")
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=1).read()  # noqa: S310 - loopback
                return self
            except urllib.error.HTTPError:  # it answers (403 without credentials): up
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"s3rver did not answer on {self.endpoint_url} in {timeout_s:.0f}s")

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> S3rver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
