"""``engine.flows.admission``: branches start while slots are free, a bounded number a pass of
the event loop, the rest in order as slots free; a unit waits for its queued branches."""

from __future__ import annotations

import asyncio
import gc

import pytest

from engine.errors import FatalRunError, InvalidReply
from engine.flows.admission import Admission
from engine.flows.ask import Asker
from engine.flows.unit import Unit
from tests.support.fakes import FakeTeacher, make_seed
from tests.support.loop import Passes


def _unit(admission: Admission) -> Unit:
    asker = Asker(FakeTeacher(), "json_schema", attempts=1, supports_n=True)
    return Unit(make_seed(), "document_based_qa", asker, None, admission)


async def test_a_fan_out_beyond_the_limit_waits_and_runs_in_order() -> None:
    admission = Admission(limit=3)
    release = asyncio.Event()
    started: list[int] = []

    async def step(i: int) -> None:
        started.append(i)
        await release.wait()

    async with _unit(admission) as unit:
        for i in range(10):
            unit.spawn("s", f"q{i}", step(i))
        await asyncio.sleep(0)
        assert started == [0, 1, 2]
        assert repr(admission) == "<Admission running=3/3 queued=7>"
        release.set()
    assert started == list(range(10))  # every queued branch ran before the unit ended
    assert (admission.running, admission.queued, admission.peak_queued) == (0, 0, 7)


async def test_a_50_way_fan_out_starts_a_bounded_number_of_branches_a_loop_turn() -> None:
    """A reply that spawns 50 branches does not start them all in one pass of the loop: the
    loop turns (here counted by a task that records each turn) between the batches."""
    admission = Admission(limit=1000, per_pass=8)
    started_at_turn: list[int] = []

    async with Passes() as passes:

        async def step() -> None:
            started_at_turn.append(passes.count)

        async with _unit(admission) as unit:
            for i in range(50):
                unit.spawn("s", f"q{i}", step())
    per_turn = [started_at_turn.count(t) for t in sorted(set(started_at_turn))]
    assert len(started_at_turn) == 50
    assert max(per_turn) <= 8
    assert len(per_turn) >= 7  # 50 branches, 8 a turn


async def test_an_item_error_loses_one_branch_and_frees_its_slot() -> None:
    admission = Admission(limit=1)
    ran: list[str] = []

    async def bad() -> None:
        raise InvalidReply("junk", check="schema")

    async def good() -> None:
        ran.append("good")

    async with _unit(admission) as unit:
        unit.spawn("s", "bad", bad())
        unit.spawn("s", "good", good())
    assert ran == ["good"]
    assert [f.item for f in unit.result().failures] == ["bad"]
    assert admission.running == 0


async def test_a_fatal_error_drops_the_units_queued_branches_unawaited_and_closed() -> None:
    admission = Admission(limit=1)
    started: list[int] = []

    async def fatal() -> None:
        await asyncio.sleep(0)
        raise FatalRunError("disk full")

    async def step(i: int) -> None:
        started.append(i)

    with pytest.raises(FatalRunError):
        async with _unit(admission) as unit:
            unit.spawn("s", "fatal", fatal())
            for i in range(5):
                unit.spawn("s", f"q{i}", step(i))  # queued behind the fatal branch
    gc.collect()  # a coroutine never awaited would warn (an error under the test suite)
    assert started == []
    assert (admission.running, admission.queued) == (0, 0)


async def test_queued_branches_of_other_units_go_on_when_one_unit_fails() -> None:
    admission = Admission(limit=1)
    release = asyncio.Event()
    ran: list[str] = []

    async def hold() -> None:
        await release.wait()

    async def fatal() -> None:
        raise FatalRunError("disk full")

    async def other() -> None:
        ran.append("other")

    async def failing() -> None:
        async with _unit(admission) as unit:
            unit.spawn("s", "hold", hold())
            unit.spawn("s", "fatal", fatal())  # queued: starts when hold ends

    async def healthy() -> None:
        async with _unit(admission) as unit:
            unit.spawn("s", "other", other())  # queued behind both

    both = asyncio.gather(failing(), healthy(), return_exceptions=True)
    await asyncio.sleep(0)
    release.set()
    outcomes = await both
    assert isinstance(outcomes[0], FatalRunError)
    assert outcomes[1] is None
    assert ran == ["other"]


def test_the_limit_leaves_the_limiter_work_to_hand_out() -> None:
    assert Admission.for_concurrency(128).limit == 512
    assert Admission.for_concurrency(1).limit == 64
    with pytest.raises(ValueError, match="at least 1"):
        Admission(0)


class Steps:
    """Branch steps that record that they started, then wait for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[str] = []

    async def step(self, name: str) -> None:
        self.started.append(name)
        await self.release.wait()


async def test_a_free_slot_goes_to_the_oldest_unit_with_a_branch_waiting() -> None:
    admission = Admission(limit=1)
    steps = Steps()
    older, newer = _unit(admission), _unit(admission)
    async with older, newer:
        older.spawn("s", "hold", steps.step("older-0"))  # takes the only slot
        newer.spawn("s", "n1", steps.step("newer-1"))  # queued first
        newer.spawn("s", "n2", steps.step("newer-2"))
        older.spawn("s", "o1", steps.step("older-1"))  # queued last, but its unit is older
        await asyncio.sleep(0)
        steps.release.set()
    assert steps.started == ["older-0", "older-1", "newer-1", "newer-2"]
    assert (admission.running, admission.queued) == (0, 0)


async def test_a_dropped_unit_leaves_the_others_branches_in_order() -> None:
    admission = Admission(limit=1)
    steps = Steps()
    first, second = _unit(admission), _unit(admission)
    async with second, first:
        first.spawn("s", "hold", steps.step("first-0"))
        first.spawn("s", "f1", steps.step("first-1"))
        second.spawn("s", "s1", steps.step("second-1"))
        second.spawn("s", "s2", steps.step("second-2"))
        assert admission.drop(first) == 1  # its queued branch is closed, never run
        await asyncio.sleep(0)
        steps.release.set()
    gc.collect()
    assert steps.started == ["first-0", "second-1", "second-2"]
    assert (admission.running, admission.queued) == (0, 0)


async def test_room_waits_while_every_slot_is_taken_or_queued_for() -> None:
    admission = Admission(limit=2)
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    let_through: list[int] = []

    async def opener(i: int) -> None:
        await admission.room()
        let_through.append(i)

    async with _unit(admission) as unit:
        unit.spawn("s", "a", hold())
        unit.spawn("s", "b", hold())
        unit.spawn("s", "c", hold())  # queued: both slots are taken
        openers = [asyncio.create_task(opener(i)) for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert let_through == []  # 2 running + 1 queued >= 2 slots
        release.set()
    await asyncio.gather(*openers)
    assert let_through == [0, 1, 2]  # in the order they asked


async def test_room_lets_a_few_units_through_a_pass() -> None:
    admission = Admission(limit=1000, units_per_pass=3)
    through_at: list[int] = []

    async with Passes() as passes:

        async def opener() -> None:
            await admission.room()
            through_at.append(passes.count)

        await asyncio.gather(*(opener() for _ in range(10)))
    per_pass = [through_at.count(p) for p in sorted(set(through_at))]
    assert sum(per_pass) == 10
    assert max(per_pass) <= 3
    assert len(per_pass) >= 4


async def test_a_cancelled_room_call_is_passed_over() -> None:
    admission = Admission(limit=1)
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    async with _unit(admission) as unit:
        unit.spawn("s", "a", hold())
        gone = asyncio.create_task(admission.room())
        kept = asyncio.create_task(admission.room())
        await asyncio.sleep(0)
        gone.cancel()
        release.set()
    await kept
    assert gone.cancelled()
