"""Read stage (after plan, before decode): fetch the bytes of the plan's work items inside Ray tasks.

A work item is a plan row (``schema.ID``, ``SOURCE``, ``LABEL_SOURCE``, ``SHARD``, ``SUPERSEDES``): a URI for loose
objects, or ``shard_uri#image_id`` for the Parquet shards ``deeplab shard`` writes (rows of one shard are read
together). Fetching is per row: a missing or unreadable object becomes an error row, never a failed block; the row
is ``retryable`` when the failure came from storage rather than the object (``storage.is_transient``).

An outage is not a row's problem: when most reads of this process fail transiently (``OutageGuard``), the fetch
backs off and probes, and if storage stays down it raises ``StorageOutage``, which stops the job with its cause;
nothing of the batch is committed, and a re-run resumes.
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.storage import (
    ObjectTooLarge,
    StorageConfig,
    StorageOutage,
    filesystem,
    is_transient,
    read_bytes,
    redact,
)

__all__ = ["fetch_batch", "OutageGuard"]

log = logging.getLogger(__name__)


class OutageGuard:
    """Transient read failures of this process over a sliding window; ``wait`` backs off while storage is down."""

    def __init__(self, cfg: StorageConfig, clock=time.monotonic, sleep=time.sleep) -> None:
        self.cfg, self.clock, self.sleep = cfg, clock, sleep
        self.events: collections.deque[tuple[float, bool]] = collections.deque()  # (time, failed transiently)
        self.failures = 0

    def record(self, failed: bool) -> None:
        now = self.clock()
        self.events.append((now, failed))
        self.failures += failed
        while self.events and self.events[0][0] < now - self.cfg.outage_window_s:
            self.failures -= self.events.popleft()[1]

    def tripped(self) -> bool:
        n = len(self.events)
        rate = self.failures / n if n else 0.0
        return self.failures >= self.cfg.outage_min_failures and rate >= self.cfg.outage_rate - 1e-9

    def wait(self, probe, cause: str):
        """Back off (1, 2, 4 .. 30 s) calling ``probe()`` until storage answers; return what it returned (or raise
        its error, when storage answered that the object itself is gone); StorageOutage after outage_wait_s."""
        start, delay = self.clock(), 1.0
        log.warning(
            "storage: %d of the last %d reads failed (%s); backing off up to %.0f s",
            self.failures, len(self.events), cause, self.cfg.outage_wait_s,
        )  # fmt: skip
        while True:
            waited = self.clock() - start
            if waited >= self.cfg.outage_wait_s:
                raise StorageOutage(
                    f"storage outage: {self.failures} of the last {len(self.events)} reads failed and storage "
                    f"was still failing after {waited:.0f} s ({cause}); re-run the same command when storage "
                    "is back: committed parts are kept, failed rows are retried"
                )
            self.sleep(min(delay, max(0.0, self.cfg.outage_wait_s - waited)))
            delay = min(2 * delay, 30.0)
            try:
                result, error = probe(), None
            except Exception as e:  # noqa: BLE001 - still down: keep waiting, the cause is the latest failure
                if is_transient(e):
                    cause = _reason(e)
                    continue
                result, error = None, e  # the probed object itself is gone: storage answers again
            log.warning("storage: reads succeed again after %.0f s", self.clock() - start)
            self.events.clear()
            self.failures = 0
            if error is not None:
                raise error
            return result


_guards: dict[StorageConfig, OutageGuard] = {}


def _guard(cfg: StorageConfig) -> OutageGuard:
    if cfg not in _guards:
        _guards[cfg] = OutageGuard(cfg)
    return _guards[cfg]


def _read(uri: str, cfg: StorageConfig, max_bytes: int | None = None) -> bytes:
    """read_bytes through the process's outage guard: a transient failure during an outage waits and retries."""
    guard = _guard(cfg)
    try:
        data = read_bytes(uri, cfg, max_bytes=max_bytes)
    except Exception as e:
        transient = is_transient(e)
        guard.record(transient)
        if not (transient and guard.tripped()):
            raise
        # StorageOutage if storage stays down
        data = guard.wait(lambda: read_bytes(uri, cfg, max_bytes=max_bytes), _reason(e))
    guard.record(False)
    return data


def fetch_batch(
    batch: dict[str, np.ndarray], storage_cfg: StorageConfig, max_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """Work items -> rows with IMAGE_BYTES / LABEL_BYTES, STATUS, ERROR and RETRYABLE. One bad object = one row.

    ``max_bytes`` (read.max_bytes): an image or label object over it is not read; its row is ``too_large``.
    """
    n = len(batch[S.ID])
    image_bytes: list[bytes | None] = [None] * n
    label_bytes: list[bytes | None] = [None] * n
    status = [S.OK] * n
    error: list[str | None] = [None] * n
    retryable = np.zeros(n, dtype=bool)
    label_problem: list[str | None] = [None] * n
    shard_rows, shard_errors = _read_shard_rows(
        {s for s in batch[S.SHARD] if s}, set(batch[S.ID]), storage_cfg
    )
    for i in range(n):
        image_id, source, shard = batch[S.ID][i], batch[S.SOURCE][i], batch[S.SHARD][i]
        label_source = S.text_or_none(batch[S.LABEL_SOURCE][i])
        try:
            if shard in shard_errors:
                raise shard_errors[shard]
            if shard:
                image_bytes[i], label_bytes[i] = shard_rows[(shard, image_id)]
            else:
                image_bytes[i] = _read(source, storage_cfg, max_bytes)
        except StorageOutage:
            raise
        except ObjectTooLarge as e:
            status[i], error[i] = S.ErrorKind.TOO_LARGE, redact(str(e))
            continue
        except Exception as e:  # noqa: BLE001 - any storage failure for this object is this row's error
            status[i], error[i] = S.ErrorKind.READ, redact(f"cannot read {source}: {_reason(e)}")
            retryable[i] = is_transient(e)
            continue
        if label_source and not shard:
            try:
                label_bytes[i] = _read(label_source, storage_cfg, max_bytes)
            except StorageOutage:
                raise
            except Exception as e:  # noqa: BLE001
                if is_transient(
                    e
                ):  # the label exists but could not be read now: retry the row, don't score it
                    status[i], retryable[i] = S.ErrorKind.READ, True
                    error[i] = redact(f"cannot read label {label_source}: {_reason(e)}")
                    image_bytes[i] = None
                else:
                    label_problem[i] = redact(f"cannot read label {label_source}: {_reason(e)}")
    return {
        S.ID: batch[S.ID],
        S.SOURCE: batch[S.SOURCE],
        S.LABEL_SOURCE: batch[S.LABEL_SOURCE],
        S.SUPERSEDES: batch[S.SUPERSEDES] if S.SUPERSEDES in batch else np.full(n, "", dtype=object),
        S.ATTEMPT: batch[S.ATTEMPT] if S.ATTEMPT in batch else np.ones(n, dtype=np.int32),
        S.STATUS: np.array(status, dtype=object),
        S.ERROR: np.array(error, dtype=object),
        S.RETRYABLE: retryable,
        S.IMAGE_BYTES: S.object_column(image_bytes),
        S.LABEL_BYTES: S.object_column(label_bytes),
        S.LABEL_PROBLEM: np.array(label_problem, dtype=object),
    }


def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "object not found"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def _read_shard_rows(
    shards: set[str], wanted: set[str], storage_cfg: StorageConfig
) -> tuple[dict[tuple[str, str], tuple[bytes | None, bytes | None]], dict[str, Exception]]:
    """The wanted rows of some shards, and the shards that could not be read (their rows become error rows)."""
    rows: dict[tuple[str, str], tuple[bytes | None, bytes | None]] = {}
    errors: dict[str, Exception] = {}
    for shard in sorted(shards):
        fs, path = filesystem(shard, storage_cfg)
        # Row-group statistics on the sorted image_id column let pyarrow skip the groups this batch doesn't need.
        try:
            table = pq.read_table(path, filesystem=fs, filters=[("image_id", "in", sorted(wanted))])
        except Exception as e:  # noqa: BLE001 - the shard's rows say why (retryable when storage failed)
            errors[shard] = e
            continue
        for image_id, image, label in zip(
            table.column("image_id").to_pylist(),
            table.column("image").to_pylist(),
            table.column("label").to_pylist(),
            strict=True,
        ):
            if image_id in wanted:
                rows[(shard, image_id)] = (image, label)
    return rows, errors
