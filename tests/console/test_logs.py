"""Output routing (pipeline/console/logs.py) and the CLI's output flags: by default only the project's own lines reach the
user; Ray's loggers, Python warnings and C++ lines on fd 2 go to the log file; --quiet and --verbose."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import split_output_flags

# Each kind of line a command's stderr gets, written the way its source writes it.
SCRIPT = r"""
import logging, os, sys, warnings
import ray  # Ray's own "ray" logger: a handler of its own (PlainRayHandler) that writes to sys.stderr, no propagation
from pipeline.console import logs

with logs.command_output(sys.argv[1], log_path=sys.argv[2], command="test"):
    logging.getLogger("ray.data._internal.test").warning("RAY-LOGGER-LINE")
    warnings.warn("PY-WARNING-LINE", UserWarning)
    os.write(2, b"[2026-12-02 04:42:49,796 E 1 1] core_worker.cc:2465: CPP-LINE\n")  # as Ray's core worker does
    logging.getLogger("matplotlib.font_manager").info("LIB-LINE")
    logging.getLogger("pipeline.test").info("OWN-INFO")
    logging.getLogger("pipeline.test").warning("OWN-WARNING")
    print("STDOUT-LINE")
os.write(2, b"AFTER-LINE\n")  # fd 2 is the user's again
"""
ROUTED = ("RAY-LOGGER-LINE", "PY-WARNING-LINE", "CPP-LINE", "LIB-LINE")


def _run(mode: str, tmp_path) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "x.log"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(log)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "STDOUT-LINE\n"
    return proc, log.read_text() if log.exists() else ""


@pytest.mark.parametrize("mode", ["normal", "quiet", "verbose"])
def test_only_our_lines_reach_the_user_and_the_rest_goes_to_the_log_file(mode, tmp_path):
    proc, logged = _run(mode, tmp_path)
    err = proc.stderr
    assert err.endswith("AFTER-LINE\n")
    if mode == "verbose":  # everything on the terminal, as Ray prints it; no log file
        assert all(line in err for line in (*ROUTED, "OWN-INFO", "OWN-WARNING")), err
        assert logged == ""
        return
    assert not any(line in err for line in ROUTED), err
    assert ("OWN-INFO" in err) == (mode == "normal") and "OWN-WARNING" in err
    assert all(line in logged for line in (*ROUTED, "OWN-INFO", "OWN-WARNING")), logged
    assert "AFTER-LINE" not in logged


def test_output_flags_before_or_after_the_command_but_not_in_passed_on_arguments():
    rest, opts = split_output_flags(["segment", "--input", "x", "-q", "--log-file", "/tmp/l.log"])
    assert rest == ["segment", "--input", "x"] and opts == {
        "verbose": False,
        "quiet": True,
        "log_file": "/tmp/l.log",
    }
    rest, opts = split_output_flags(["--verbose", "tune-crf", "--images", "3", "--log-file=/tmp/t.log"])
    assert rest == ["tune-crf", "--images", "3"] and opts["verbose"] and opts["log_file"] == "/tmp/t.log"
    # submit passes its job's arguments on (after the command) untouched; a flag before the command is ours
    rest, opts = split_output_flags(["-q", "submit", "segment", "--", "--input", "x", "--verbose"])
    assert (
        rest == ["submit", "segment", "--", "--input", "x", "--verbose"]
        and opts["quiet"]
        and not opts["verbose"]
    )
    rest, opts = split_output_flags(["submit", "segment", "--quiet"])
    assert rest == ["submit", "segment", "--quiet"] and not opts["quiet"]
