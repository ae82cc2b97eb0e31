"""Read stage: which storage failures are transient (retryable rows) and the outage guard's back-off."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

from pipeline import schema as S
from pipeline.stages.read import OutageGuard, fetch_batch
from pipeline.storage import StorageConfig, StorageOutage, is_transient


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def test_transient_storage_failures_are_told_from_the_objects_own():
    transient = [
        _client_error("SlowDown", 503),
        _client_error("InternalError", 500),
        _client_error("ExpiredToken", 400),
        _client_error("Whatever", 502),
        _client_error("TooManyRequests", 429),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
        OSError(errno.ETIMEDOUT, "Connection timed out"),
        OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7"),
        OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Service Unavailable"),
    ]
    permanent = [
        FileNotFoundError("no object at s3://b/k"),
        IsADirectoryError("a folder"),
        _client_error("InvalidRange", 416),
        _client_error("InvalidObjectState", 403),
        ValueError("not a storage error"),
        # Refused access to one object, local file trouble and memory are the object's (or the job's), not storage
        # weather: a re-run meets them again, so retrying them would loop a scheduler that re-runs on exit 75.
        _client_error("AccessDenied", 403),
        PermissionError(errno.EACCES, "Permission denied"),
        OSError(errno.ELOOP, "Too many levels of symbolic links"),
        OSError(errno.ENAMETOOLONG, "File name too long"),
        OSError(errno.EISDIR, "Is a directory"),
        OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"),
        MemoryError(),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_outage_guard_trips_on_a_rate_over_the_window_backs_off_and_gives_up():
    cfg = StorageConfig(outage_window_s=10, outage_rate=0.8, outage_min_failures=4, outage_wait_s=20)
    clock = _Clock()
    guard = OutageGuard(cfg, clock=clock, sleep=clock.sleep)
    for failed in (True, False, True, True):  # 3 failures: under the minimum
        guard.record(failed)
    assert not guard.tripped()
    guard.record(True)  # 4 of 5 = 0.8
    assert guard.tripped()
    clock.now += 11  # the window slides past them
    guard.record(False)
    assert not guard.tripped()

    for _ in range(5):
        guard.record(True)
    probes = []

    def down():
        probes.append(clock.now)
        raise ConnectionResetError("reset")

    with pytest.raises(StorageOutage, match=r"storage outage: .* re-run the same command"):
        guard.wait(down, "503 SlowDown")
    assert len(probes) >= 4 and np.all(np.diff(probes) > 0)  # backed off between probes, then gave up at 20 s
    assert 20 <= clock.now - probes[0] + 1 <= 40

    # Storage comes back: the wait ends at the first good probe and the window starts afresh.
    for _ in range(5):
        guard.record(True)
    calls = iter([ConnectionResetError("reset"), None])

    def flaky():
        if (e := next(calls)) is not None:
            raise e

    guard.wait(flaky, "reset")
    assert not guard.tripped() and guard.failures == 0


def test_fetch_marks_transient_read_errors_retryable(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()
    batch = {
        S.ID: np.array(["ok", "gone", "dir"], dtype=object),
        S.SOURCE: np.array([str(tmp_path / f"{i}.jpg") for i in ("ok", "gone", "dir")], dtype=object),
        S.LABEL_SOURCE: np.array([None] * 3, dtype=object),
        S.SHARD: np.array([""] * 3, dtype=object),
        S.SUPERSEDES: np.array(["", "part-x.parquet", ""], dtype=object),
    }
    out = fetch_batch(batch, StorageConfig())
    assert list(out[S.STATUS]) == [S.OK, S.ErrorKind.READ, S.ErrorKind.READ]
    assert list(out[S.RETRYABLE]) == [False, False, False]  # missing and a folder: the objects' own problems
    assert list(out[S.SUPERSEDES]) == ["", "part-x.parquet", ""]
