"""Progress (pipeline/console/progress.py): a live bar when the user's stderr is a terminal, plain lines at intervals when it
is not, nothing under --quiet; counts, rate, ETA and errors by kind from per-part updates."""

from __future__ import annotations

import io
import logging
import re
import time

from pipeline.console import logs
from pipeline.console.progress import BAR, LINES, OFF, Progress, choose_mode


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_in_a_terminal_shows_done_total_rate_eta_and_errors_by_kind(caplog):
    tty = FakeTTY()
    with caplog.at_level(logging.INFO, logger="pipeline.console.progress"):
        progress = Progress(10, stream=tty)
        assert progress.mode == BAR
        for rows, counts in (
            (4, {"ok": 3, "decode_error": 1}),
            (4, {"ok": 3, "read_error": 1}),
            (2, {"ok": 2}),
        ):
            time.sleep(0.25)  # past the bar's redraw interval (0.2 s): each part shows
            progress.update(rows, counts)
        progress.close()
    frames = [f for f in tty.getvalue().replace("\n", "\r").split("\r") if f.strip()]
    last = frames[-1]
    assert re.search(r"100%\|.*\| 10/10 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ img/s, errors 2 \(", last), last
    assert "(decode_error 1, read_error 1)" in last
    assert any(" 4/10 " in f and "errors 1 (decode_error 1)" in f for f in frames), frames
    assert not caplog.records  # a bar, not log lines


def test_lines_when_not_a_terminal_at_intervals_also_while_no_part_arrives(caplog):
    pipe = io.StringIO()
    assert choose_mode(pipe) == LINES
    with caplog.at_level(logging.INFO, logger="pipeline.console.progress"):
        progress = Progress(10, stream=pipe, every_s=0.15)
        assert progress.mode == LINES
        progress.update(4, {"ok": 3, "decode_error": 1})  # before the first interval: no line yet
        assert not caplog.records
        time.sleep(0.5)  # no part arrives: the ticker still logs, at most once per interval
        ticks = len(caplog.records)
        assert 2 <= ticks <= 4
        progress.update(6, {"ok": 6})
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(
        r"progress: 4/10 images \([\d.]+ images/s, ETA (\d+ s|\d+:\d\d), 1 errors: decode_error 1\)", lines[0]
    ), lines[0]
    assert re.fullmatch(
        r"progress: 10/10 images \([\d.]+ images/s, done, 1 errors: decode_error 1\)", lines[-1]
    )
    assert pipe.getvalue() == ""  # lines go through the logger (to the user and the log file), never a bar


def test_quiet_shows_no_progress(monkeypatch, caplog):
    monkeypatch.setattr(logs._state, "mode", logs.QUIET)
    tty = FakeTTY()
    with caplog.at_level(logging.INFO, logger="pipeline.console.progress"):
        progress = Progress(5, stream=tty, every_s=0)
        assert progress.mode == OFF
        progress.update(5, {"ok": 4, "crf_error": 1})
        progress.close()
    assert tty.getvalue() == "" and not caplog.records
    assert progress.done == 5 and dict(progress.errors) == {"crf_error": 1}
