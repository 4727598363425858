from __future__ import annotations

import asyncio

import pytest

from engine.limits import RequestLimiter
from tests.clock import run_virtual


async def _send(limiter: RequestLimiter, count: int, hold_s: float = 0.0) -> list[float]:
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def one() -> None:
        async with limiter.slot():
            starts.append(loop.time())
            await asyncio.sleep(hold_s)

    await asyncio.gather(*(one() for _ in range(count)))
    return starts


def _busiest_window(starts: list[float], window: float = 60.0) -> int:
    starts = sorted(starts)
    best, lo = 0, 0
    for hi, t in enumerate(starts):
        while starts[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.mark.parametrize("rpm", [30, 120, 600, 6000])
def test_pacing_never_exceeds_cap_in_any_minute_and_reaches_it(rpm: int) -> None:
    limiter = RequestLimiter(requests_per_minute=rpm, max_concurrency=10_000)
    starts = run_virtual(_send(limiter, rpm * 3))
    assert _busiest_window(starts) <= 1.02 * rpm
    achieved_per_minute = len(starts) / (max(starts) / 60.0)
    assert achieved_per_minute >= 0.97 * rpm


def test_start_is_not_a_burst_of_a_whole_minute() -> None:
    limiter = RequestLimiter(requests_per_minute=600, max_concurrency=10_000)
    starts = run_virtual(_send(limiter, 60))
    first_second = [t for t in starts if t < 1.0]
    # At most half a second of quota at once plus the paced rest of that second.
    assert len(first_second) <= 600 / 60 + 5 + 1


def test_concurrency_cap_holds_while_requests_are_in_flight() -> None:
    limiter = RequestLimiter(requests_per_minute=1_000_000, max_concurrency=3)
    peak = 0

    async def scenario() -> None:
        nonlocal peak

        async def one() -> None:
            nonlocal peak
            async with limiter.slot():
                peak = max(peak, limiter.in_flight)
                await asyncio.sleep(1.0)

        await asyncio.gather(*(one() for _ in range(10)))

    run_virtual(scenario())
    assert peak == 3
    assert limiter.in_flight == 0


def test_slot_is_released_when_the_request_fails() -> None:
    limiter = RequestLimiter(requests_per_minute=600, max_concurrency=1)

    async def scenario() -> None:
        with pytest.raises(RuntimeError):
            async with limiter.slot():
                raise RuntimeError("boom")
        async with limiter.slot():
            pass

    run_virtual(scenario())
    assert "in_flight=0/1" in repr(limiter)


def test_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        RequestLimiter(requests_per_minute=0, max_concurrency=1)
