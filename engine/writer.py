"""The single writer task: the only code that touches the output files.

Workers hand it finished units; it appends each unit's records in one piece, then, once a
batch of units is fsynced, records their progress. Group commit keeps the fsync count low
when units finish faster than a disk syncs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson

from engine.checkpoint import (
    FAILURES_FILE,
    PROGRESS_FILE,
    REJECTS_FILE,
    Checkpoint,
    gen_name,
    record_ids,
)
from engine.flows.base import Failure, UnitResult
from engine.seeds import Reject, SeedRow
from engine.stats import Stats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UnitDone:
    seed: SeedRow
    gen_type: str
    result: UnitResult


WriterItem = UnitDone | Reject


class OutputWriter:
    """Owns ``<out_dir>``: gen files per type, failures, rejects and progress."""

    def __init__(
        self,
        out_dir: Path,
        gen_types: Sequence[str],
        checkpoint: Checkpoint,
        stats: Stats,
        retrying: AbstractSet[tuple[str, str]] = frozenset(),
    ) -> None:
        """``retrying``: done units that are run again for their failed items; only their
        records not yet written are added, and their old failure lines are dropped."""
        self.out_dir = out_dir
        self.checkpoint = checkpoint
        self.stats = stats
        self._files: dict[str, IO[bytes]] = {}
        self._progress = self._open(PROGRESS_FILE)
        self._written_ids = record_ids(out_dir, set(retrying)) if retrying else set()
        if retrying:
            self._drop_failures_of(retrying)
        for gen_type in gen_types:  # every type gets its file, even if no unit succeeds
            self._append(gen_name(gen_type), ())
        # Rejects are recomputed from the seeds on every run, so the file starts afresh.
        self._rejects = (out_dir / REJECTS_FILE).open("wb")

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
            items = [item for item in _drain(queue) if item is not None]
            self._sync_and_record(b"".join(self._write(item) for item in items))
            raise
        finally:
            self.close()

    async def _commit(self, items: list[WriterItem]) -> None:
        progress = b"".join(self._write(item) for item in items)
        sync = asyncio.ensure_future(asyncio.to_thread(self._sync_and_record, progress))
        try:
            await asyncio.shield(sync)
        except asyncio.CancelledError:
            # The records are written: let their progress line follow before stopping, or
            # a resume would cut them off and redo the work.
            await sync
            raise

    def _write(self, item: WriterItem) -> bytes:
        """Append one item's lines; return its progress line (empty for rejects)."""
        if isinstance(item, Reject):
            self._rejects.write(orjson.dumps(item.record()) + b"\n")
            self.stats.rejects += 1
            return b""
        result = item.result
        records = [r for r in result.records if r["id"] not in self._written_ids]
        self._append(gen_name(item.gen_type), (orjson.dumps(rec) + b"\n" for rec in records))
        if result.failures:
            lines = (_failure_line(item.seed, item.gen_type, f) for f in result.failures)
            self._append(FAILURES_FILE, lines)
        self.stats.unit_written(
            item.gen_type, len(records), result.judged_out, (f.kind for f in result.failures)
        )
        self.stats.kept_records(item.gen_type, records)
        return self.checkpoint.progress_line(
            item.seed.doc_id, item.gen_type, len(records), len(result.failures)
        )

    def _append(self, name: str, lines: Iterable[bytes]) -> None:
        f = self._files.get(name) or self._open(name)
        self._files[name] = f
        for line in lines:
            f.write(line)
        self.checkpoint.lengths[name] = f.tell()

    def _sync_and_record(self, progress: bytes) -> None:
        for f in (*self._files.values(), self._rejects):
            f.flush()
            os.fsync(f.fileno())
        if progress:
            self._progress.write(progress)
            self._progress.flush()
            os.fsync(self._progress.fileno())

    def _drop_failures_of(self, units: AbstractSet[tuple[str, str]]) -> None:
        """Rewrite failures.jsonl without the lines of ``units`` (atomically), and record its
        new length before anything is appended to it."""
        path = self.out_dir / FAILURES_FILE
        if not path.exists():
            return
        tmp = path.with_suffix(".tmp")
        with path.open("rb") as old, tmp.open("wb") as new:
            for line in old:
                entry = orjson.loads(line)
                if (entry["doc_id"], entry["gen_type"]) not in units:
                    new.write(line)
            new.flush()
            os.fsync(new.fileno())
            self.checkpoint.lengths[FAILURES_FILE] = new.tell()
        os.replace(tmp, path)
        self._progress.write(self.checkpoint.lengths_line())
        self._progress.flush()
        os.fsync(self._progress.fileno())

    def _open(self, name: str) -> IO[bytes]:
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("ab")

    def close(self) -> None:
        for f in (*self._files.values(), self._rejects, self._progress):
            f.close()

    def __repr__(self) -> str:
        return f"<OutputWriter {self.out_dir} files={sorted(self._files)} {self.checkpoint!r}>"


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


def _drain(queue: asyncio.Queue[WriterItem | None]) -> list[WriterItem | None]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
