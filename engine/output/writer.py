"""The single writer task: the only code that touches the output files.

Workers hand it finished units; it appends each unit's records in one piece, then, once a
batch of units is fsynced, records their progress. Group commit keeps the fsync count low
when units finish faster than a disk syncs.

Units that lost items in earlier runs are run again (``retrying``): only the records they lack
are added, and when the run ends, however it ends, their old lines in ``failures.jsonl`` are
dropped (the new run's lines, if it lost items again, stay). Until then the old lines stand,
so a run stopped early leaves the file saying what is still lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from engine.budget import PassBudget
from engine.output import files
from engine.output.checkpoint import (
    FAILURES_FILE,
    FOLD_AT,
    PROGRESS_FILE,
    REJECTS_FILE,
    Checkpoint,
    UnitSet,
    fold_log,
    gen_name,
    record_ids,
    store_mark,
)
from engine.output.records import Failure, UnitResult
from engine.output.watermark import RowTracker, Watermark
from engine.pipeline.stats import Stats
from engine.seeds import Reject, SeedRow

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UnitDone:
    """A finished unit on its way to the writer: its seed row, type and result."""

    seed: SeedRow
    gen_type: str
    result: UnitResult


WriterItem = UnitDone | Reject
# The watermark is stored at most this often (seconds), and when the writer ends.
MARK_EVERY_S = 2.0


class OutputWriter:
    """Owns ``<out_dir>``: gen files per type, failures, rejects and progress."""

    def __init__(
        self,
        out_dir: Path,
        gen_types: Sequence[str],
        checkpoint: Checkpoint,
        stats: Stats,
        retrying: UnitSet | None = None,
        *,
        fold_at: int = FOLD_AT,
        tracker: RowTracker | None = None,
        rejects_from: int | None = None,
        budget: PassBudget | None = None,
    ) -> None:
        """``retrying``: done units that are run again for the items they lost; only their
        records not yet written are added, and their old failure lines are dropped at the
        end. Their earlier losses are counted in ``stats.lost_before``. ``fold_at``: log
        entries past which the log is folded into the checkpoint's ``state.sqlite``.
        ``tracker``: the run's watermark (the producer registers rows, the writer reports
        them committed and records the watermark in the log). ``rejects_from``: keep that
        many bytes of ``rejects.jsonl`` (the rejects of the rows before the resume point)
        instead of starting it afresh. ``budget``: the event loop's time per pass, shared with
        the flows (``engine.budget``): units that finished together are written a few a
        pass (a unit of the default configuration is about 160 records, 1-3 ms to write).

        Reads the failures file (and, for ``retrying`` units, their types' records): build
        it off the event loop. Raises ``OutputWriteError`` when a file cannot be written."""
        self.out_dir = out_dir
        self._budget = budget or PassBudget()
        self._fold_at = fold_at
        self.tracker = tracker
        self._marked = tracker.mark if tracker is not None else None
        self._marked_at = time.monotonic()
        # (seed line, rejects.jsonl length after a reject) of items written, not yet synced.
        self._written: list[tuple[int, int | None]] = []
        self.checkpoint = checkpoint
        self.stats = stats
        self._types = frozenset(gen_types)
        self._files: dict[str, IO[bytes]] = {}
        self._progress = self._open(PROGRESS_FILE)
        self._retrying = retrying if retrying is not None else UnitSet()
        self._redone = UnitSet()  # units of ``retrying`` committed by this run
        self._lost_again = 0  # items those units lost in this run
        self._written_ids = record_ids(out_dir, self._retrying) if self._retrying else set()
        # failures.jsonl up to here is earlier runs' (after lines of units since done in full
        # are dropped: a crash can leave them behind).
        self._earlier_end = self._tidy_failures()
        for gen_type in gen_types:  # every type gets its file, even if no unit succeeds
            self._append(gen_name(gen_type), ())
        # Rejects are recomputed from the seeds read, so the file starts afresh, or after the
        # rejects of the rows before the resume point.
        with files.writing(out_dir / REJECTS_FILE):
            self._rejects = (out_dir / REJECTS_FILE).open("wb" if rejects_from is None else "ab")
            if rejects_from is not None:
                self._rejects.truncate(rejects_from)
                self._rejects.seek(0, os.SEEK_END)

    async def run(self, queue: asyncio.Queue[WriterItem | None]) -> None:
        """Consume ``queue`` until ``None``. Cancelled, it still commits what already arrived:
        results that reached the writer are never thrown away."""
        try:
            while True:
                batch = [await queue.get(), *_drain(queue)]
                items = [item for item in batch if item is not None]
                await self._commit(items)
                if len(items) < len(batch):
                    return
        except asyncio.CancelledError:
            self._commit_at_once([item for item in _drain(queue) if item is not None])
            raise
        finally:
            try:
                self._record_mark(every_s=0.0)
                try:
                    self._drop_redone_failures()
                except OSError as err:  # the old lines stay; a later run drops them
                    log.error("could not rewrite %s: %s", FAILURES_FILE, err)
            finally:
                self.close()

    async def _commit(self, items: list[WriterItem]) -> None:
        lines: list[bytes] = []
        try:
            for item in items:
                await self._budget.turn()
                lines.append(self._write(item))
        except asyncio.CancelledError:
            # Stopped between two items: the rest are written and synced all the same, as
            # ``run`` does for the items still queued.
            self._commit_at_once(items[len(lines) :], lines)
            raise
        progress = b"".join(lines)
        written, self._written = self._written, []
        mark = self._mark_due()
        sync = asyncio.ensure_future(asyncio.to_thread(self._sync_and_record, progress, mark))
        try:
            await asyncio.shield(sync)
        except asyncio.CancelledError:
            # The records are written: let their progress line follow before stopping, or
            # a resume would cut them off and redo the work.
            await sync
            self._committed(written)
            raise
        self._committed(written)

    def _commit_at_once(self, items: list[WriterItem], lines: Sequence[bytes] = ()) -> None:
        """Write ``items`` and commit them, with the progress ``lines`` of items written
        before, without leaving the loop's thread: for a writer being cancelled."""
        progress = b"".join([*lines, *(self._write(item) for item in items)])
        written, self._written = self._written, []
        self._sync_and_record(progress)
        self._committed(written)

    def _committed(self, written: list[tuple[int, int | None]]) -> None:
        """Items now on disk, progress included: their rows may count as finished."""
        if self.tracker is not None:
            for line_no, rejects_end in written:
                self.tracker.finished(line_no, rejects_end)

    def _mark_due(self, every_s: float = MARK_EVERY_S) -> Watermark | None:
        """The watermark, if it moved and was last stored ``every_s`` ago or more."""
        tracker = self.tracker
        if tracker is None or not self.checkpoint.stores or tracker.mark == self._marked:
            return None
        now = time.monotonic()
        if now - self._marked_at < every_s:
            return None
        self._marked, self._marked_at = tracker.mark, now
        return tracker.mark

    def _record_mark(self, every_s: float) -> None:
        if (mark := self._mark_due(every_s)) is not None:
            self._store_mark(mark)

    def _store_mark(self, mark: Watermark) -> None:
        """Store the watermark in the state: the units it covers are in the log already."""
        store_mark(self.checkpoint.writable_state(), mark, self._progress.tell())

    def _write(self, item: WriterItem) -> bytes:
        """Append one item's lines; return its progress line (empty for rejects)."""
        if isinstance(item, Reject):
            with files.writing(self.out_dir / REJECTS_FILE):
                self._rejects.write(orjson.dumps(item.record()) + b"\n")
            self._written.append((item.line_no, self._rejects.tell()))
            self.stats.rejects += 1
            return b""
        self._written.append((item.seed.line_no, None))
        result = item.result
        records = [r for r in result.records if r.id not in self._written_ids]
        self._append(gen_name(item.gen_type), (record.to_json() + b"\n" for record in records))
        if result.failures:
            lines = (_failure_line(item.seed, item.gen_type, f) for f in result.failures)
            self._append(FAILURES_FILE, lines)
            self.stats.still_lost.update(reason(f.kind, f.check, f.status) for f in result.failures)
        unit = (item.seed.doc_id, item.gen_type)
        if unit in self._retrying:
            self._redone.add(unit)
            self._lost_again += len(result.failures)
        self.stats.unit_written(
            item.gen_type, len(records), result.judged_out, (f.kind for f in result.failures)
        )
        self.stats.kept_records(item.gen_type, records)
        return self.checkpoint.progress_line(
            item.seed.doc_id,
            item.gen_type,
            len(records),
            len(result.failures),
            line=item.seed.line_no,
            at=item.seed.at,
        )

    def _append(self, name: str, lines: Iterable[bytes]) -> None:
        f = self._files.get(name) or self._open(name)
        self._files[name] = f
        with files.writing(self.out_dir / name):
            for line in lines:
                f.write(line)
        self.checkpoint.lengths[name] = f.tell()

    def _sync_and_record(self, progress: bytes, mark: Watermark | None = None) -> None:
        """fsync every file, then append the units' progress entries and fsync the log;
        fold the log into ``state.sqlite`` once it is long; store ``mark`` (a watermark
        covering units of earlier commits only). Runs in a thread."""
        for name, f in (*self._files.items(), (REJECTS_FILE, self._rejects)):
            _sync(self.out_dir / name, f)
        if progress:
            self._log(progress, progress.count(b"\n"))
        if mark is not None:
            self._store_mark(mark)

    def _log(self, entries: bytes, count: int) -> None:
        """Append ``count`` entries to the log, durably; fold it once it holds ``FOLD_AT``."""
        path = self.out_dir / PROGRESS_FILE
        with files.writing(path):
            self._progress.write(entries)
        _sync(path, self._progress)
        self.checkpoint.log_entries += count
        if self.checkpoint.stores and self.checkpoint.log_entries >= self._fold_at:
            fold_log(self.checkpoint.writable_state(), path)  # durable before the log is emptied
            with files.writing(path):
                os.ftruncate(self._progress.fileno(), 0)
                os.fsync(self._progress.fileno())
                self._progress.seek(0, os.SEEK_END)  # tell() is the log's length again
            self.checkpoint.log_entries = 0

    def _tidy_failures(self) -> int:
        """Count the earlier losses of the units to run again (``stats.lost_before``) and
        the ones still listed (``stats.still_lost``); drop the lines of units whose last run
        lost nothing. Returns the length of failures.jsonl: the earlier runs' part."""
        failed = self.checkpoint.failed
        stale = 0

        def keep(entry: dict[str, Any]) -> bool:
            nonlocal stale
            unit = (entry["doc_id"], entry["gen_type"])
            if unit not in failed:
                stale += 1
                return False
            why = reason(entry["kind"], entry.get("check", ""), entry.get("status"))
            if unit in self._retrying:
                self.stats.lost_before[why] += 1
            if unit[1] in self._types:
                self.stats.still_lost[why] += 1
            return True

        path = self.out_dir / FAILURES_FILE
        if not path.exists():
            return 0
        with path.open("rb") as f:
            for line in f:
                keep(orjson.loads(line))
        if stale:
            log.info("failures.jsonl: dropping %d lines of units since done in full", stale)
            return self._rewrite_failures(
                lambda entry, _at: (entry["doc_id"], entry["gen_type"]) in failed
            )
        return path.stat().st_size

    def _drop_redone_failures(self) -> None:
        """The run is over: drop the earlier lines of the units it ran again and finished."""
        if not len(self._redone):
            return
        redone, end = self._redone, self._earlier_end
        dropped: Counter[str] = Counter()

        def keep(entry: dict[str, Any], at: int) -> bool:
            if at < end and (entry["doc_id"], entry["gen_type"]) in redone:
                dropped[reason(entry["kind"], entry.get("check", ""), entry.get("status"))] += 1
                return False
            return True

        self._rewrite_failures(keep)
        self.stats.still_lost.subtract(dropped)
        self.stats.still_lost = +self.stats.still_lost  # no zero or negative counts
        self.stats.recovered = max(0, dropped.total() - self._lost_again)

    def _rewrite_failures(self, keep: Callable[[dict[str, Any], int], bool]) -> int:
        """Rewrite failures.jsonl with the lines ``keep(entry, offset)`` accepts (atomically),
        record its new length in the progress file, and return it."""
        path = self.out_dir / FAILURES_FILE
        if not path.exists():
            return 0
        old_file = self._files.pop(FAILURES_FILE, None)
        if old_file is not None:
            old_file.close()
        tmp = path.with_suffix(".tmp")
        with path.open("rb") as old, files.writing(path), tmp.open("wb") as new:
            at = 0
            for line in old:
                if keep(orjson.loads(line), at):
                    new.write(line)
                at += len(line)
            _sync(path, new)
            length = self.checkpoint.lengths[FAILURES_FILE] = new.tell()
        files.replace(tmp, path)
        self._log(self.checkpoint.lengths_line(), 1)
        return length

    def _open(self, name: str) -> IO[bytes]:
        path = self.out_dir / name
        with files.writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            return path.open("ab")

    def close(self) -> None:
        """Close every file the writer holds open (``run`` does it when it ends); each is
        closed even if another fails, and the first failure is raised after."""
        named = (
            *self._files.items(),
            (REJECTS_FILE, self._rejects),
            (PROGRESS_FILE, self._progress),
        )
        failed: BaseException | None = None
        for name, f in named:
            try:
                with files.writing(self.out_dir / name):
                    f.close()  # flushes what is buffered: a full disk can show here
            except Exception as err:
                failed = failed or err
        if failed is not None:
            raise failed

    def __repr__(self) -> str:
        return f"<OutputWriter {self.out_dir} files={sorted(self._files)} {self.checkpoint!r}>"


def reason(kind: str, check: str, status: int | None) -> str:
    """How an item was lost, for counting: e.g. "request_rejected: HTTP 404",
    "invalid_reply: cut_off", "retries_exhausted: HTTP 500"."""
    if check:
        return f"{kind}: {check}"
    return f"{kind}: HTTP {status}" if status is not None else kind


def _failure_line(seed: SeedRow, gen_type: str, failure: Failure) -> bytes:
    entry = {
        "doc_id": seed.doc_id,
        "gen_type": gen_type,
        "seed_line": seed.line_no,
        "stage": failure.stage,
        "item": failure.item,
        "kind": failure.kind,
        "check": failure.check,
        "status": failure.status,
        "attempts": failure.attempts,
        "message": failure.message,
        "body_excerpt": failure.body_excerpt,
        "at": failure.at,
    }
    return orjson.dumps(entry) + b"\n"


def _sync(path: Path, f: IO[bytes]) -> None:
    """Flush ``f`` (the file at ``path``) and fsync it; a full disk is ``OutputWriteError``."""
    with files.writing(path):
        f.flush()
        os.fsync(f.fileno())


def _drain(queue: asyncio.Queue[WriterItem | None]) -> list[WriterItem | None]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
