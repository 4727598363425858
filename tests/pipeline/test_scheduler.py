from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import AuthError
from engine.output.checkpoint import Checkpoint, load_checkpoint
from engine.output.records import UnitResult, make_record
from engine.output.writer import OutputWriter
from engine.pipeline.scheduler import Scheduler
from engine.pipeline.stats import Stats
from engine.seeds import Reject, SeedRow
from tests.support.fakes import seed
from tests.support.runs import lines


class EchoFlow:
    """One record per unit; documents named in ``hold`` wait until their event is set."""

    def __init__(self, gen_type: str, hold: dict[str, asyncio.Event] | None = None) -> None:
        self.gen_type = gen_type
        self.hold = hold or {}
        self.started: list[str] = []
        self.finished: list[str] = []
        self.changed = asyncio.Event()

    async def run(self, row: SeedRow) -> UnitResult:
        self.started.append(row.document)
        if row.document in self.hold:
            await self.hold[row.document].wait()
        self.finished.append(row.document)
        self.changed.set()
        record = make_record(
            row,
            self.gen_type,
            ("q00",),
            document=row.document,
            question="Q?",
            response="A",
            model="m",
        )
        return UnitResult(records=[record])


class FatalFlow(EchoFlow):
    async def run(self, row: SeedRow) -> UnitResult:
        if row.document == "doc 2":
            raise AuthError("http://teacher/v1", 401)
        return await super().run(row)


def make_scheduler(out: Path, flows: list[EchoFlow], workers: int = 2) -> Scheduler:
    stats = Stats()
    checkpoint = load_checkpoint(out)
    writer = OutputWriter(out, [f.gen_type for f in flows], checkpoint, stats)
    return Scheduler(flows, writer, checkpoint, stats, workers=workers)


async def test_every_unit_runs_once_and_rejects_reach_the_writer(tmp_path: Path) -> None:
    flows = [EchoFlow("extractive_summary"), EchoFlow("document_based_qa")]
    seeds = [seed("doc 1", 1), Reject(2, "blank line", ""), seed("doc 3", 3)]
    scheduler = make_scheduler(tmp_path, flows)
    await scheduler.run(seeds)
    for flow in flows:
        assert sorted(flow.started) == ["doc 1", "doc 3"]
        assert len(lines(tmp_path / flow.gen_type / "gen.jsonl")) == 2
    assert scheduler.stats.rejects == 1
    assert sum(scheduler.stats.units_done.values()) == 4


async def test_finished_units_are_skipped_on_resume(tmp_path: Path) -> None:
    await make_scheduler(tmp_path, [EchoFlow("extractive_summary")]).run([seed("doc 1")])
    again = EchoFlow("extractive_summary")
    scheduler = make_scheduler(tmp_path, [again])
    await scheduler.run([seed("doc 1"), seed("doc 2", 2)])
    assert again.started == ["doc 2"]
    assert scheduler.stats.units_skipped == {"extractive_summary": 1}
    assert len(lines(tmp_path / "extractive_summary/gen.jsonl")) == 2


async def test_a_slow_unit_does_not_hold_up_the_others(tmp_path: Path) -> None:
    release = asyncio.Event()
    flow = EchoFlow("extractive_summary", hold={"doc 1": release})
    scheduler = make_scheduler(tmp_path, [flow], workers=2)
    run = asyncio.create_task(scheduler.run([seed(f"doc {i}", i) for i in range(1, 6)]))
    while len(flow.finished) < 4:
        flow.changed.clear()
        await flow.changed.wait()
    assert sorted(flow.finished) == ["doc 2", "doc 3", "doc 4", "doc 5"]
    assert not run.done()  # doc 1 still pending while docs 2..5 went through the other worker
    release.set()
    await run
    assert scheduler.stats.units_done["extractive_summary"] == 5


async def test_a_fatal_error_stops_the_run_and_keeps_finished_units(tmp_path: Path) -> None:
    scheduler = make_scheduler(tmp_path, [FatalFlow("extractive_summary")], workers=1)
    with pytest.raises(ExceptionGroup) as caught:
        await scheduler.run([seed("doc 1", 1), seed("doc 2", 2), seed("doc 3", 3)])
    assert caught.group_contains(AuthError)
    assert len(lines(tmp_path / "extractive_summary/gen.jsonl")) == 1
    assert not (tmp_path / "failures.jsonl").exists()  # nothing marked failed


async def test_the_producer_lets_the_loop_run_while_it_skips_done_rows(tmp_path: Path) -> None:
    """Skipping is reading and asking the state, microseconds a row: the producer does it off
    the loop, a batch at a time, so a resume over many done rows never stalls the loop."""
    done = [seed(f"doc {i}", i) for i in range(1, 3001)]
    checkpoint = Checkpoint()
    for row in done:
        checkpoint.done.add_logged(row.doc_id, "extractive_summary")
    flow = EchoFlow("extractive_summary")
    stats = Stats()
    writer = OutputWriter(tmp_path, [flow.gen_type], checkpoint, stats)
    scheduler = Scheduler([flow], writer, checkpoint, stats, workers=2)
    seen: list[int] = []

    async def tick() -> None:
        while True:
            seen.append(stats.units_skipped["extractive_summary"])
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await scheduler.run([*done, seed("doc new", 3001)])
    ticker.cancel()
    assert flow.started == ["doc new"]
    assert stats.units_skipped["extractive_summary"] == 3000
    assert any(0 < skipped < 3000 for skipped in seen)  # the loop ran in the middle


async def test_a_worker_waits_for_ready_before_it_takes_a_unit(tmp_path: Path) -> None:
    """``ready`` (the flows' admission control in a run) holds new units back while the
    units in flight keep every slot busy; the units already started go on."""
    gate = asyncio.Semaphore(0)
    flow = EchoFlow("extractive_summary")
    stats = Stats()
    checkpoint = load_checkpoint(tmp_path)
    writer = OutputWriter(tmp_path, [flow.gen_type], checkpoint, stats)
    scheduler = Scheduler([flow], writer, checkpoint, stats, workers=4, ready=gate.acquire)
    run = asyncio.create_task(scheduler.run([seed(f"doc {i}", i) for i in range(1, 4)]))
    for _ in range(20):
        await asyncio.sleep(0)
    assert flow.started == []
    gate.release()  # room for one unit
    while not flow.finished:
        flow.changed.clear()
        await flow.changed.wait()
    assert flow.started == ["doc 1"]
    for _ in range(6):  # the rest, and one for each worker to see the end of the seeds
        gate.release()
    await run
    assert flow.started == ["doc 1", "doc 2", "doc 3"]


async def test_a_stop_after_the_last_unit_was_handed_out_ends_with_the_units_in_flight(
    tmp_path: Path,
) -> None:
    """The workers' end-of-seeds markers are already queued when the stop comes: dropping
    them with the queued units left the workers waiting for a unit until the grace period
    ran out (a late Ctrl-C waited ``run.grace_s`` with every unit done)."""
    release = asyncio.Event()
    flow = EchoFlow("extractive_summary", hold={"doc 1": release, "doc 2": release})
    scheduler = make_scheduler(tmp_path, [flow], workers=2)
    read_all = threading.Event()

    def seeds() -> Iterator[SeedRow]:
        yield seed("doc 1", 1)
        yield seed("doc 2", 2)
        read_all.set()  # the producer's reading thread is at the end of the seeds

    run = asyncio.create_task(scheduler.run(seeds()))
    assert await asyncio.to_thread(read_all.wait, 5)
    for _ in range(20):  # the producer queues the workers' end markers
        await asyncio.sleep(0)
    assert sorted(flow.started) == ["doc 1", "doc 2"]
    scheduler.stop()
    release.set()
    await asyncio.wait_for(run, timeout=5)  # a guard: without the fix it never ends
    assert scheduler.stats.units_done["extractive_summary"] == 2
