"""Writing output files so that a resume can rely on them, and the one translation of a full or
read-only disk.

A file the resume relies on is fsynced before it is relied on; a file that replaces another
(``replace``) is fsynced first, and its directory after the rename, or a power loss could
leave the old name pointing at nothing (an empty manifest, say, that stops the next resume).

A write that fails because the disk is full, a quota is exceeded or the file system is
read-only cannot succeed by retrying, and every later write would fail the same way: it
becomes ``OutputWriteError``, a fatal error of the run naming the file. Whatever was committed
before stays committed (records are cut back to the last committed length on resume), so the
same command, run again once there is room, resumes the run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from engine.errors import OutputWriteError

# errno -> what happened and what to do.
_FULL = "free space"
_NOT_RETRYABLE = {
    errno.ENOSPC: ("no space left on the device", _FULL),
    errno.EDQUOT: ("the disk quota is exceeded", _FULL),
    errno.EROFS: ("the file system is read-only", "make it writable (or set output.dir elsewhere)"),
    errno.EFBIG: (
        "the file is larger than the file system or the file-size limit (ulimit -f) allows",
        "raise the limit or free space",
    ),
}
# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xff) for the same faults:
# SQLite reports ENOSPC as SQLITE_FULL and other failed writes (EDQUOT) as SQLITE_IOERR.
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 8, 10, 13, 14
_SQLITE_FAULTS = {
    _SQLITE_FULL: ("the database or the disk is full", _FULL),
    _SQLITE_IOERR: ("the disk refused a write (quota exceeded, or an I/O error)", _FULL),
    _SQLITE_READONLY: (
        "it can only be opened read-only",
        "make it and its directory writable (or set output.dir elsewhere)",
    ),
    _SQLITE_CANTOPEN: (
        "it cannot be opened for writing",
        "make its directory writable (or set output.dir elsewhere)",
    ),
}


def write_problem(path: Path, err: OSError) -> OutputWriteError | None:
    """``err``, met writing ``path``, as the run's fatal ``OutputWriteError`` when it is a full
    disk, an exceeded quota, a read-only file system or a file too large; None otherwise."""
    fault = _NOT_RETRYABLE.get(err.errno or 0)
    if fault is None:
        return None
    return OutputWriteError(path, *fault)


def sqlite_write_problem(path: Path, err: sqlite3.Error) -> OutputWriteError | None:
    """The same for an SQLite error met writing the database at ``path``."""
    code = getattr(err, "sqlite_errorcode", None)
    fault = None if code is None else _SQLITE_FAULTS.get(code & 0xFF)
    if fault is None:
        return None
    return OutputWriteError(path, *fault)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Translate a full or read-only disk met in the block into ``OutputWriteError`` for
    ``path``; other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        if problem := write_problem(path, err):
            raise problem from err
        raise


def fsync_dir(directory: Path) -> None:
    """fsync ``directory``: a rename or a new file in it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` (written and fsynced by the caller) to ``path``, then fsync the
    directory. Full or read-only disk: ``OutputWriteError``."""
    with writing(path):
        os.replace(tmp, path)
        fsync_dir(path.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a temporary file beside it, fsynced, renamed over it,
    the directory fsynced. A reader sees the old content or the new, never a part. Full or
    read-only disk: ``OutputWriteError`` (the temporary file is removed, the old content
    stays)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path), tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    replace(tmp, path)


def rename_durably(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (same file system) and fsync both directories."""
    source.rename(target)
    fsync_dir(target.parent)
    if source.parent != target.parent:
        fsync_dir(source.parent)
