"""Files this user's commands create in shared places (``/tmp``): log files and the local head's token.

A name in a shared folder may already be taken by another user: a file planted there, or a symlink to one of
ours. So these files are created with ``O_EXCL | O_NOFOLLOW`` (never through a link, never into someone else's
file), and a file or folder that exists already is used only when this user owns it and nobody else may write it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["UnsafePath", "private_dir", "create_private_file", "open_log_file"]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(PermissionError):
    """A path another user could read or replace; the message names it and the fix."""


def _check_owned(path: Path, st: os.stat_result, *, what: str, private: bool) -> None:
    if st.st_uid != os.getuid():
        raise UnsafePath(
            f"{what} {path} belongs to another user (uid {st.st_uid}): remove it or choose another path"
        )
    loose = st.st_mode & (0o077 if private else 0o022)
    if loose:
        need = "0700/0600" if private else "not group- or world-writable"
        raise UnsafePath(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be {need}: chmod it or remove it"
        )


def private_dir(path: str | os.PathLike[str], *, what: str = "folder") -> Path:
    """``path`` as a folder only this user can use: created 0700 (parents as needed), or an existing one that this
    user owns, that is not a symlink and that nobody else may write."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{what} {path} is not a folder (a symlink?): remove it or choose another path")
    _check_owned(path, st, what=what, private=False)
    return path


def create_private_file(path: str | os.PathLike[str], data: bytes, *, what: str = "file") -> None:
    """Write ``data`` to a new 0600 file at ``path``. An existing regular file of this user's is replaced (a
    restart), anything else there (a symlink, another user's file) is refused."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{what} {path} exists and is not a regular file: remove it")
        _check_owned(path, st, what=what, private=False)
        path.unlink()
    fd = os.open(path, _CREATE, 0o600)
    try:
        _check_owned(path, os.fstat(fd), what=what, private=True)
        os.write(fd, data)
    finally:
        os.close(fd)


def open_log_file(path: str | os.PathLike[str]) -> int:
    """A descriptor appending to the log at ``path``: a new 0600 file, or an existing regular file this user owns
    and nobody else may write (``--log-file`` named twice). Never follows a symlink."""
    path = Path(path)
    try:
        return os.open(path, _CREATE | os.O_APPEND, 0o600)
    except FileExistsError:
        pass
    # O_NONBLOCK: a FIFO planted under the name fails at once instead of blocking until someone reads it.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"log file {path} is not a regular file: choose another --log-file")
        _check_owned(path, st, what="log file", private=False)
    except BaseException:
        os.close(fd)
        raise
    return fd
