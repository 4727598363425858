"""``engine.flows.ask``: a reply of many choices is checked within the pass budget, the event
loop turning once it is spent (without it, dozens of n = 50 replies arriving together held
the loop for one long pass)."""

from __future__ import annotations

import asyncio
import itertools

from engine.budget import PassBudget
from engine.flows.ask import Ask, Asker, Parsed
from engine.flows.structured import Summary
from engine.teacher.protocol import Message
from tests.support.fakes import FakeTeacher


async def test_a_50_choice_reply_lets_the_loop_turn_when_the_budget_is_spent() -> None:
    ticks = itertools.count()  # every look at the clock costs 1 ms: 10 looks a pass
    budget = PassBudget(slice_s=0.0095, clock=lambda: next(ticks) / 1000)
    asker = Asker(FakeTeacher(), mode="json_schema", attempts=1, supports_n=True, budget=budget)
    ask = Ask("x/summary", (Message("user", "Summarise."),), Summary, 0.7, 64)
    turns = 0
    taken_after: list[int] = []  # deferrals so far, when each choice was taken

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    def on_item(slot: int, got: Parsed[Summary]) -> None:
        taken_after.append(budget.deferred)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)  # the counter is waiting for its first turn
    before = turns
    lost = await asker.many(ask, 50, on_item)
    counter.cancel()
    assert lost == []
    per_pass = [taken_after.count(d) for d in sorted(set(taken_after))]
    assert sum(per_pass) == 50
    assert max(per_pass) <= 10  # what one pass's budget covers
    assert len(per_pass) >= 5
    assert turns - before >= len(per_pass) - 1  # the loop ran other tasks in between
