"""Resume state: which (document, type) units are finished, and where each output file ends.

``progress.jsonl`` gets one line per finished unit, written only after the unit's records are
on disk, with the byte length of every output file at that point. On resume, each file is cut
back to the length the last progress line recorded: a unit a crash left half-written, or a torn
last line, disappears, and the unit runs again. Each unit's records appear exactly once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.jsonl"
FAILURES_FILE = "failures.jsonl"
REJECTS_FILE = "rejects.jsonl"


def gen_name(gen_type: str) -> str:
    """A type's output file, relative to the output directory."""
    return f"{gen_type}/gen.jsonl"


@dataclass
class Checkpoint:
    """Finished units and the committed length of each output file (relative path → bytes)."""

    done: set[tuple[str, str]] = field(default_factory=set)
    # Done units that lost items (listed in failures.jsonl): what --retry-failed reruns.
    failed: set[tuple[str, str]] = field(default_factory=set)
    lengths: dict[str, int] = field(default_factory=dict)

    def is_done(self, doc_id: str, gen_type: str) -> bool:
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
    checkpoint = Checkpoint()
    progress = out_dir / PROGRESS_FILE
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
        _truncate(progress, good_end)
    for name in _output_files(out_dir):
        _truncate(out_dir / name, checkpoint.lengths.get(name, 0))
    return checkpoint


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


def record_ids(out_dir: Path, units: set[tuple[str, str]]) -> set[str]:
    """Ids of the records already written for ``units`` (one pass over their types' files)."""
    ids: set[str] = set()
    for gen_type in {gen_type for _doc, gen_type in units}:
        path = out_dir / gen_name(gen_type)
        if not path.exists():
            continue
        with path.open("rb") as f:
            for line in f:
                record = orjson.loads(line)
                if (record["doc_id"], gen_type) in units:
                    ids.add(record["id"])
    return ids
