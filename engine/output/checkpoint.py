"""Resume state: which (document, type) units are finished, and where each output file ends.

``progress.jsonl`` (the *log*) gets one line per finished unit, written only after the unit's
records are on disk, with the byte length of every output file at that point. On resume, each
file is cut back to the length the last complete entry recorded: a unit a crash left
half-written, or a torn last line, disappears, and the unit runs again. Each unit's records
appear exactly once.

A short log is read whole (at most ``FOLD_AT`` entries: milliseconds). A longer one, whether
left by a run that was killed or by an engine from before ``state.sqlite``, is folded into
``state.sqlite`` (``engine.output.state``) in chunks, each a durable transaction, and only
then emptied; the writer folds it the same way as a run goes. So a resume reads a bounded
log and queries the database for the rest: memory stays flat whatever the number of units
done, and no start re-reads everything ever done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.output.files import writing
from engine.output.state import STATE_FILE, ResumeState
from engine.output.unitset import UnitSet, doc_key
from engine.output.watermark import Watermark

__all__ = [
    "FAILURES_FILE",
    "FOLD_AT",
    "PROGRESS_FILE",
    "REJECTS_FILE",
    "Checkpoint",
    "DoneUnits",
    "UnitSet",
    "fold_log",
    "gen_name",
    "load_checkpoint",
    "read_checkpoint",
    "record_ids",
    "store_mark",
]

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.jsonl"
FAILURES_FILE = "failures.jsonl"
REJECTS_FILE = "rejects.jsonl"
# Log entries past which the log is folded into state.sqlite (about 3 MB of log).
FOLD_AT = 10_000
# Entries per fold transaction.
_FOLD_CHUNK = 5_000


def gen_name(gen_type: str) -> str:
    """A type's output file, relative to the output directory."""
    return f"{gen_type}/gen.jsonl"


class DoneUnits:
    """The finished units: those in ``state.sqlite`` and those of the log not yet folded.

    Asking about a unit is a query (the last document's answer is remembered, since each
    type of a row is asked in turn): run it off the event loop.
    """

    def __init__(self, state: ResumeState | None = None) -> None:
        self.state = state
        self._logged = UnitSet()
        # Seed row positions (line, byte offset) the log records, by document key.
        self._logged_rows: dict[int | str, tuple[int, int]] = {}
        self._size: int | None = None

    def add_logged(
        self, doc_id: str, gen_type: str, line: int | None = None, at: int | None = None
    ) -> None:
        """A unit the log records as finished, and where its seed row was, if it says."""
        self._logged.add((doc_id, gen_type))
        if line is not None and at is not None:
            key = doc_key(doc_id)
            known = self._logged_rows.get(key)
            if known is None or line < known[0]:
                self._logged_rows[key] = (line, at)
        self._size = None

    def row_of(self, doc_id: str) -> tuple[int, int] | None:
        """Where the seed row of ``doc_id`` was when its units finished: (line number, byte
        offset), the first if several; None when no entry recorded it."""
        rows = [] if self.state is None else [u.row for u in self.state.units_of(doc_id)]
        rows.append(self._logged_rows.get(doc_key(doc_id)))
        known = [row for row in rows if row is not None]
        return min(known) if known else None

    def __contains__(self, unit: object) -> bool:
        if unit in self._logged:
            return True
        if self.state is None or not isinstance(unit, tuple) or len(unit) != 2:
            return False
        doc_id, gen_type = unit
        return any(done.gen_type == gen_type for done in self.state.units_of(doc_id))

    def first_line(self, doc_id: str) -> int | None:
        """The first seed line at which a unit of ``doc_id`` was finished, when recorded."""
        row = self.row_of(doc_id)
        return None if row is None else row[0]

    def __len__(self) -> int:
        if self._size is None:
            stored = 0 if self.state is None else self.state.count()
            logged = len(self._logged)
            if self.state is not None:
                logged = sum(1 for unit in self._logged if not self._stored(unit))
            self._size = stored + logged
        return self._size

    def __bool__(self) -> bool:
        return len(self) > 0

    def _stored(self, unit: tuple[str, str]) -> bool:
        assert self.state is not None
        return any(done.gen_type == unit[1] for done in self.state.units_of(unit[0]))

    def __repr__(self) -> str:
        return f"<DoneUnits stored={self.state!r} logged={len(self._logged)}>"


@dataclass
class Checkpoint:
    """Units finished before this run and the committed length of each output file
    (relative path → bytes)."""

    done: DoneUnits = field(default_factory=DoneUnits)
    # Done units that lost items (listed in failures.jsonl): what --retry-failed reruns.
    failed: UnitSet = field(default_factory=UnitSet)
    lengths: dict[str, int] = field(default_factory=dict)
    # Entries in the log now: the writer folds it into the state when it reaches FOLD_AT.
    log_entries: int = 0
    # How far the seed file is finished (engine.output.watermark), if recorded.
    watermark: Watermark | None = None
    # The output directory, when the checkpoint is its own (``load_checkpoint``).
    out_dir: Path | None = None

    @property
    def state(self) -> ResumeState | None:
        """The open ``state.sqlite``, if any."""
        return self.done.state

    @property
    def stores(self) -> bool:
        """Whether the checkpoint has a directory to fold into and store watermarks in."""
        return self.out_dir is not None

    def writable_state(self) -> ResumeState:
        """``state.sqlite``, created now if there is none yet. Needs ``out_dir``."""
        if self.done.state is None:
            assert self.out_dir is not None, "a checkpoint without a directory"
            self.done.state = ResumeState.open(self.out_dir)
        assert self.done.state is not None
        return self.done.state

    def is_done(self, doc_id: str, gen_type: str) -> bool:
        """Whether the unit finished in an earlier run (with or without lost items)."""
        return (doc_id, gen_type) in self.done

    def record(self, entry: dict[str, Any]) -> None:
        """Apply one log entry: a finished unit, or (without a unit) new file lengths."""
        self.lengths = entry["lengths"]
        self.log_entries += 1
        if "doc_id" not in entry:
            return
        unit = (entry["doc_id"], entry["gen_type"])
        self.done.add_logged(*unit, entry.get("line"), entry.get("at"))
        if entry.get("failures"):
            self.failed.add(unit)
        else:
            self.failed.discard(unit)

    def lengths_line(self) -> bytes:
        """A progress entry that only records file lengths (after a file was rewritten)."""
        return orjson.dumps({"lengths": self.lengths}) + b"\n"

    def progress_line(
        self,
        doc_id: str,
        gen_type: str,
        records: int,
        failures: int,
        *,
        line: int | None = None,
        at: int | None = None,
    ) -> bytes:
        """The progress entry of one finished unit: its records and lost items, every output
        file's committed length (bytes) once its lines are written, and, when known, its seed
        row's line number and byte offset (what a resume needs to read that row again)."""
        entry: dict[str, Any] = {
            "doc_id": doc_id,
            "gen_type": gen_type,
            "records": records,
            "failures": failures,
            "lengths": self.lengths,
        }
        if line is not None and at is not None and at >= 0:
            entry["line"] = line
            entry["at"] = at
        return orjson.dumps(entry) + b"\n"

    def close(self) -> None:
        """Close ``state.sqlite`` (idempotent)."""
        if self.state is not None:
            self.state.close()

    def __repr__(self) -> str:
        return (
            f"<Checkpoint done={len(self.done)} failed={len(self.failed)} "
            f"files={len(self.lengths)} log={self.log_entries}>"
        )


def load_checkpoint(out_dir: Path, *, fold_at: int = FOLD_AT) -> Checkpoint:
    """The output directory's resume state, ready to resume: the log folded into
    ``state.sqlite`` if it holds ``fold_at`` entries or more, a torn last line dropped, and
    every output file cut back to its committed length.

    The caller owns the directory (its lock) and closes the checkpoint. Raises
    ``OutputWriteError`` when the state cannot be written, ``ConfigError`` when it is unusable.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(out_dir=out_dir)
    try:
        _load(checkpoint, out_dir, fold_at)
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint


def _load(checkpoint: Checkpoint, out_dir: Path, fold_at: int) -> None:
    """Fill the empty ``checkpoint`` from ``out_dir``: ``load_checkpoint``."""
    # Not created before it is needed (a fold, a watermark): a short run writes no database.
    checkpoint.done.state = ResumeState.open(out_dir, create=False)
    progress = out_dir / PROGRESS_FILE
    # Count the log's entries up to fold_at (a long log is folded, not held), and find where
    # the last complete one ends.
    entries = good_end = 0
    for _, end in _entries(progress):
        entries, good_end = entries + 1, end
        if entries >= fold_at:
            break
    if entries >= fold_at:
        folded = fold_log(checkpoint.writable_state(), progress)
        log.info("resume: %d entries of %s folded into %s", folded, progress, STATE_FILE)
        good_end = 0
    if progress.exists():
        _truncate(progress, good_end)
    if checkpoint.state is not None:
        _restore(checkpoint, checkpoint.state, good_end)
    checkpoint.log_entries = 0
    for entry, _ in _entries(progress):  # the short log that is left, on top of the state
        checkpoint.record(entry)
    for name in _output_files(out_dir):
        _truncate(out_dir / name, checkpoint.lengths.get(name, 0))


def read_checkpoint(out_dir: Path) -> Checkpoint:
    """What the resume state records, read only: unlike ``load_checkpoint``, nothing is cut,
    folded or created. The log is read whole (bounded by the writer's folds; an output
    directory from before ``state.sqlite`` has all its units there)."""
    state = ResumeState.open(out_dir, read_only=True)
    progress = out_dir / PROGRESS_FILE
    size = progress.stat().st_size if progress.exists() else 0
    checkpoint = Checkpoint()
    if state is not None:
        checkpoint.done.state = state
        _restore(checkpoint, state, size)
    for entry, _ in _entries(progress):
        checkpoint.record(entry)
    return checkpoint


def _restore(checkpoint: Checkpoint, state: ResumeState, log_bytes: int) -> None:
    """Set ``checkpoint`` to what ``state`` holds, before the log's entries (``log_bytes``)."""
    checkpoint.failed = state.failed()
    checkpoint.lengths = state.lengths()
    checkpoint.watermark = _mark(state, log_bytes)


def _mark(state: ResumeState, log_bytes: int) -> Watermark | None:
    """The stored watermark, unless it covers units of a log longer than the one found."""
    stored = state.meta("watermark")
    if not isinstance(stored, dict):
        return None
    mark = Watermark.from_json(stored.get("mark"))
    if mark is not None and stored.get("log_bytes", 0) > log_bytes:
        log.warning(
            "%s is shorter than when the watermark was stored: the seed file is read from the "
            "top (only units recorded as done are skipped)",
            PROGRESS_FILE,
        )
        return None
    return mark


def store_mark(state: ResumeState, mark: Watermark, log_bytes: int) -> None:
    """Store ``mark``, whose units are all in the state or the log's first ``log_bytes``."""
    state.set_meta("watermark", {"mark": mark.to_json(), "log_bytes": log_bytes})


def fold_log(state: ResumeState, progress: Path) -> int:
    """Fold every complete entry of the log at ``progress`` into ``state`` (chunked durable
    transactions); the caller then empties the log. Returns the entries folded."""
    folded = 0
    chunk: list[dict[str, Any]] = []
    for entry, _ in _entries(progress):
        chunk.append(entry)
        if len(chunk) >= _FOLD_CHUNK:
            state.apply(chunk)
            folded += len(chunk)
            chunk = []
    state.apply(chunk, log_folded=True)
    return folded + len(chunk)


def _entries(progress: Path) -> Iterator[tuple[dict[str, Any], int]]:
    """The log's complete entries, each with the offset just past it; stops at a torn line."""
    if not progress.exists():
        return
    end = 0
    with progress.open("rb") as f:
        for line in f:
            entry = _parse_progress(line)
            if entry is None:
                log.warning("ignoring a torn line at the end of %s", progress)
                return
            end += len(line)
            yield entry, end


def _parse_progress(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("lengths"), dict):
        return None
    if "doc_id" in entry and "gen_type" not in entry:
        return None
    return entry


def _output_files(out_dir: Path) -> list[str]:
    """Files whose length the checkpoint governs, relative to ``out_dir``."""
    names = [p.relative_to(out_dir).as_posix() for p in out_dir.glob("*/gen.jsonl")]
    if (out_dir / FAILURES_FILE).exists():
        names.append(FAILURES_FILE)
    return names


def _truncate(path: Path, length: int) -> None:
    size = path.stat().st_size
    if size > length:
        log.info("resume: cutting %s from %d to %d bytes (unfinished work)", path, size, length)
        with writing(path), path.open("r+b") as f:
            f.truncate(length)
            os.fsync(f.fileno())


def record_ids(out_dir: Path, units: UnitSet) -> set[str]:
    """Ids of the records already written for ``units`` (one pass over their types' files)."""
    ids: set[str] = set()
    for gen_type in units.types:
        path = out_dir / gen_name(gen_type)
        if not path.exists():
            continue
        with path.open("rb") as f:
            for line in f:
                record = orjson.loads(line)
                if (record["doc_id"], gen_type) in units:
                    ids.add(record["id"])
    return ids
