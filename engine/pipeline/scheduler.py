"""The pipeline: one producer, a pool of unit workers and one writer, joined by bounded queues.

The producer streams seed rows and turns each into (document, type) units; workers run a unit's
flow to the end (its stages advance branch by branch, never waiting for other units); the
writer appends each finished unit. Bounded queues are the back-pressure: memory holds at most
a few units per worker, whatever the corpus size.

The producer reads and sorts the rows in a thread, a batch at a time (parsing a row and asking
the resume state whether its units are done take microseconds each, and a resume may skip
millions): the event loop gets control back between batches, so signals, progress and
replies never wait behind the skipping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Protocol

from engine.output.checkpoint import Checkpoint, UnitSet
from engine.output.records import UnitResult
from engine.output.writer import OutputWriter, UnitDone, WriterItem
from engine.pipeline.resume import ResumePoint
from engine.pipeline.stats import Stats
from engine.seeds import Reject, SeedRow

log = logging.getLogger(__name__)


class UnitRunner(Protocol):
    """How one type's units are run: by its flow in this process (``engine.flows.Flow``), or
    by workers elsewhere (``engine.distributed.RemoteFlow``)."""

    gen_type: str

    async def run(self, seed: SeedRow) -> UnitResult:
        """The unit (``seed``, ``gen_type``) run to its end (``Flow.run``)."""
        ...


# Awaited before a worker takes another unit (``Admission.room``).
Ready = Callable[[], Awaitable[None]]
# A unit waiting for a worker: its seed row and the runner of its type.
QueuedUnit = tuple[SeedRow, UnitRunner]
# (document id, type) pairs.
Units = AbstractSet[tuple[str, str]] | UnitSet
# A row read and sorted off the loop: the row (or reject) and the runners of its wanted units.
Sorted = tuple[SeedRow | Reject, list[UnitRunner]]
# A batch of rows ends after this many rows or this much time in the reading thread.
BATCH_ROWS = 256
BATCH_S = 0.005


def wanted(checkpoint: Checkpoint, only: Units | None, redo: Units, unit: tuple[str, str]) -> bool:
    """Whether a run works on ``unit``: with ``only`` (``--retry-failed``), just those units;
    else every unit not done, and the done ones in ``redo`` (they lost items)."""
    if only is not None:
        return unit in only
    return unit not in checkpoint.done or unit in redo


def any_wanted(
    seeds: Iterable[SeedRow | Reject], gen_types: Sequence[str], want: Callable[[str, str], bool]
) -> bool:
    """Whether any unit of ``seeds`` is wanted; reads only up to the first one."""
    return any(
        want(item.doc_id, gen_type)
        for item in seeds
        if isinstance(item, SeedRow)
        for gen_type in gen_types
    )


class Scheduler:
    """Runs every unit that the checkpoint does not already hold."""

    def __init__(
        self,
        flows: Sequence[UnitRunner],
        writer: OutputWriter,
        checkpoint: Checkpoint,
        stats: Stats,
        workers: int,
        only: Units | None = None,
        redo: Units = frozenset(),
        resume: ResumePoint | None = None,
        ready: Ready | None = None,
    ) -> None:
        """``flows``: a runner per type (its flow, or a remote one). ``only``: run just
        these units (``--retry-failed``), whether done or not;
        ``redo``: also run these units although they are done (they lost items);
        ``resume``: where the seeds given to ``run`` start (``engine.pipeline.resume``): the
        rows before it are counted as skipped, and the writer's watermark tracks the rest;
        ``ready``: awaited before a worker takes another unit (``Admission.room``: it
        waits while the units in flight keep every request slot busy)."""
        self.only = only
        self.redo = redo
        self.resume = resume
        self.ready = ready
        self.flows = flows
        self.writer = writer
        self.checkpoint = checkpoint
        self.stats = stats
        self.workers = workers
        self.active = 0
        self.stopping = False
        self._units: asyncio.Queue[QueuedUnit | None] = asyncio.Queue(maxsize=workers)

    def stop(self) -> None:
        """Take no new units; the ones in flight go on. Units already queued are dropped (they
        are not done, so a resume runs them); the workers' end markers queued after them stay,
        or a worker would wait for a unit until the grace period ran out."""
        self.stopping = True
        markers = 0
        while not self._units.empty():
            if self._units.get_nowait() is None:
                markers += 1
        for _ in range(markers):
            self._units.put_nowait(None)

    async def run(self, seeds: Iterable[SeedRow | Reject]) -> None:
        """Process ``seeds`` to the end. Cancelled, the writer still commits finished units."""
        units = self._units
        results: asyncio.Queue[WriterItem | None] = asyncio.Queue(maxsize=self.workers)
        if self.resume is not None:  # rows before it are done: counted, not read
            self.stats.rejects += self.resume.mark.rejects
            for flow in self.flows:
                self.stats.units_skipped[flow.gen_type] += self.resume.rows_skipped
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.writer.run(results), name="writer")
            pool = [
                tg.create_task(self._work(units, results), name=f"worker-{i}")
                for i in range(self.workers)
            ]
            await self._produce(seeds, units, results)
            for _ in pool:
                await units.put(None)
            # wait, not gather: a worker's error is the task group's to raise, once (gather
            # would raise the same error again from here).
            await asyncio.wait(pool)
            await results.put(None)

    async def _produce(
        self,
        seeds: Iterable[SeedRow | Reject],
        units: asyncio.Queue[QueuedUnit | None],
        results: asyncio.Queue[WriterItem | None],
    ) -> None:
        rows = iter(seeds)
        while not self.stopping:
            batch = await asyncio.to_thread(self._read, rows)
            if not batch:
                return
            for item, flows in batch:
                if self.stopping:
                    return
                self._track(item, len(flows))
                if isinstance(item, Reject):
                    log.warning("seed line %d rejected: %s", item.line_no, item.reason)
                    await results.put(item)
                    continue
                for flow in self.flows:
                    if flow in flows:
                        await units.put((item, flow))
                    else:
                        self.stats.units_skipped[flow.gen_type] += 1

    def _read(self, rows: Iterator[SeedRow | Reject]) -> list[Sorted]:
        """The next rows with the flows this run works on for each; in a thread (it parses
        rows and queries the resume state). Empty at the end of the seeds."""
        batch: list[Sorted] = []
        deadline = time.monotonic() + BATCH_S
        for item in rows:
            if isinstance(item, Reject):
                batch.append((item, []))
            else:
                wanted = [f for f in self.flows if self.wanted(item.doc_id, f.gen_type)]
                batch.append((item, wanted))
            if len(batch) >= BATCH_ROWS or time.monotonic() >= deadline:
                break
        return batch

    def _track(self, item: SeedRow | Reject, units: int) -> None:
        """Tell the writer's watermark about a row read after the resume point."""
        tracker = self.writer.tracker
        start = self.resume.mark.line_no if self.resume is not None else 1
        if tracker is None or item.end < 0 or item.line_no < start:
            return
        if isinstance(item, Reject):
            tracker.row(item.line_no, item.end, 1, valid=False)
        else:
            tracker.row(item.line_no, item.end, units, valid=True)

    def wanted(self, doc_id: str, gen_type: str) -> bool:
        """Whether this run works on the unit (also asked by the progress count)."""
        return wanted(self.checkpoint, self.only, self.redo, (doc_id, gen_type))

    async def _work(
        self, units: asyncio.Queue[QueuedUnit | None], results: asyncio.Queue[WriterItem | None]
    ) -> None:
        while True:
            if self.ready is not None:
                await self.ready()
            if (unit := await units.get()) is None:
                return
            if self.stopping:
                continue
            seed, flow = unit
            self.active += 1
            try:
                result = await flow.run(seed)
            finally:
                self.active -= 1
            await results.put(UnitDone(seed, flow.gen_type, result))

    def __repr__(self) -> str:
        return f"<Scheduler workers={self.workers} active={self.active} {self.stats!r}>"
