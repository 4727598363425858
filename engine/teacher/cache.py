"""``ResponseCache``: teacher replies already paid for, kept in one SQLite file.

A resumed or repeated run asks many of the same requests again; the cache answers them
without a request. The key is the SHA-256 of the request body as sent, serialized
canonically (sorted keys): the model and every generation parameter, but not the endpoint,
so replicas of one model share entries. The value is the raw body of a 200 reply that parsed
as a chat completion; errors and malformed bodies are never stored.

Writes are buffered and committed in batches (``batch_size`` puts or ``flush_after_s``,
whichever comes first) and on ``close()``: a crash loses at most the last batch, which only
costs those requests again. It is only a cache, so it never stops a run: a damaged file is
moved aside (``<name>.corrupt-<time>``) and a new one started; any other SQLite failure
turns the cache off for the rest of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson

from engine.output.aside import aside_name

log = logging.getLogger(__name__)

CACHE_FILE = "cache.sqlite"
# A lock held by another run sharing the file; longer would stall the event loop.
_BUSY_TIMEOUT_S = 1.0
_SCHEMA = "CREATE TABLE IF NOT EXISTS replies (key BLOB PRIMARY KEY, body BLOB NOT NULL)"


def canonical_body(payload: Mapping[str, Any]) -> bytes:
    """``payload`` (a request's JSON body) as UTF-8 JSON bytes with sorted keys, compact:
    equal requests give equal bytes. Raises ``TypeError`` for a value JSON cannot hold."""
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


def request_key(body: bytes) -> bytes:
    """The cache key of a canonical request body: its SHA-256 digest (32 bytes)."""
    return hashlib.sha256(body).digest()


class ResponseCache:
    """Raw reply bodies by request key. Use ``ResponseCache.open(path)``; close when done.

    Point reads run on the event loop (microseconds); puts wait in memory for the next
    commit and are visible to ``get`` at once.
    """

    def __init__(
        self,
        conn: sqlite3.Connection | None,
        path: Path,
        *,
        batch_size: int = 200,
        flush_after_s: float = 1.0,
    ) -> None:
        self.path = path
        self._conn = conn
        self._batch_size = batch_size
        self._flush_after_s = flush_after_s
        self._pending: dict[bytes, bytes] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.hits = 0
        self.misses = 0
        self.stored = 0

    @classmethod
    def open(cls, path: Path, *, batch_size: int = 200, flush_after_s: float = 1.0) -> Self:
        """Open or create the cache at ``path`` (its directory too); a damaged file is moved
        aside first. Never raises for the file: one that cannot be used gives a cache that
        is off (``enabled`` False), with a warning. Commits every ``batch_size`` puts or
        ``flush_after_s`` seconds after the first pending one."""
        try:
            conn = _connect_or_recover(path)
        except (sqlite3.Error, OSError) as err:
            log.warning("response cache %s cannot be used (%s): running without it", path, err)
            conn = None
        return cls(conn, path, batch_size=batch_size, flush_after_s=flush_after_s)

    @property
    def enabled(self) -> bool:
        """The file is open: False once a failure turned the cache off for the run."""
        return self._conn is not None

    def get(self, key: bytes) -> bytes | None:
        """The raw reply body stored for ``key`` (a ``request_key``), or None; counted as a
        hit or a miss."""
        body = self._pending.get(key)
        if body is None and self._conn is not None:
            try:
                row = self._conn.execute("SELECT body FROM replies WHERE key = ?", (key,))
                found = row.fetchone()
            except sqlite3.Error as err:
                self._failed("read", err)
                found = None
            body = None if found is None else found[0]
        if body is None:
            self.misses += 1
        else:
            self.hits += 1
        return body

    def put(self, key: bytes, body: bytes) -> None:
        """Store ``body`` under ``key``; committed with the next batch."""
        if self._conn is None:
            return
        self._pending[key] = body
        self.stored += 1
        if len(self._pending) >= self._batch_size:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a script or test): the batch size or close commits
                return
            self._timer = loop.call_later(self._flush_after_s, self.flush)

    def discard(self, key: bytes) -> None:
        """Forget ``key`` (its reply turned out unusable), so the request is asked anew."""
        self._pending.pop(key, None)
        if self._conn is None:
            return
        try:
            with self._conn:
                self._conn.execute("DELETE FROM replies WHERE key = ?", (key,))
        except sqlite3.Error as err:
            self._failed("write", err)

    def flush(self) -> None:
        """Commit the pending puts."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._conn is None:
            return
        batch = list(self._pending.items())
        self._pending.clear()
        try:
            with self._conn:  # one transaction; rolled back on error
                self._conn.executemany(
                    "INSERT OR REPLACE INTO replies (key, body) VALUES (?, ?)", batch
                )
        except sqlite3.Error as err:
            self._failed("write", err)

    def close(self) -> None:
        """Commit what is pending and close the file."""
        self.flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _failed(self, action: str, err: sqlite3.Error) -> None:
        """A cache that fails mid-run is not worth stopping for: go on without it."""
        log.warning("response cache %s: %s failed (%s): running without it", self.path, action, err)
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        self._pending.clear()
        # Corruption found now would be found again next run: set the file aside for it.
        if not isinstance(err, sqlite3.OperationalError):
            _move_aside(self.path)

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "off"
        return (
            f"<ResponseCache {self.path} {state} hits={self.hits} misses={self.misses} "
            f"stored={self.stored} pending={len(self._pending)}>"
        )


def _connect_or_recover(path: Path) -> sqlite3.Connection:
    """Connect to ``path``; if it is not a usable database, move it aside and start anew.

    Busy, locked, read-only or unopenable files (``OperationalError``) are not damage and are
    left alone for the caller.
    """
    try:
        return _connect(path)
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as err:
        log.warning("response cache %s is damaged (%s): starting a new one", path, err)
        _move_aside(path)
        return _connect(path)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S)
    try:
        # WAL: readers never wait for the batch commit; NORMAL: no fsync per commit (a crash
        # may lose the last commits, never corrupt the file).
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(_SCHEMA)
        conn.execute("SELECT body FROM replies LIMIT 1").fetchall()
    except BaseException:
        conn.close()
        raise
    return conn


def _move_aside(path: Path) -> None:
    """Rename the database and its WAL side files to ``<name>.corrupt-<time>``; never delete."""
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        target = aside_name(source, "corrupt")
        try:
            source.rename(target)
        except FileNotFoundError:
            continue
        except OSError as err:
            log.warning("response cache: cannot move %s aside: %s", source, err)
            continue
        if not suffix:
            log.warning("response cache: damaged file moved to %s", target)
