"""Where a run starts reading the seed file, and what it counts without reading.

With a usable watermark (``engine.output.watermark``: the same seed file, types the watermark
covers, the same ``input.max_document_chars``, ``rejects.jsonl`` intact), the run seeks to it:
the rows before it are finished and are counted, not parsed. Units before it that lost items
and are to run again are read again one by one at the byte offsets the state recorded for
them. A row after it that repeats a document finished before it is still a duplicate (the
state says where that document was). Without one (a first run, a changed seed file, an output
directory from an older engine), the run reads from the top, skipping done units.

The producer, the count pass of the progress display, the preflight's "anything to do?" and
``plan`` all read the seeds through one ``ResumePoint``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.output.checkpoint import REJECTS_FILE, Checkpoint, UnitSet
from engine.output.watermark import SeedFingerprint, Watermark
from engine.seeds import Reject, SeedPosition, SeedRow, read_rows_at, read_seeds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """How a run reads ``path``: rows ``again`` (before the mark, with their documents' ids)
    read again by offset, then everything from ``mark`` on; ``prior`` finds the first line of a
    document finished before the mark (duplicates). ``mark`` is the top of the file when
    nothing is known."""

    path: Path
    max_document_chars: int
    mark: Watermark
    again: tuple[tuple[SeedPosition, str], ...] = ()
    prior: Callable[[str], int | None] | None = None

    @property
    def skips(self) -> bool:
        """Whether reading starts past the top of the file."""
        return self.mark.at > 0

    @property
    def rows_skipped(self) -> int:
        """Valid rows before the mark that are neither read nor run: their units all count
        as done before, for every type of the run."""
        return self.mark.rows - len(self.again)

    def seeds(self) -> Generator[SeedRow | Reject, None, None]:
        """The rows this run reads, in order: the ones read again, then from the mark on."""
        positions = [position for position, _ in self.again]
        yield from read_rows_at(self.path, self.max_document_chars, positions)
        yield from self.seeds_after()

    def seeds_after(self) -> Generator[SeedRow | Reject, None, None]:
        """Only the rows from the mark on (what a count adds to ``mark``'s figures)."""
        start = SeedPosition(self.mark.at, self.mark.line_no)
        prior = self.prior if self.skips else None
        return read_seeds(self.path, self.max_document_chars, start=start, prior=prior)

    def __repr__(self) -> str:
        return (
            f"<ResumePoint line={self.mark.line_no} at={self.mark.at} rows={self.mark.rows} "
            f"again={len(self.again)}>"
        )


def top_of(path: Path, gen_types: Sequence[str], max_document_chars: int) -> Watermark:
    """The watermark of a run that starts at the top of ``path``: nothing finished yet."""
    return Watermark(0, 1, 0, 0, 0, tuple(gen_types), SeedFingerprint.of(path), max_document_chars)


def resume_point(
    path: Path,
    max_document_chars: int,
    gen_types: Sequence[str],
    checkpoint: Checkpoint,
    out_dir: Path,
    run_again: UnitSet | None = None,
) -> ResumePoint:
    """Where a run over ``path`` with ``gen_types`` starts (module docstring). ``run_again``:
    done units the run works on again (they lost items). Raises ``OSError`` if ``path``
    cannot be read."""
    top = top_of(path, gen_types, max_document_chars)
    mark = checkpoint.watermark
    if mark is None or mark.at == 0:
        return ResumePoint(path, max_document_chars, top)
    why = _unusable(mark, top, out_dir)
    again: dict[int, tuple[SeedPosition, str]] = {}
    for doc_id, _ in run_again or ():
        if why:
            break
        row = checkpoint.done.row_of(doc_id)
        if row is None:
            why = "a unit to run again has no recorded seed position"
        elif row[0] < mark.line_no:
            again[row[1]] = (SeedPosition(row[1], row[0]), doc_id)
    if why:
        log.info("resume: reading the seed file from the top (%s)", why)
        return ResumePoint(path, max_document_chars, top)
    log.info(
        "resume: rows 1-%d of %s are finished (%d valid, %d rejected): reading from line %d "
        "(%d rows before it read again)",
        mark.line_no - 1,
        path,
        mark.rows,
        mark.rejects,
        mark.line_no,
        len(again),
    )
    mark = Watermark(
        mark.at,
        mark.line_no,
        mark.rows,
        mark.rejects,
        mark.rejects_end,
        tuple(gen_types),
        top.seeds,
        max_document_chars,
    )
    return ResumePoint(
        path,
        max_document_chars,
        mark,
        tuple(again[at] for at in sorted(again)),
        checkpoint.done.first_line,
    )


def _unusable(mark: Watermark, top: Watermark, out_dir: Path) -> str:
    """Why a run described by ``top`` cannot start at ``mark``; "" if it can."""
    if mark.seeds != top.seeds:
        return "the seed file changed since the last run"
    if mark.max_document_chars != top.max_document_chars:
        return "input.max_document_chars changed"
    if not set(top.types) <= set(mark.types):
        return "a type was added"
    rejects = out_dir / REJECTS_FILE
    size = rejects.stat().st_size if rejects.exists() else 0
    if size < mark.rejects_end:
        return f"{REJECTS_FILE} is shorter than recorded"
    return ""
