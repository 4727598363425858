"""``engine.budget.PassBudget``: the engine's steps share a time budget per pass of the
event loop; a step past it waits for the next pass, in order, and none is passed over."""

from __future__ import annotations

import asyncio

import pytest

from engine.budget import PassBudget
from tests.support.loop import Passes


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_steps_within_the_budget_never_yield() -> None:
    clock = Clock()
    budget = PassBudget(slice_s=0.010, clock=clock)
    async with Passes() as passes:
        before = passes.count
        for _ in range(100):
            await budget.turn()
            clock.now += 0.00005  # 100 steps of 50 us: 5 ms
        assert passes.count == before
    assert budget.deferred == 0


async def test_steps_past_the_budget_run_in_later_passes_in_order() -> None:
    clock = Clock()
    budget = PassBudget(slice_s=0.010, clock=clock)
    ran: list[tuple[int, int]] = []  # (step, pass it ran in)

    async def step(i: int, passes: Passes) -> None:
        await budget.turn()
        ran.append((i, passes.count))
        clock.now += 0.006  # each step costs 6 ms: two fit in a 10 ms pass

    async with Passes() as passes:
        await asyncio.gather(*(step(i, passes) for i in range(5)))
    order = [i for i, _ in ran]
    assert order == [0, 1, 2, 3, 4]  # deferred steps keep their order
    by_pass = [p for _, p in ran]
    assert by_pass[0] == by_pass[1] < by_pass[2] == by_pass[3] < by_pass[4]
    assert budget.deferred >= 3


async def test_a_step_longer_than_the_budget_delays_only_the_next_one() -> None:
    clock = Clock()
    budget = PassBudget(slice_s=0.010, clock=clock)
    async with Passes() as passes:
        await budget.turn()
        clock.now += 0.050  # one long step
        start = passes.count
        await budget.turn()  # over: waits for the next pass, which has a fresh budget
        assert passes.count == start + 1
        await budget.turn()
        assert passes.count == start + 1


def test_a_budget_left_open_by_an_ended_loop_does_not_hold_back_another() -> None:
    clock = Clock()
    budget = PassBudget(slice_s=0.010, clock=clock)

    async def spend() -> None:
        await budget.turn()
        clock.now += 1.0  # the loop ends before the pass that would reset the budget

    asyncio.run(spend())
    asyncio.run(asyncio.wait_for(budget.turn(), timeout=5))
    assert budget.deferred == 0


@pytest.mark.parametrize("slice_s", [0.0, -1.0])
def test_a_budget_must_be_positive(slice_s: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        PassBudget(slice_s=slice_s)
