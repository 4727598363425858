"""``ResponseCache``: teacher replies already paid for, kept in one SQLite file of bounded size.

A resumed or repeated run asks many of the same requests again; the cache answers them
without a request. The key is the SHA-256 of the request body as sent, serialized
canonically (sorted keys): the model and every generation parameter, but not the endpoint,
so replicas of one model share entries. The value is the raw body of a 200 reply that parsed
as a chat completion; errors and malformed bodies are never stored.

Every database call runs on the cache's own thread, in order: a read can wait on a disk, a
batch commit of large replies (an ``n`` = 50 reply is about 400 KB) takes milliseconds, and
another run sharing the file may hold its lock; none of it may stall the event loop. Reads
come back as awaitables (``lookup``), and the lookups made in one pass of the loop go to the
thread as one query: a hand-off per lookup (a thread-pool work item, a copied context, a
wake-up of the loop through its self-pipe) cost about 90 us of the loop's time each at
2,000 requests a second, and kept hundreds of such objects in flight for the garbage
collector to walk. Writes are buffered and committed in batches (``batch_size`` puts or
``flush_after_s``, whichever comes first) and on ``close()``: a crash loses at most the last
batch, which only costs those requests again. Since the thread runs calls in the order they
were made, a read made after a write sees it.

The file is bounded (``max_bytes``, ``output.cache_max_gb``): when a commit takes it over the
bound, the oldest entries (by when they were stored) are deleted down to 90 % of it, and the
freed pages are returned to the file system (``auto_vacuum = INCREMENTAL``), so the file
really shrinks. A file created before the bound existed reuses the freed pages instead.

It is only a cache, so damage never stops a run: a damaged file is moved aside
(``<name>.corrupt-<time>``) and a new one started; any other SQLite failure turns the cache
off for the rest of the run. A full disk, an exceeded quota or a read-only file system is
different: every output file would meet it, so it is the run's fatal ``OutputWriteError``,
raised by the next ``lookup`` or ``put``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import orjson

from engine.errors import OutputWriteError
from engine.output.aside import aside_name
from engine.output.files import sqlite_write_problem, write_problem

log = logging.getLogger(__name__)

T = TypeVar("T")
# A lookup waiting for its batch: its key and what it awaits.
Read = tuple[bytes, "asyncio.Future[bytes | None]"]

CACHE_FILE = "cache.sqlite"
# A lock held by another run sharing the file: its thread waits, never the loop.
_BUSY_TIMEOUT_S = 5.0
_SCHEMA = "CREATE TABLE IF NOT EXISTS replies (key BLOB PRIMARY KEY, body BLOB NOT NULL)"
# Evicting brings the file down to this share of the bound, so that it is not done per commit.
_LOW_WATER = 0.9
# Bytes an entry takes besides its body: its key, the record and the index entry.
_ENTRY_OVERHEAD = 100
# The write-ahead log is cut back to this size after a checkpoint.
_WAL_LIMIT = 64 * 2**20
# Keys in one query of a batch of lookups (SQLite allows 999 parameters at the least).
_KEYS_PER_QUERY = 500
UNBOUNDED = 0


def canonical_body(payload: Mapping[str, Any]) -> bytes:
    """``payload`` (a request's JSON body) as UTF-8 JSON bytes with sorted keys, compact:
    equal requests give equal bytes. Raises ``TypeError`` for a value JSON cannot hold."""
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


def request_key(body: bytes) -> bytes:
    """The cache key of a canonical request body: its SHA-256 digest (32 bytes)."""
    return hashlib.sha256(body).digest()


class ResponseCache:
    """Raw reply bodies by request key. Use ``ResponseCache.open(path)``; close when done.

    ``lookup`` (awaitable) and ``get`` (blocking, for scripts and tests) read; ``put`` and
    ``discard`` never wait for the disk.
    """

    def __init__(
        self,
        conn: sqlite3.Connection | None,
        path: Path,
        *,
        batch_size: int = 200,
        flush_after_s: float = 1.0,
        max_bytes: int = UNBOUNDED,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._conn = conn
        self._batch_size = batch_size
        self._flush_after_s = flush_after_s
        self._pending: dict[bytes, bytes] = {}
        self._timer: asyncio.TimerHandle | None = None
        # Lookups of this pass of the loop, sent to the thread together at its end.
        self._reads: list[Read] = []
        self._executor = executor or _cache_thread()
        self._fatal: OutputWriteError | None = None
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self.evicted = 0
        self.size_bytes = 0
        # Queries sent to the thread for lookups: one per pass of the loop that made any.
        self.read_batches = 0

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        batch_size: int = 200,
        flush_after_s: float = 1.0,
        max_bytes: int = UNBOUNDED,
    ) -> Self:
        """Open or create the cache at ``path`` (its directory too), on the cache's thread
        (this call waits for it); a damaged file is moved aside first. A file that cannot be
        used gives a cache that is off (``enabled`` False), with a warning; a full disk or a
        read-only file system raises ``OutputWriteError``. Commits every ``batch_size`` puts
        or ``flush_after_s`` seconds after the first pending one; ``max_bytes``: the bound
        on the file's size (0: none)."""
        executor = _cache_thread()
        try:
            conn = executor.submit(_connect_or_recover, path).result()
        except (sqlite3.Error, OSError) as err:
            problem = _write_problem(path, err)
            if problem is not None:
                executor.shutdown()
                raise problem from err
            log.warning("response cache %s cannot be used (%s): running without it", path, err)
            conn = None
        cache = cls(
            conn,
            path,
            batch_size=batch_size,
            flush_after_s=flush_after_s,
            max_bytes=max_bytes,
            executor=executor,
        )
        if conn is not None:
            cache._run(cache._measure)
        return cache

    @property
    def enabled(self) -> bool:
        """The file is open: False once a failure turned the cache off for the run."""
        return self._conn is not None

    async def lookup(self, key: bytes) -> bytes | None:
        """The raw reply body stored for ``key`` (a ``request_key``), or None; counted as a
        hit or a miss. Raises ``OutputWriteError`` once a write met a full disk."""
        self._raise_fatal()
        body = self._pending.get(key)
        if body is None and self._conn is not None:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[bytes | None] = loop.create_future()
            if not self._reads:
                loop.call_soon(self._send_reads, loop)
            self._reads.append((key, future))
            body = await future
        return self._count(body)

    def get(self, key: bytes) -> bytes | None:
        """``lookup``, waiting for the cache's thread: for scripts and tests, not the loop."""
        body = self._pending.get(key)
        if body is None and self._conn is not None:
            body = self._run(self._read, key)
        return self._count(body)

    def put(self, key: bytes, body: bytes) -> None:
        """Store ``body`` under ``key``; committed with the next batch. Raises
        ``OutputWriteError`` once a write met a full disk."""
        self._raise_fatal()
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
        if self._conn is not None:
            self._submit(self._delete, key)

    def flush(self) -> None:
        """Commit the pending puts: on the cache's thread, without waiting for it inside an
        event loop, waiting for it outside one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._conn is None:
            self._pending.clear()
        if not self._pending:
            return
        batch = list(self._pending.items())
        self._pending.clear()
        self._submit(self._write, batch)

    async def drain(self) -> None:
        """Wait until everything asked of the cache's thread so far is done."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, lambda: None)

    def close(self) -> None:
        """Commit what is pending, close the file and stop the cache's thread (waits).
        Raises ``OutputWriteError`` if a write met a full disk, this last commit included:
        the run ends on it as it would have at the next ``lookup``."""
        self.flush()
        with contextlib.suppress(RuntimeError):  # closed already
            self._executor.submit(self._close).result()
        self._executor.shutdown(wait=True)
        self._raise_fatal()

    async def aclose(self) -> None:
        """``close`` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "off"
        return (
            f"<ResponseCache {self.path} {state} hits={self.hits} misses={self.misses} "
            f"stored={self.stored} pending={len(self._pending)}>"
        )

    # --- on the loop ------------------------------------------------------------------------

    def _count(self, body: bytes | None) -> bytes | None:
        if body is None:
            self.misses += 1
        else:
            self.hits += 1
        return body

    def _send_reads(self, loop: asyncio.AbstractEventLoop) -> None:
        """The lookups made since the last call, to the cache's thread as one batch."""
        reads, self._reads = self._reads, []
        self.read_batches += 1
        try:
            done = self._executor.submit(self._read_many, [key for key, _ in reads])
        except RuntimeError:  # the cache was closed meanwhile: every lookup misses
            _resolve(reads, {})
            return
        asyncio.wrap_future(done, loop=loop).add_done_callback(functools.partial(_answer, reads))

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _run(self, call: Callable[..., T], *args: Any) -> T:
        """Run ``call`` on the cache's thread and wait for it."""
        return self._executor.submit(call, *args).result()

    def _submit(self, call: Callable[..., object], *args: Any) -> None:
        """Run ``call`` on the cache's thread; wait only when no event loop is running."""
        future = self._executor.submit(call, *args)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            future.result()

    # --- on the cache's thread --------------------------------------------------------------

    def _read(self, key: bytes) -> bytes | None:
        return self._read_many([key]).get(key)

    def _read_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The bodies stored for ``keys``, by key (absent: not stored); empty when the
        cache is off or the read fails (the failure turns it off)."""
        conn = self._conn
        found: dict[bytes, bytes] = {}
        if conn is None:
            return found
        unique = list(dict.fromkeys(keys))
        try:
            for start in range(0, len(unique), _KEYS_PER_QUERY):
                chunk = unique[start : start + _KEYS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT key, body FROM replies WHERE key IN ({marks})"  # marks only
                found.update((bytes(key), bytes(body)) for key, body in conn.execute(query, chunk))
        except sqlite3.Error as err:
            self._failed("read", err)
            return {}
        return found

    def _write(self, batch: list[tuple[bytes, bytes]]) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            with conn:  # one transaction; rolled back on error
                conn.executemany("INSERT OR REPLACE INTO replies (key, body) VALUES (?, ?)", batch)
            self._bound(conn)
        except sqlite3.Error as err:
            self._failed("write", err)

    def _delete(self, key: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            with conn:
                conn.execute("DELETE FROM replies WHERE key = ?", (key,))
        except sqlite3.Error as err:
            self._failed("write", err)

    def _measure(self) -> None:
        """The file's size in use (pages in use, not free ones), into ``size_bytes``."""
        if self._conn is not None:
            self.size_bytes = _used_bytes(self._conn)

    def _bound(self, conn: sqlite3.Connection) -> None:
        """Evict the oldest entries while the file is over ``max_bytes``, down to
        ``_LOW_WATER`` of it. Page by page the estimate of what a deletion frees can fall
        short (half-empty pages stay), so it is measured again until under the bound."""
        self.size_bytes = _used_bytes(conn)
        evicted = 0
        while self.max_bytes and self.size_bytes > self.max_bytes:
            count = _evict_oldest(conn, self.size_bytes - int(self.max_bytes * _LOW_WATER))
            if not count:
                break  # nothing left to evict: the bound is below an empty file
            evicted += count
            self.size_bytes = _used_bytes(conn)
        if evicted:
            self.evicted += evicted
            log.info(
                "response cache %s: %d oldest entries evicted (%.1f MB now, bound %.1f MB)",
                self.path,
                evicted,
                self.size_bytes / 1e6,
                self.max_bytes / 1e6,
            )

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _failed(self, action: str, err: sqlite3.Error) -> None:
        """A cache that fails mid-run is not worth stopping for: go on without it; unless
        the disk is full or read-only, which stops the run at the next ``lookup``/``put``."""
        if problem := sqlite_write_problem(self.path, err):
            log.error("response cache %s: %s failed: %s", self.path, action, problem)
            self._fatal = problem
        else:
            log.warning(
                "response cache %s: %s failed (%s): running without it", self.path, action, err
            )
        self._close()  # pending puts are then dropped by the next flush
        # Corruption found now would be found again next run: set the file aside for it.
        if not isinstance(err, sqlite3.OperationalError):
            _move_aside(self.path)


def _answer(reads: list[Read], answered: asyncio.Future[dict[bytes, bytes]]) -> None:
    """Resolve a batch of lookups (on the loop) with what its query ``answered``."""
    if answered.cancelled():
        _resolve(reads, {})
    elif (error := answered.exception()) is not None:
        _resolve(reads, {}, error)
    else:
        _resolve(reads, answered.result())


def _resolve(
    reads: list[Read], found: dict[bytes, bytes], error: BaseException | None = None
) -> None:
    """Each lookup of a batch gets its body from ``found`` (None: not stored), or ``error``."""
    for key, future in reads:
        if future.done():  # a lookup cancelled meanwhile has nobody waiting
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(found.get(key))


def _cache_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="response-cache")


def _write_problem(path: Path, err: BaseException) -> OutputWriteError | None:
    """A full disk or a read-only file system met opening the cache. A path that cannot be
    opened at all (a directory, no permission) is not one: the run goes on without a cache
    (and a read-only output directory stops it at its first output file)."""
    if isinstance(err, sqlite3.Error):
        if getattr(err, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_CANTOPEN:
            return None
        return sqlite_write_problem(path, err)
    if isinstance(err, OSError):
        return write_problem(path, err)
    return None


def _evict_oldest(conn: sqlite3.Connection, excess: int) -> int:
    """Delete the oldest entries that add up to ``excess`` bytes and return their pages to
    the file system; how many were deleted."""
    rows = conn.execute(
        "SELECT rowid, length(body) FROM replies ORDER BY rowid"
    )  # oldest first: a new or replaced entry gets a new, larger rowid
    freed = count = 0
    last = None
    for rowid, length in rows:
        last, count, freed = rowid, count + 1, freed + length + _ENTRY_OVERHEAD
        if freed >= excess:
            break
    rows.close()
    if last is None:
        return 0
    with conn:
        conn.execute("DELETE FROM replies WHERE rowid <= ?", (last,))
    # Run to completion by executescript: a cursor's step frees one page at a time.
    conn.executescript("PRAGMA incremental_vacuum;")
    return count


def _used_bytes(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


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
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        # Before the first table: a new file returns freed pages to the file system.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        # WAL: readers never wait for the batch commit; NORMAL: no fsync per commit (a crash
        # may lose the last commits, never corrupt the file).
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
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
