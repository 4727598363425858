"""One run per output directory: a lock the operating system releases when its holder dies.

Two runs writing one directory would write every record twice and pay the teacher twice, and
a later resume would cut records out of finished files. ``DirectoryLock.acquire`` takes
``flock`` on ``<dir>/run.lock`` without waiting and refuses (``OutputInUse``) if another
process holds it; the holder writes its pid, host and start time into the file, for that
refusal to name it. The kernel drops an ``flock`` when the last descriptor of the open file
goes, so however the holder ends (``kill -9``, a power cut) nothing stale is left to clean
up: the file stays, and what it says is only information. It is not deleted at the end:
deleting a lock file races with a process that opened it just before.

Locks are per open file description: two runs in one process exclude each other as two
processes do. The descriptor is not inherited by child processes (such as the embedded
teacher's server), which would otherwise keep the lock alive after the run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson

from engine.errors import ConfigError, OutputInUse
from engine.output.files import write_problem

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# Filesystems without flock (some network and FUSE mounts): run unguarded, with a warning.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class DirectoryLock:
    """The exclusive right to write one output directory, for as long as it is held."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, directory: Path) -> Self:
        """Lock ``directory`` (which must exist) at once, or raise ``OutputInUse`` naming the
        process that holds it. ``ConfigError`` if the lock file cannot be created,
        ``OutputWriteError`` if the disk is full or read-only."""
        path = directory / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if problem := write_problem(path, err):
                raise problem from err
            raise ConfigError(
                [f"output.dir: cannot create {path}: {err.strerror or err}"]
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputInUse(
                f"{directory} is in use by another run ({holder}): wait for it to end, "
                "or give this run another output.dir"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKING:
                raise
            log.warning(
                "%s: this filesystem cannot lock files (%s): a second run on the same "
                "output directory would not be stopped",
                directory,
                err.strerror,
            )
            return cls(path, None)
        try:
            _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()})
        except OSError as err:
            os.close(fd)
            if problem := write_problem(path, err):
                raise problem from err
            raise
        return cls(path, fd)

    @property
    def held(self) -> bool:
        """Whether this process holds the lock now."""
        return self._fd is not None

    def release(self) -> None:
        """Empty the file (no pid of a finished run lingers in it) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<DirectoryLock {self.path} {'held' if self.held else 'not held'}>"


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the file."""
    try:
        info = orjson.loads(os.pread(fd, 4096, 0))
        pid, host, started = info["pid"], info["host"], info["started"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        # It has the lock but has not written yet, or the file was edited.
        return "its pid is not written in the lock file yet"
    return f"pid {pid} on host {host}, started {started}"


def _write(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, orjson.dumps(info) + b"\n", 0)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
