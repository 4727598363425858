"""``state.sqlite``: the compacted resume state of an output directory.

The writer records each finished unit as a line of ``progress.jsonl`` (the *log*, see
``engine.output.checkpoint``). Read whole at every start, a log costs a resume time and memory
in proportion to everything ever done; so once it is long it is *folded* into this database
(SQLite, from the standard library), which a resume queries instead of loading.

Tables (``PRAGMA user_version`` is ``STATE_VERSION``):

- ``units(doc, type, failures, line, at)``, WITHOUT ROWID, keyed by (doc, type): one finished
  unit. ``doc`` is the document id's 64 bits as a signed integer (an id that is not 16 hex
  digits is kept as text), ``type`` a code from ``types``, ``failures`` the items it lost,
  ``line`` and ``at`` its seed row's line number and byte offset in the (decompressed) seed
  file, NULL when the log did not say. About 40 bytes a unit on disk, nothing in memory.
- ``types(code, name)``: the generation types by code.
- ``counts(type, units)``: finished units per type, kept up to date by a trigger, so that a
  resume knows how many units are done without counting them.
- ``files(name, length)``: every output file's committed length in bytes.
- ``meta(key, value)``: ``watermark``, JSON: ``{"mark": ..., "log_bytes": n}``
  (``engine.output.watermark``), stored by the writer every few seconds once the units it
  covers are in the log, within its first ``n`` bytes (0 once the log is folded): a log
  found shorter (deleted, cut by hand) voids it.

Every entry sets values (a unit's, the lengths) and the last one wins, so
applying entries again is harmless: a fold cut short (kill -9, power loss, a full disk) is
simply done again. Commits are durable (``synchronous=FULL``) before the log they fold is
truncated. One connection, used under a lock from whichever thread calls (the writer's fold,
the producer's lookups, which run off the event loop).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import orjson

from engine.errors import ConfigError
from engine.output.files import sqlite_write_problem
from engine.output.unitset import UnitSet, doc_id_of, doc_key

log = logging.getLogger(__name__)

STATE_FILE = "state.sqlite"
STATE_VERSION = 1
# Another process reading the file (``plan``) may hold it for a moment.
_BUSY_TIMEOUT_S = 10.0
# Pages of cache: enough for the upper levels of the unit index, bounded whatever its size.
_CACHE_KIB = 8192

_SCHEMA = """
CREATE TABLE IF NOT EXISTS types (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS units (
    doc NOT NULL,
    type INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    line INTEGER,
    at INTEGER,
    PRIMARY KEY (doc, type)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS failed_units ON units (type, doc) WHERE failures > 0;
CREATE TABLE IF NOT EXISTS counts (type INTEGER PRIMARY KEY, units INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS count_units AFTER INSERT ON units BEGIN
    INSERT INTO counts (type, units) VALUES (NEW.type, 1)
    ON CONFLICT (type) DO UPDATE SET units = units + 1;
END;
CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, length INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL);
"""
_UPSERT_UNIT = """
INSERT INTO units (doc, type, failures, line, at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (doc, type) DO UPDATE SET
    failures = excluded.failures,
    line = coalesce(excluded.line, line),
    at = coalesce(excluded.at, at)
"""


@dataclass(frozen=True, slots=True)
class DoneUnit:
    """What the state holds of one finished unit: its type, the items it lost, and where its
    seed row was (line number and byte offset; None when not recorded)."""

    gen_type: str
    failures: int
    line: int | None
    at: int | None

    @property
    def row(self) -> tuple[int, int] | None:
        """(line, byte offset) of the seed row, when recorded."""
        return None if self.line is None or self.at is None else (self.line, self.at)


class ResumeState:
    """An open ``state.sqlite``. ``ResumeState.open(out_dir)``; ``close()`` when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self._conn = conn
        self._lock = threading.Lock()
        self._codes: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._memo: tuple[int | str, list[DoneUnit]] | None = None
        self._load_types()

    @classmethod
    def open(cls, out_dir: Path, *, read_only: bool = False, create: bool = True) -> Self | None:
        """Open (or create) ``<out_dir>/state.sqlite``; None when there is none and it is
        opened read-only or not to be created.

        Raises ``ConfigError`` for a state written by a newer engine or a file that is not a
        state database, ``OutputWriteError`` when it cannot be written (disk full, read-only).
        """
        path = out_dir / STATE_FILE
        if (read_only or not create) and not path.exists():
            return None
        try:
            conn = _connect(path, read_only=read_only)
        except sqlite3.DatabaseError as err:
            if problem := sqlite_write_problem(path, err):
                raise problem from None
            raise ConfigError(
                [f"{path} is not a usable resume state ({err}): run with --fresh"]
            ) from None
        return cls(conn, path, read_only=read_only)

    # --- reading ----------------------------------------------------------------------------

    def units_of(self, doc_id: str) -> list[DoneUnit]:
        """The finished units of document ``doc_id`` (one query, the last one remembered: a
        caller asks about each type of a row in turn)."""
        key = doc_key(doc_id)
        with self._lock:
            if self._memo is not None and self._memo[0] == key:
                return self._memo[1]
            rows = self._conn.execute(
                "SELECT type, failures, line, at FROM units WHERE doc = ?", (key,)
            ).fetchall()
            units = [DoneUnit(self._names[t], f, line, at) for t, f, line, at in rows]
            self._memo = (key, units)
            return units

    def count(self) -> int:
        """Finished units, all types."""
        with self._lock:
            row = self._conn.execute("SELECT coalesce(sum(units), 0) FROM counts").fetchone()
        return int(row[0])

    def failed(self) -> UnitSet:
        """The finished units that lost items (a few, normally; read through an index)."""
        failed = UnitSet()
        with self._lock:
            rows = self._conn.execute(
                "SELECT doc, type FROM units INDEXED BY failed_units WHERE failures > 0"
            )
            for doc, code in rows:
                failed.add((doc_id_of(doc), self._names[code]))
        return failed

    def lengths(self) -> dict[str, int]:
        """Every output file's committed length (bytes), by path relative to the directory."""
        with self._lock:
            return dict(self._conn.execute("SELECT name, length FROM files").fetchall())

    def meta(self, key: str) -> Any:
        """The JSON value stored under ``key`` in ``meta``, or None."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    # --- writing ----------------------------------------------------------------------------

    def apply(self, entries: Sequence[Mapping[str, Any]], *, log_folded: bool = False) -> None:
        """Apply progress entries (``engine.output.checkpoint``) in one durable transaction:
        finished units, and the files' lengths as the last entry has them. ``log_folded``:
        these are the log's last entries, so the watermark no longer needs any of the log.

        Raises ``OutputWriteError`` when the file cannot be written; nothing is applied then.
        """
        if not entries and not log_folded:
            return
        units = []
        for entry in entries:
            if "doc_id" in entry:
                code = self._code(entry["gen_type"])
                units.append(
                    (
                        doc_key(entry["doc_id"]),
                        code,
                        int(entry.get("failures") or 0),
                        entry.get("line"),
                        entry.get("at"),
                    )
                )
        with self._lock, self._writing():
            self._conn.executemany(_UPSERT_UNIT, units)
            if entries:
                self._conn.execute("DELETE FROM files")
                lengths = entries[-1]["lengths"]
                self._conn.executemany("INSERT INTO files VALUES (?, ?)", lengths.items())
            if log_folded:
                row = self._conn.execute("SELECT value FROM meta WHERE key = 'watermark'")
                if (found := row.fetchone()) is not None:
                    stored = {**orjson.loads(found[0]), "log_bytes": 0}
                    self._conn.execute(
                        "UPDATE meta SET value = ? WHERE key = 'watermark'", (orjson.dumps(stored),)
                    )
            self._memo = None

    def set_meta(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON) under ``key`` in ``meta``, durably."""
        with self._lock, self._writing():
            self._conn.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, orjson.dumps(value))
            )

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"<ResumeState {self.path} {mode} types={sorted(self._codes)}>"

    # --- inside -----------------------------------------------------------------------------

    def _load_types(self) -> None:
        for code, name in self._conn.execute("SELECT code, name FROM types"):
            self._codes[name] = code
            self._names[code] = name

    def _code(self, gen_type: str) -> int:
        code = self._codes.get(gen_type)
        if code is None:
            code = len(self._codes) + 1
            with self._lock, self._writing():
                self._conn.execute("INSERT INTO types VALUES (?, ?)", (code, gen_type))
            self._codes[gen_type] = code
            self._names[code] = gen_type
        return code

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction, committed durably, rolled back on error; a full disk or a
        read-only file system becomes ``OutputWriteError``."""
        try:
            with self._conn:
                yield
        except sqlite3.DatabaseError as err:
            if problem := sqlite_write_problem(self.path, err):
                raise problem from err
            raise


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=_BUSY_TIMEOUT_S,
            check_same_thread=False,
        )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > STATE_VERSION:
            raise ConfigError(
                [
                    f"{path} is a resume state of version {version}, written by a newer "
                    f"engine (this one reads version {STATE_VERSION}): resume with that "
                    "engine, or run with --fresh"
                ]
            )
        if not read_only:
            # A rollback journal, not WAL: a reader in another process (plan) needs no
            # shared-memory file, and folds are rare. FULL: each commit is on disk before
            # the log it folds is truncated.
            conn.execute("PRAGMA journal_mode = DELETE")
            conn.execute("PRAGMA synchronous = FULL")
            with conn:
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {STATE_VERSION}")
        else:
            conn.execute("SELECT count(*) FROM types").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn
