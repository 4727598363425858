"""Resume state: which (document, type) units are finished, and where each output file ends.

``progress.jsonl`` gets one line per finished unit, written only after the unit's records are
on disk, with the byte length of every output file at that point. On resume, each file is cut
back to the length the last progress line recorded: a unit a crash left half-written, or a torn
last line, disappears, and the unit runs again. Each unit's records appear exactly once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.seeds import DOC_ID_CHARS

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.jsonl"
FAILURES_FILE = "failures.jsonl"
REJECTS_FILE = "rejects.jsonl"
_HEX_DIGITS = frozenset("0123456789abcdef")


def gen_name(gen_type: str) -> str:
    """A type's output file, relative to the output directory."""
    return f"{gen_type}/gen.jsonl"


class UnitSet:
    """A set of (doc_id, gen_type) units, compact: a resumed run over a large corpus holds
    every done unit, so each is one 64-bit integer in a set per type (about a third of a
    tuple of two strings)."""

    def __init__(self, units: Iterable[tuple[str, str]] = ()) -> None:
        self._by_type: dict[str, set[int | str]] = {}
        for unit in units:
            self.add(unit)

    def add(self, unit: tuple[str, str]) -> None:
        """Add the (doc_id, gen_type) ``unit``."""
        doc_id, gen_type = unit
        self._by_type.setdefault(gen_type, set()).add(_key(doc_id))

    def discard(self, unit: tuple[str, str]) -> None:
        """Remove the (doc_id, gen_type) ``unit`` if it is there."""
        doc_id, gen_type = unit
        self._by_type.get(gen_type, set()).discard(_key(doc_id))

    def __contains__(self, unit: object) -> bool:
        if not isinstance(unit, tuple) or len(unit) != 2:
            return False
        doc_id, gen_type = unit
        ids = self._by_type.get(gen_type)
        return ids is not None and isinstance(doc_id, str) and _key(doc_id) in ids

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for gen_type, ids in self._by_type.items():
            for key in ids:
                yield (f"{key:0{DOC_ID_CHARS}x}" if isinstance(key, int) else key), gen_type

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_type.values())

    @property
    def types(self) -> set[str]:
        """The types that have units in the set."""
        return {gen_type for gen_type, ids in self._by_type.items() if ids}

    def of_types(self, gen_types: Iterable[str]) -> UnitSet:
        """The units of ``gen_types`` only."""
        subset = UnitSet()
        for gen_type in gen_types:
            if ids := self._by_type.get(gen_type):
                subset._by_type[gen_type] = set(ids)
        return subset

    def __repr__(self) -> str:
        return f"<UnitSet {len(self)}>"


def _key(doc_id: str) -> int | str:
    """The engine's ids (16 hex digits) as an integer; any other id as it is."""
    if len(doc_id) == DOC_ID_CHARS and _HEX_DIGITS.issuperset(doc_id):
        return int(doc_id, 16)
    return doc_id


@dataclass
class Checkpoint:
    """Units finished before this run and the committed length of each output file
    (relative path → bytes)."""

    done: UnitSet = field(default_factory=UnitSet)
    # Done units that lost items (listed in failures.jsonl): what --retry-failed reruns.
    failed: UnitSet = field(default_factory=UnitSet)
    lengths: dict[str, int] = field(default_factory=dict)

    def is_done(self, doc_id: str, gen_type: str) -> bool:
        """Whether the unit finished in an earlier run (with or without lost items)."""
        return (doc_id, gen_type) in self.done

    def record(self, entry: dict[str, Any]) -> None:
        """Apply one progress entry: a finished unit, or (without a unit) new file lengths."""
        self.lengths = entry["lengths"]
        if "doc_id" not in entry:
            return
        unit = (entry["doc_id"], entry["gen_type"])
        self.done.add(unit)
        if entry.get("failures"):
            self.failed.add(unit)
        else:
            self.failed.discard(unit)

    def lengths_line(self) -> bytes:
        """A progress entry that only records file lengths (after a file was rewritten)."""
        return orjson.dumps({"lengths": self.lengths}) + b"\n"

    def progress_line(self, doc_id: str, gen_type: str, records: int, failures: int) -> bytes:
        """The progress entry of one finished unit: its records and lost items, and every
        output file's committed length (bytes) once its lines are written."""
        entry: dict[str, Any] = {
            "doc_id": doc_id,
            "gen_type": gen_type,
            "records": records,
            "failures": failures,
            "lengths": self.lengths,
        }
        return orjson.dumps(entry) + b"\n"

    def __repr__(self) -> str:
        return (
            f"<Checkpoint done={len(self.done)} failed={len(self.failed)} "
            f"files={len(self.lengths)}>"
        )


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """Read ``progress.jsonl`` (ignoring a torn last line) and cut every output file back to the
    length recorded by the last complete progress line."""
    progress = out_dir / PROGRESS_FILE
    checkpoint, good_end = _read_progress(progress)
    if progress.exists():
        _truncate(progress, good_end)
    for name in _output_files(out_dir):
        _truncate(out_dir / name, checkpoint.lengths.get(name, 0))
    return checkpoint


def read_checkpoint(out_dir: Path) -> Checkpoint:
    """What ``progress.jsonl`` records, read only: unlike ``load_checkpoint``, nothing is cut."""
    return _read_progress(out_dir / PROGRESS_FILE)[0]


def _read_progress(progress: Path) -> tuple[Checkpoint, int]:
    """The checkpoint up to the last complete line, and that line's end (bytes)."""
    checkpoint = Checkpoint()
    good_end = 0
    if progress.exists():
        with progress.open("rb") as f:
            for line in f:
                entry = _parse_progress(line)
                if entry is None:
                    log.warning("ignoring a torn line at the end of %s", progress)
                    break
                checkpoint.record(entry)
                good_end += len(line)
    return checkpoint, good_end


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
        with path.open("r+b") as f:
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
