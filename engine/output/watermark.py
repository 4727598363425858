"""The watermark: the place in the seed file before which every row is finished.

A resume over a million done rows that parsed them all again, only to skip them, would spend
seconds per million before its first new request. Instead the run records how far the seed
file is finished: the byte offset (and line number) before which every row's units of the
run's types are done, or the row was rejected, with the counts a resume needs to report them
(valid rows, rejects and where ``rejects.jsonl`` ended). A resume of the same seed file
(``SeedFingerprint``) with the same types and row limit seeks there and reads on.

``RowTracker`` computes it as the run goes: the producer registers each row in seed order
with the units it queued; the writer reports each unit (or reject) once it is committed.
Rows finish out of order, so the tracker keeps the rows still open, and a finished row
after an open one is merged into the run before it: memory stays bounded by the rows in
flight, even when millions of done rows are skipped behind one slow unit.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

# Bytes at the head of the seed file that its fingerprint hashes.
_HEAD_BYTES = 65536


@dataclass(frozen=True, slots=True)
class SeedFingerprint:
    """What identifies a seed file's content for a resume: its size, its modification time and
    a hash of its first 64 KiB. A file appended to, regenerated or edited changes it (and is
    then read from the top, which is always correct)."""

    size: int
    mtime_ns: int
    head: str

    @classmethod
    def of(cls, path: Path) -> Self:
        """``path``'s fingerprint. Raises ``OSError`` if it cannot be read."""
        with path.open("rb") as f:
            stat = os.fstat(f.fileno())
            head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()[:32]
        return cls(stat.st_size, stat.st_mtime_ns, head)


@dataclass(frozen=True, slots=True)
class Watermark:
    """Every row of the seed file before byte ``at`` (line ``line_no``) is finished for
    ``types``: ``rows`` valid rows, each with its units done, and ``rejects`` rejected ones,
    whose lines end at byte ``rejects_end`` of ``rejects.jsonl``. Valid for the seed file
    with fingerprint ``seeds`` read with ``max_document_chars``."""

    at: int
    line_no: int
    rows: int
    rejects: int
    rejects_end: int
    types: tuple[str, ...]
    seeds: SeedFingerprint
    max_document_chars: int

    def to_json(self) -> dict[str, Any]:
        """The watermark as a progress-log entry's value."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Self | None:
        """The watermark a log entry or the state holds; None if absent or unreadable."""
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(
                at=int(data["at"]),
                line_no=int(data["line_no"]),
                rows=int(data["rows"]),
                rejects=int(data["rejects"]),
                rejects_end=int(data["rejects_end"]),
                types=tuple(data["types"]),
                seeds=SeedFingerprint(**data["seeds"]),
                max_document_chars=int(data["max_document_chars"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


class _Span:
    """Consecutive rows: the first line, the offset after the last, units still open in them,
    and the valid rows and rejects they hold."""

    __slots__ = ("end", "line_no", "open", "rejects", "rejects_end", "rows")

    def __init__(self, line_no: int, end: int, open_units: int, valid: bool) -> None:
        self.line_no = line_no
        self.end = end
        self.open = open_units
        self.rows = int(valid)
        self.rejects = int(not valid)
        self.rejects_end = -1


class RowTracker:
    """The watermark of a run as its units are committed (module docstring)."""

    def __init__(self, start: Watermark) -> None:
        """``start``: where the run starts reading (the previous watermark, or the top of the
        file: offset 0, line 1, nothing counted)."""
        self.mark = start
        self._spans: deque[_Span] = deque()
        self._by_line: dict[int, _Span] = {}

    def row(self, line_no: int, end: int, units: int, *, valid: bool) -> None:
        """Row ``line_no`` (ending at byte ``end``), read in seed order, with ``units`` units
        queued (0: all done before; a reject counts as one, committed by the writer)."""
        last = self._spans[-1] if self._spans else None
        if units == 0 and last is not None and last.open == 0:
            last.end = end  # finished behind an open row: joins the finished run before it
            last.rows += int(valid)
            last.rejects += int(not valid)
            self._advance()
            return
        span = _Span(line_no, end, units, valid)
        self._spans.append(span)
        if units:
            self._by_line[line_no] = span
        self._advance()

    def finished(self, line_no: int, rejects_end: int | None = None) -> None:
        """One unit (or the reject) of row ``line_no`` is committed; for a reject,
        ``rejects_end`` is the length of ``rejects.jsonl`` with its line. Rows the tracker
        did not register (read again from before the start) are ignored."""
        span = self._by_line.get(line_no)
        if span is None:
            return
        span.open -= 1
        if rejects_end is not None:
            span.rejects_end = rejects_end
        if span.open <= 0:
            del self._by_line[line_no]
            self._advance()

    @property
    def open_rows(self) -> int:
        """Spans held: rows with open units and the finished runs between them."""
        return len(self._spans)

    def _advance(self) -> None:
        mark = self.mark
        at, line_no, rows, rejects, rejects_end = (
            mark.at,
            mark.line_no,
            mark.rows,
            mark.rejects,
            mark.rejects_end,
        )
        moved = False
        while self._spans and self._spans[0].open <= 0:
            span = self._spans.popleft()
            moved = True
            at = span.end
            line_no = span.line_no + span.rows + span.rejects
            rows += span.rows
            rejects += span.rejects
            rejects_end = max(rejects_end, span.rejects_end)
        if moved:
            self.mark = Watermark(
                at,
                line_no,
                rows,
                rejects,
                rejects_end,
                mark.types,
                mark.seeds,
                mark.max_document_chars,
            )

    def __repr__(self) -> str:
        return f"<RowTracker at={self.mark.at} line={self.mark.line_no} open={len(self._spans)}>"
