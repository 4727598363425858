"""A full disk, an exceeded quota or a read-only file system, on one chosen output file.

``WriteFault`` makes the calls through which the engine makes a file durable fail as the
kernel fails them: ``os.fsync`` of the file (where a full disk shows on a delayed-allocation
file system), ``os.replace`` onto it, ``os.open`` creating it (the lock file). A file is chosen
by a fragment of its path ("extractive_summary/gen.jsonl", "manifest.json": its temporary
files match too). Once failing it keeps failing, as a full disk does.

In a test: ``with WriteFault("progress.jsonl", errno.ENOSPC).installed(): ...``. Around a
real ``python -m engine`` (so that the exit code and the printed message are the user's)::

    DISKFULL_PATH=run_report.json DISKFULL_ERRNO=28 python -m tests.support.diskfull run ...

SQLite files (state.sqlite, cache.sqlite) write from C, past these hooks: ``sqlite_fault``
turns a connection's writes into SQLite's own FULL (``max_page_count``) or READONLY
(``query_only``) errors instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class WriteFault:
    """Fail writes to files whose path contains ``fragment`` with ``code`` (an errno), after
    ``after`` of them succeeded; ``hits``: the calls failed so far."""

    fragment: str
    code: int
    after: int = 0
    calls: int = 0
    hits: int = 0

    def check(self, path: str) -> None:
        """Raise the fault if ``path`` is the file's and its turn has come."""
        if self.fragment not in path:
            return
        self.calls += 1
        if self.calls > self.after:
            self.hits += 1
            raise OSError(self.code, os.strerror(self.code), path)

    @contextlib.contextmanager
    def installed(self) -> Iterator[WriteFault]:
        """The hooks in place for the block (every thread of this process)."""
        real = os.fsync, os.replace, os.open
        os.fsync = self._fsync(real[0])
        os.replace = self._replace(real[1])
        os.open = self._open(real[2])  # type: ignore[assignment]
        try:
            yield self
        finally:
            os.fsync, os.replace, os.open = real

    def _fsync(self, real: Callable[[Any], None]) -> Callable[[Any], None]:
        def fsync(fd: Any) -> None:
            number = fd if isinstance(fd, int) else fd.fileno()
            self.check(os.readlink(f"/proc/self/fd/{number}"))
            real(fd)

        return fsync

    def _replace(self, real: Callable[..., None]) -> Callable[..., None]:
        def replace(src: Any, dst: Any, **kwargs: Any) -> None:
            self.check(os.fspath(dst))
            real(src, dst, **kwargs)

        return replace

    def _open(self, real: Callable[..., int]) -> Callable[..., int]:
        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & os.O_CREAT:
                self.check(os.fspath(path))
            return real(path, flags, *args, **kwargs)

        return open_


def sqlite_fault(connect: Callable[..., sqlite3.Connection], code: int) -> Callable[..., Any]:
    """``connect`` (a module's ``_connect``), its connections failing writes: ``errno.ENOSPC``
    gives SQLite's FULL once the file would grow, ``errno.EROFS`` READONLY at once."""

    def faulty(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        if code == errno.EROFS:
            conn.execute("PRAGMA query_only = ON")
        else:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    return faulty


def main() -> int:
    """``python -m engine`` with the fault the environment names."""
    from engine.cli import main as engine_main

    fault = WriteFault(
        os.environ["DISKFULL_PATH"],
        int(os.environ.get("DISKFULL_ERRNO", errno.ENOSPC)),
        int(os.environ.get("DISKFULL_AFTER", "0")),
    )
    with fault.installed():
        return engine_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
