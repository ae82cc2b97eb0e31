"""One run per output: a lease on ``OUTPUT/_lease.json``, taken before planning, renewed while the run lasts.

Two runs on one output (two operators, or a cluster retrying a job whose first attempt still runs) would plan
against each other's half-written parts and group images differently, so rows could duplicate. The lease keeps
them apart:

- **S3**: the lease object is created with ``If-None-Match: *`` (only if absent) and renewed or taken over with
  ``If-Match: <etag>`` (only if nobody replaced it). Whether it lapsed is judged on the store's clock (the object's
  ``Last-Modified`` against the ``Date`` of our read), so hosts with skewed clocks agree. A store that ignores
  conditional writes is detected (a second conditional create succeeds) and the lease is then advisory: the run
  says so, and the final check still repairs any duplicate deterministically (flow.verify_output).
- **Local paths**: ``fcntl.flock`` on ``OUTPUT/_lease.lock``, which the kernel releases the moment its holder dies,
  so a killed run never blocks the next; ``_lease.json`` beside it names the holder.

A holder on this host whose process is gone has lapsed at once (a killed run's re-run need not wait for the ttl).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from pipeline.storage import (
    StorageConfig,
    StorageError,
    is_s3,
    is_transient,
    join,
    redact,
    s3_client,
    split_s3,
    write_bytes,
)

__all__ = ["LEASE", "Holder", "LeaseHeld", "LeaseLost", "Lease", "new_run_id"]

log = logging.getLogger(__name__)

LEASE = "_lease.json"
_LOCK = "_lease.lock"


class LeaseHeld(StorageError):
    """Another run holds the output's lease; the message names it and how to break a stale one."""


class LeaseLost(StorageError):
    """This run's lease was taken over (it lapsed while storage was unreachable, or was broken by hand)."""


def new_run_id() -> str:
    """Sortable and unique: UTC start time plus 8 random hex digits (also names the run's plan folder)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    user: str
    started: str  # ISO 8601, UTC
    ttl_s: float

    @classmethod
    def me(cls, run_id: str, ttl_s: float) -> Holder:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        return cls(run_id, socket.gethostname(), os.getpid(), user, datetime.now(UTC).isoformat(), ttl_s)

    def describe(self) -> str:
        return f"run {self.run_id} of {self.user} on host {self.host}, pid {self.pid}, started {self.started}"

    def gone(self) -> bool:
        """True when the holder ran on this host and its process no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data)
            return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})
        except (ValueError, KeyError, TypeError):
            return None


class Lease:
    """``with Lease(output_uri, storage_cfg, ...) as lease:`` holds the output for one run (see the module note).

    ``wait_s``: how long to wait for another holder before refusing; ``break_stale``: take over a live-looking
    lease (the user says its run is gone). ``exclusive`` is False when the store ignores conditional writes.
    """

    def __init__(
        self,
        output_uri: str,
        storage_cfg: StorageConfig,
        *,
        run_id: str | None = None,
        ttl_s: float = 120.0,
        wait_s: float = 0.0,
        break_stale: bool = False,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.output_uri, self.storage_cfg = output_uri, storage_cfg
        self.uri = join(output_uri, LEASE)
        self.holder = Holder.me(run_id or new_run_id(), ttl_s)
        self.wait_s, self.break_stale, self.on_lost = wait_s, break_stale, on_lost
        self.exclusive = True
        self.lost: str | None = None  # why the lease was lost, once it is
        self._etag: str | None = None
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def run_id(self) -> str:
        return self.holder.run_id

    def __enter__(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        while True:
            taken, other = self._try_acquire()
            if taken:
                break
            if time.monotonic() >= deadline:
                raise LeaseHeld(self._held_message(other))
            log.info("output %s is held by %s; waiting", self.output_uri, other.describe())
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        if is_s3(self.uri):
            self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
            self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        with contextlib.suppress(Exception):  # a lease we cannot release lapses after its ttl
            self._release()

    def _held_message(self, other: Holder | None) -> str:
        who = other.describe() if other else "another run (its lease file is unreadable)"
        if is_s3(self.uri):
            fix = (
                f"wait for it (write.lease_wait_s), or if that run is gone, re-run with --break-lease (or delete "
                f"{self.uri}); a killed run's lease lapses {self.holder.ttl_s:.0f} s after its last renewal"
            )
        else:
            fix = "wait for it (write.lease_wait_s): the lock is released the moment that process ends"
        return f"the output {self.output_uri} is in use by {who}: {fix}"

    # --- S3 ---------------------------------------------------------------------------------------------------

    def _try_acquire(self) -> tuple[bool, Holder | None]:
        """(True, None) when the lease is ours now, else (False, the live holder if its lease file is readable)."""
        return self._try_acquire_s3() if is_s3(self.uri) else self._try_acquire_local()

    def _put(self, **condition: str) -> str:
        bucket, key = split_s3(self.uri)
        response = s3_client(self.storage_cfg).put_object(
            Bucket=bucket, Key=key, Body=self.holder.to_json(), ContentType="application/json", **condition
        )
        return response["ETag"]

    def _try_acquire_s3(self) -> tuple[bool, Holder | None]:
        from botocore.exceptions import ClientError

        try:
            self._etag = self._put(IfNoneMatch="*")
        except ClientError as e:
            if not _precondition_failed(e):
                raise
        else:
            self._check_conditional_writes()
            return True, None
        current = self._read_s3()
        if current is None:  # released between our create and our read: try again
            return self._try_acquire_s3()
        holder, etag, age_s = current
        lapsed = holder is None or age_s > holder.ttl_s or holder.gone()
        if not (lapsed or self.break_stale):
            return False, holder
        try:
            self._etag = self._put(IfMatch=etag)
        except ClientError as e:
            if not _precondition_failed(e):
                raise
            return self._try_acquire_s3()  # someone else took it over first: look again
        log.warning(
            "took over the lease of %s from %s (%s)",
            self.output_uri,
            holder.describe() if holder else "an unreadable lease",
            "broken by --break-lease" if not lapsed else "lapsed",
        )
        return True, None

    def _read_s3(self) -> tuple[Holder | None, str, float] | None:
        """(holder, etag, seconds since its last renewal on the store's clock), or None when there is no lease."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3(self.uri)
        try:
            response = s3_client(self.storage_cfg).get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                return None
            raise
        body = response["Body"].read()
        now = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        store_now = parsedate_to_datetime(now) if now else datetime.now(UTC)
        age_s = (store_now - response["LastModified"]).total_seconds()
        return Holder.from_json(body), response["ETag"], age_s

    def _check_conditional_writes(self) -> None:
        """A second create-if-absent of our own lease must fail; a store where it succeeds ignores conditions."""
        from botocore.exceptions import ClientError

        try:
            self._etag = self._put(IfNoneMatch="*")
        except ClientError as e:
            if _precondition_failed(e):
                return
            raise
        self.exclusive = False
        log.warning(
            "the store at %s ignores conditional writes (If-None-Match): the lease on %s is advisory; two runs "
            "started at once could both proceed, and the final check then keeps one row per image",
            self.storage_cfg.endpoint_url or "AWS S3",
            self.output_uri,
        )

    def _renew_loop(self) -> None:
        from botocore.exceptions import ClientError

        period = self.holder.ttl_s / 4
        last_ok = time.monotonic()
        while not self._stop.wait(period):
            try:
                self._etag = self._put(IfMatch=self._etag) if self.exclusive else self._put()
                last_ok = time.monotonic()
            except ClientError as e:
                if _precondition_failed(e):
                    self.lost = (
                        "another run took the lease over (it had lapsed, or was broken by --break-lease)"
                    )
                else:
                    self._renew_failed(e, last_ok)
            except Exception as e:  # noqa: BLE001 - storage trouble: keep trying until the ttl runs out
                self._renew_failed(e, last_ok)
            if self.lost:
                log.error("lost the lease on %s: %s", self.output_uri, self.lost)
                if self.on_lost is not None:
                    self.on_lost()
                return

    def _renew_failed(self, e: BaseException, last_ok: float) -> None:
        log.warning("could not renew the lease on %s: %s", self.output_uri, redact(str(e).splitlines()[0]))
        if not is_transient(e) or time.monotonic() - last_ok > self.holder.ttl_s:
            self.lost = f"could not renew it for {time.monotonic() - last_ok:.0f} s ({type(e).__name__})"

    def _release(self) -> None:
        if is_s3(self.uri):
            current = self._read_s3()
            if current and current[0] is not None and current[0].run_id == self.run_id:
                bucket, key = split_s3(self.uri)
                s3_client(self.storage_cfg).delete_object(Bucket=bucket, Key=key)
            return
        Path(self.uri).unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- local ------------------------------------------------------------------------------------------------

    def _try_acquire_local(self) -> tuple[bool, Holder | None]:
        import fcntl

        root = Path(self.output_uri).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                return False, Holder.from_json(Path(self.uri).read_bytes())
            except OSError:
                return False, None
        self._lock_fd = fd
        write_bytes(self.uri, self.holder.to_json(), self.storage_cfg)
        return True, None


def _precondition_failed(e) -> bool:
    """412 PreconditionFailed, or 409 ConditionalRequestConflict (AWS: a concurrent conditional write won)."""
    code = str(e.response.get("Error", {}).get("Code"))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)
