"""Where a command's output goes (around the whole flow): the project's own lines to the user, the rest to a log file.

Ray writes to the driver's stderr from three places: its Python loggers (``ray``, ``ray.data``, ``ray.tune``: their
handlers write to whatever ``sys.stderr`` is at emit time), Python warnings (``warnings.showwarning`` writes to
``sys.stderr``) and its C++ core worker, which echoes its ERROR lines (``core_worker.cc ... E``) straight to file
descriptor 2. So for the length of a command ``command_output`` points both ``sys.stderr`` and fd 2 at a log file
and gives the project's loggers (``pipeline``, ``deeplab``, ``jobs``) and the progress bar a copy of the user's
stderr. ``--verbose`` changes nothing: everything reaches the terminal, at DEBUG, as Ray prints it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from pipeline.console.files import open_log_file, private_dir

__all__ = [
    "QUIET",
    "NORMAL",
    "VERBOSE",
    "OWN_LOGGERS",
    "command_output",
    "default_log_path",
    "user_stream",
    "output_mode",
    "log_file",
    "note_ray_session",
    "logs_line",
]

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
OWN_LOGGERS = ("pipeline", "deeplab", "jobs")
LOG_DIR_ENV = "DEEPLAB_LOG_DIR"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


class _State:
    mode: str = NORMAL
    user: TextIO | None = None  # the user's stderr while a command runs
    path: str | None = None  # this command's log file (None in verbose mode)
    ray_logs: str | None = None  # the Ray session's logs folder, once Ray is up


_state = _State()


def output_mode() -> str:
    """quiet | normal | verbose: what the running command shows (normal outside a command)."""
    return _state.mode


def user_stream() -> TextIO:
    """Where the project's own lines and the progress bar go: the user's stderr, even while fd 2 is the log file."""
    return _state.user or sys.stderr


def log_file() -> str | None:
    return _state.path


def note_ray_session() -> None:
    """Remember the Ray session's logs folder (cluster.ray_init.init_ray calls it): the summary names it after shutdown."""
    import ray

    node = ray._private.worker._global_node  # no public API gives the session dir of the connected driver
    if node is not None:
        _state.ray_logs = os.path.join(node.get_session_dir_path(), "logs")


def logs_line() -> str | None:
    """The summary's last line: where Ray's warnings and internals went (None when nothing was routed)."""
    parts = []
    if _state.path:
        parts.append(_state.path)
    if _state.ray_logs:
        parts.append(f"Ray session logs: {_state.ray_logs}")
    if not parts:
        return None
    return f"logs          {parts[0]}" + (f" ({parts[1]})" if len(parts) > 1 else "")


def default_log_path(command: str) -> str:
    """``$DEEPLAB_LOG_DIR`` (default ``<tmp>/deeplab-<uid>/logs``) ``/<command>-<UTC time>-<pid>.log``: local, so
    an output on S3 needs no log object; one file per run; per user (a shared /tmp)."""
    default = Path(tempfile.gettempdir()) / f"deeplab-{os.getuid()}" / "logs"
    root = Path(os.environ.get(LOG_DIR_ENV) or default)
    return str(root / f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log")


class _OwnLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        return any(name == n or name.startswith(n + ".") for n in OWN_LOGGERS)


class _UserHandler(logging.StreamHandler):
    """To the user's stderr; above a live tqdm bar, not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            tqdm = None
        if tqdm is not None and getattr(tqdm, "_instances", None):
            try:
                tqdm.write(self.format(record), file=self.stream)
                self.flush()
            except Exception:  # noqa: BLE001 - logging must never raise
                self.handleError(record)
            return
        super().emit(record)


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


# One function on purpose (~90 lines): every handler a command installs and removes, in one place.
@contextlib.contextmanager
def command_output(
    mode: str = NORMAL, *, log_path: str | None = None, command: str = "deeplab"
) -> Iterator[None]:
    """Route a command's output for its duration (see the module doc); shuts down a Ray the command started.

    quiet: only warnings and errors of our own loggers (and what the command prints on stdout, its summary);
    normal: our INFO lines and the progress; verbose: everything on stderr at DEBUG, no log file.
    """
    if mode not in (QUIET, NORMAL, VERBOSE):
        raise ValueError(f"output mode must be quiet, normal or verbose, got {mode!r}")
    root = logging.getLogger()
    saved_root = (root.level, root.handlers[:])
    ray_before = _ray_started()
    _state.mode, _state.path, _state.ray_logs = mode, None, None
    if mode == VERBOSE:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        root.handlers[:] = [handler]
        root.setLevel(logging.DEBUG)
        try:
            yield
        finally:
            if not ray_before and _ray_started():
                sys.modules["ray"].shutdown()
            root.handlers[:] = saved_root[1]
            root.setLevel(saved_root[0])
            _state.mode = NORMAL
        return

    if log_path or os.environ.get(LOG_DIR_ENV):
        path = Path(log_path or default_log_path(command)).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
    else:  # the shared temp folder: our per-user folder must be ours and closed to others
        mine = private_dir(Path(tempfile.gettempdir()) / f"deeplab-{os.getuid()}", what="log folder")
        path = private_dir(mine / "logs", what="log folder") / Path(default_log_path(command)).name
    # 0600, O_EXCL | O_NOFOLLOW: the file holds what the terminal used to show; for the user's eyes only
    log_fd = open_log_file(path)
    orig_err = sys.stderr
    try:
        orig_fd = orig_err.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. pytest's capsys: a stream without a descriptor
        orig_fd = None
    for stream in (sys.stdout, orig_err):
        with contextlib.suppress(Exception):
            stream.flush()
    saved_fd2 = os.dup(2)
    if orig_fd == 2:  # fd 2 is about to become the log file: the user keeps a copy of it
        user: TextIO = os.fdopen(
            os.dup(2), "w", buffering=1, encoding=getattr(orig_err, "encoding", None) or "utf-8",
            errors="backslashreplace",
        )  # fmt: skip
    else:
        user = orig_err
    os.dup2(log_fd, 2)  # C++ writes (Ray's core worker) and child processes that inherit stderr
    os.close(log_fd)
    log_stream = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = log_stream  # Ray's Python handlers and warnings.showwarning write to sys.stderr at emit time
    _state.user, _state.path = user, str(path)

    fmt = logging.Formatter(_FORMAT, _DATEFMT)
    to_file = logging.StreamHandler(log_stream)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_user = _UserHandler(user)
    to_user.setFormatter(fmt)
    to_user.addFilter(_OwnLines())
    to_user.setLevel(logging.WARNING if mode == QUIET else logging.INFO)
    root.handlers[:] = [to_file, to_user]
    root.setLevel(logging.INFO)
    log_stream.write(f"--- deeplab {command} (pid {os.getpid()}): Ray's and the libraries' output ---\n")
    try:
        yield
    finally:
        try:
            if not ray_before and _ray_started():
                sys.modules["ray"].shutdown()  # its shutdown lines belong in the log file too
        finally:
            for stream in (sys.stdout, log_stream, user):
                with contextlib.suppress(Exception):
                    stream.flush()
            root.handlers[:] = saved_root[1]
            root.setLevel(saved_root[0])
            sys.stderr = orig_err
            os.dup2(saved_fd2, 2)
            os.close(saved_fd2)
            log_stream.close()
            if user is not orig_err:
                user.close()
            _state.user, _state.mode = None, NORMAL
