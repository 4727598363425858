"""``engine.flows.ask``: a reply of many choices is checked in chunks, the event loop turning
between them (without it, dozens of n = 50 replies arriving together held the loop for one
long pass)."""

from __future__ import annotations

import asyncio

from engine.flows.ask import CHOICES_PER_TURN, Ask, Asker, Parsed
from engine.flows.structured import Summary
from engine.teacher.protocol import Message
from tests.support.fakes import FakeTeacher


async def test_a_50_choice_reply_lets_the_loop_turn_between_chunks() -> None:
    asker = Asker(FakeTeacher(), mode="json_schema", attempts=1, supports_n=True)
    ask = Ask("x/summary", (Message("user", "Summarise."),), Summary, 0.7, 64)
    turns = 0
    taken_at_turn: list[int] = []

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    def on_item(slot: int, got: Parsed[Summary]) -> None:
        taken_at_turn.append(turns)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)  # the counter is waiting for its first turn
    lost = await asker.many(ask, 50, on_item)
    counter.cancel()
    assert lost == []
    per_turn = [taken_at_turn.count(t) for t in sorted(set(taken_at_turn))]
    assert sum(per_turn) == 50
    assert max(per_turn) == CHOICES_PER_TURN
    assert len(per_turn) == 50 // CHOICES_PER_TURN
