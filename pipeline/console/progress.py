"""What the user sees while the write stage commits parts: a live bar in a terminal, a plain line at intervals elsewhere.

``flow.execute`` feeds one ``update(rows, status_counts)`` per committed part (the driver never sees a row per image).
In a terminal (the user's stderr is a TTY): a tqdm bar with images done/total, images/s, ETA and errors by kind.
Not a terminal (jobs, CI, pipes): the log line ``progress: D/T images (R images/s, ETA, N errors ...)`` every
``every_s`` seconds, also while no part arrives (a job's log shows it is alive), and once at the end.
``--quiet``: nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import TextIO

from pipeline.console import logs

__all__ = ["BAR", "LINES", "OFF", "Progress", "choose_mode"]

log = logging.getLogger(__name__)

BAR, LINES, OFF = "bar", "lines", "off"
_OK = "ok"  # schema.OK; not imported: schema pulls in pyarrow for a module the driver loads early


def choose_mode(stream: TextIO | None = None) -> str:
    """off under --quiet, a bar when ``stream`` (default: the user's stderr) is a terminal, else lines."""
    if logs.output_mode() == logs.QUIET:
        return OFF
    stream = stream or logs.user_stream()
    try:
        return BAR if stream.isatty() else LINES
    except (AttributeError, ValueError):
        return LINES


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _errors_text(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(errors.items()))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{seconds:02d}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class Progress:
    """``Progress(total)``, then ``update(rows, status_counts)`` per committed part, then ``close()``.

    ``mode``: "auto" (``choose_mode``), "bar", "lines" or "off". ``stream``: where the bar goes (default: the
    user's stderr, ``logs.user_stream``); lines go through this module's logger. ``every_s``: seconds between lines.
    """

    def __init__(
        self,
        total: int,
        *,
        mode: str = "auto",
        stream: TextIO | None = None,
        every_s: float = 10.0,
        unit: str = "images",
    ) -> None:
        if mode == "auto":
            mode = choose_mode(stream)
        if mode not in (BAR, LINES, OFF):
            raise ValueError(f"progress mode must be auto, bar, lines or off, got {mode!r}")
        self.mode, self.total, self.unit, self.every_s = mode, int(total), unit, float(every_s)
        self.done = 0
        self.errors: Counter = Counter()
        self._t0 = time.monotonic()
        self._last_line = self._t0
        self._lines_at = -1  # `done` when the last line was logged
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        self._ticker: threading.Thread | None = None
        if mode == BAR:
            from tqdm import tqdm

            out = stream or logs.user_stream()
            sized = _columns(out) > 0  # a terminal of unknown width (0 columns) would get an empty bar
            self._bar = tqdm(
                total=self.total,
                unit=" img",
                file=out,
                dynamic_ncols=sized,
                ncols=None if sized else 100,
                nrows=None if sized else 20,
                mininterval=0.2,
                smoothing=0.1,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]",
                desc="segment",
            )
            self._bar.set_postfix_str(self._errors_postfix(), refresh=True)
        if mode != OFF:  # the bar's clock and ETA move, and lines keep coming, while no part arrives
            self._ticker = threading.Thread(target=self._tick, name="deeplab-progress", daemon=True)
            self._ticker.start()

    @property
    def num_errors(self) -> int:
        return sum(self.errors.values())

    def rate(self) -> float:
        elapsed = time.monotonic() - self._t0
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, rows: int, status_counts: Mapping[str, int]) -> None:
        """One committed part: ``rows`` images, ``status_counts`` their statuses ({"ok": 998, "decode_error": 2})."""
        with self._lock:
            self.done += int(rows)
            self.errors.update({k: int(v) for k, v in status_counts.items() if k != _OK and v})
            if self._bar is not None:
                self._bar.set_postfix_str(self._errors_postfix(), refresh=False)
                self._bar.update(int(rows))
            elif self.mode == LINES and time.monotonic() - self._last_line >= self.every_s:
                self._line()

    def close(self) -> None:
        """Stop the ticker; a last line (lines mode) or the bar's final state (bar mode)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(self._errors_postfix(), refresh=False)
                self._bar.close()
                self._bar = None
            elif self.mode == LINES and self._lines_at != self.done:
                self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _errors_postfix(self) -> str:
        return f"errors {self.num_errors}" + (f" ({_errors_text(self.errors)})" if self.errors else "")

    def _line(self) -> None:  # with the lock held
        self._last_line = time.monotonic()
        self._lines_at = self.done
        rate = self.rate()
        left = self.total - self.done
        eta = f"ETA {_duration(left / rate)}" if rate > 0 and left > 0 else ("done" if left <= 0 else "ETA ?")
        kinds = f": {_errors_text(self.errors)}" if self.errors else ""
        log.info(
            "progress: %d/%d %s (%.2f %s/s, %s, %d errors%s)",
            self.done, self.total, self.unit, rate, self.unit, eta, self.num_errors, kinds,
        )  # fmt: skip

    def _tick(self) -> None:
        period = 1.0 if self.mode == BAR else max(self.every_s, 0.05)
        while not self._stop.wait(period):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()
                elif self.mode == LINES and time.monotonic() - self._last_line >= self.every_s:
                    self._line()
