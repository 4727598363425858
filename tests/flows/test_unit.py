"""``engine.flows.unit.Unit``: branches spawned while the unit is stopped by a fatal error."""

from __future__ import annotations

import asyncio
import gc

import pytest

from engine.errors import FatalRunError
from engine.flows.ask import Asker
from engine.flows.unit import Unit
from tests.support.fakes import FakeTeacher, make_seed


async def test_branches_cancelled_before_they_start_leave_no_coroutine_unawaited() -> None:
    """A fatal error in one branch cancels the others; those spawned in the same step never
    ran, and their steps must be closed, not left to warn "never awaited" (an error under
    the test suite's warnings-as-errors, noise in a user's log)."""
    asker = Asker(FakeTeacher(), "json_schema", attempts=1, supports_n=True)
    started: list[int] = []

    async def step(i: int) -> None:
        started.append(i)
        await asyncio.sleep(1)

    async def fatal() -> None:
        raise FatalRunError("disk full")

    with pytest.raises(FatalRunError):
        async with Unit(make_seed(), "document_based_qa", asker, None) as unit:
            unit.spawn("s", "fatal", fatal())
            await asyncio.sleep(0)  # the fatal branch runs and cancels the unit's group
            for i in range(5):
                unit.spawn("s", f"q{i}", step(i))  # created, cancelled before they start
    gc.collect()  # a coroutine never awaited warns when collected
    assert started == []
