"""The driver's dispatch of units to workers (engine.distributed.dispatch), with fake workers:
which worker gets a unit, what happens to the units of a worker that is lost, and when the
run stops."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from engine.distributed.dispatch import RemoteFatal, RemoteUnits, WorkerLost
from engine.distributed.worker import Tally, UnitReply, WorkerInfo
from engine.errors import FatalRunError
from engine.output.records import UnitResult
from engine.pipeline.stats import Stats
from engine.seeds import SeedRow


def _seed(doc: str) -> SeedRow:
    return SeedRow(doc, 1, "text", "outline", "domain", "icl", "q1", "q2", "q3")


class FakeWorker:
    """A worker that answers after ``release`` is set; ``die()`` loses every unit in flight."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.release = asyncio.Event()
        self.release.set()
        self.up = asyncio.Event()
        self.up.set()
        self.ran: list[str] = []
        self.in_flight: set[asyncio.Future[None]] = set()
        self.ready_error: BaseException | None = None

    async def ready(self) -> WorkerInfo:
        if self.ready_error is not None:
            raise self.ready_error
        await self.up.wait()
        return WorkerInfo(self.index, f"host{self.index}", 100 + self.index, f"node{self.index}")

    async def run_unit(self, seed: SeedRow, gen_type: str) -> UnitReply:
        if not self.up.is_set():
            raise WorkerLost("restarting")
        lost = asyncio.get_running_loop().create_future()
        self.in_flight.add(lost)
        try:
            waiter = asyncio.ensure_future(self.release.wait())
            done, _ = await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
            if lost in done:
                waiter.cancel()
                raise WorkerLost("actor died")
        finally:
            self.in_flight.discard(lost)
        self.ran.append(seed.doc_id)
        return UnitReply(UnitResult([], [], 0), Tally(requests_sent=3), "", 1, 4)

    def die(self) -> None:
        self.up.clear()
        for lost in self.in_flight:
            lost.set_result(None)


async def _settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_units_go_to_the_least_busy_live_worker_and_tallies_add_up() -> None:
    workers = [FakeWorker(0), FakeWorker(1)]
    for w in workers:
        w.release.clear()
    stats = Stats()
    async with RemoteUnits(workers, stats, lost_max_s=5) as units:
        await _settled()
        [flow] = units.flows(["key_facts_to_qa"])
        runs = [asyncio.ensure_future(flow.run(_seed(f"d{i}"))) for i in range(4)]
        await _settled()
        assert [len(w.in_flight) for w in workers] == [2, 2]
        for w in workers:
            w.release.set()
        await asyncio.gather(*runs)
    assert stats.teacher.requests_sent == 12
    assert sorted(workers[0].ran + workers[1].ran) == ["d0", "d1", "d2", "d3"]
    assert [w["units"] for w in units.summary()["workers"]] == [2, 2]


async def test_a_lost_workers_units_run_again_on_another_and_each_result_comes_once() -> None:
    a, b = FakeWorker(0), FakeWorker(1)
    a.release.clear()
    b.release.clear()
    async with RemoteUnits([a, b], Stats(), lost_max_s=5) as units:
        await _settled()
        [flow] = units.flows(["document_based_qa"])
        runs = [asyncio.ensure_future(flow.run(_seed(f"d{i}"))) for i in range(4)]
        await _settled()
        a.die()
        await _settled()
        assert len(b.in_flight) == 4  # a's two came back and went to b
        b.release.set()
        results = await asyncio.gather(*runs)
        assert len(results) == 4
        assert units.rerun == Counter({"document_based_qa": 2})
        # Ray restarts it: it takes units again.
        a.release.set()
        a.up.set()
        await _settled()
        await flow.run(_seed("d9"))
        assert a.ran == ["d9"]
    assert sorted(b.ran) == ["d0", "d1", "d2", "d3"]
    assert units.summary()["workers"][0]["lost"] == 1


async def test_no_worker_alive_for_too_long_stops_the_run() -> None:
    a = FakeWorker(0)
    a.up.clear()
    async with RemoteUnits([a], Stats(), lost_max_s=0.05) as units:
        [flow] = units.flows(["key_facts_to_qa"])
        with pytest.raises(FatalRunError, match=r"no Ray worker has been alive for 0\.05 s"):
            await flow.run(_seed("d0"))


async def test_a_worker_that_cannot_work_stops_the_run_with_its_reason() -> None:
    a, b = FakeWorker(0), FakeWorker(1)
    b.ready_error = FatalRunError("worker 1 on host1: TEACHER_MODEL_API_KEY is not set")
    async with RemoteUnits([a, b], Stats(), lost_max_s=5) as units:
        await _settled()
        [flow] = units.flows(["key_facts_to_qa"])
        with pytest.raises(FatalRunError, match="TEACHER_MODEL_API_KEY is not set"):
            await flow.run(_seed("d0"))


async def test_a_fatal_reply_stops_the_run_and_still_counts_its_requests() -> None:
    class Fatal(FakeWorker):
        async def run_unit(self, seed: SeedRow, gen_type: str) -> UnitReply:
            return UnitReply(None, Tally(requests_sent=5), "teacher rejected the key (HTTP 401)")

    stats = Stats()
    async with RemoteUnits([Fatal(0)], stats, lost_max_s=5) as units:
        await _settled()
        [flow] = units.flows(["key_facts_to_qa"])
        with pytest.raises(RemoteFatal, match="HTTP 401"):
            await flow.run(_seed("d0"))
    assert stats.teacher.requests_sent == 5


async def test_in_flight_and_concurrency_read_the_live_workers_last_replies() -> None:
    a, b = FakeWorker(0), FakeWorker(1)
    async with RemoteUnits([a, b], Stats(), lost_max_s=5) as units:
        await _settled()
        [flow] = units.flows(["key_facts_to_qa"])
        await asyncio.gather(flow.run(_seed("d0")), flow.run(_seed("d1")))
        assert (units.in_flight, units.concurrency) == (2, 8)
        assert repr(units) == "<RemoteUnits workers=2/2 units_in_flight=0>"
