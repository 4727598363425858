from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from engine.teacher.limits import AdaptiveConcurrency, Lease, RequestLimiter
from tests.support.clock import run_virtual


async def _send(limiter: RequestLimiter, count: int, hold_s: float = 0.0) -> list[float]:
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def one() -> None:
        async with limiter.slot():
            starts.append(loop.time())
            await asyncio.sleep(hold_s)

    await asyncio.gather(*(one() for _ in range(count)))
    return starts


def _busiest_minute(sent: list[tuple[float, int]], window: float = 60.0) -> int:
    """The most weight (requests, tokens) any ``window`` of (time, weight) pairs holds."""
    sent = sorted(sent)
    best, lo, total = 0, 0, 0
    for t, n in sent:
        total += n
        while sent[lo][0] <= t - window:
            total -= sent[lo][1]
            lo += 1
        best = max(best, total)
    return best


@pytest.mark.parametrize("rpm", [30, 120, 600, 6000])
def test_pacing_never_exceeds_cap_in_any_minute_and_reaches_it(rpm: int) -> None:
    limiter = RequestLimiter(requests_per_minute=rpm, max_concurrency=10_000)
    starts = run_virtual(_send(limiter, rpm * 3))
    assert _busiest_minute([(t, 1) for t in starts]) <= 1.02 * rpm
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


# --- tokens per minute ------------------------------------------------------------------


async def _send_tokens(
    limiter: RequestLimiter, sizes: list[int], used: list[int] | None = None
) -> list[tuple[float, int]]:
    """Each request reserves sizes[i]; its reply reports used[i] (default: the same)."""
    loop = asyncio.get_running_loop()
    sent: list[tuple[float, int]] = []

    async def one(i: int) -> None:
        async with limiter.slot(sizes[i]) as lease:
            actual = sizes[i] if used is None else used[i]
            sent.append((loop.time(), actual))
            await asyncio.sleep(0.5)
        lease.answered(actual)

    await asyncio.gather(*(one(i) for i in range(len(sizes))))
    return sent


@pytest.mark.parametrize("tpm", [200_000, 2_000_000])
def test_token_pacing_never_exceeds_cap_in_any_minute_and_reaches_it(tpm: int) -> None:
    limiter = RequestLimiter(1_000_000, 10_000, tokens_per_minute=tpm)
    sizes = [300 + (i * 7919) % 1700 for i in range(3 * tpm // 1000)]  # 300..2000, mixed
    sent = run_virtual(_send_tokens(limiter, sizes))
    assert _busiest_minute(sent) <= 1.02 * tpm
    last = max(t for t, _ in sent)
    spent_before_last = sum(n for t, n in sent if t < last)
    assert spent_before_last / (last / 60.0) >= 0.97 * tpm


def test_with_requests_large_against_the_cap_a_minute_holds_at_most_one_more() -> None:
    # A request is paid for before it goes, so a minute can hold, beyond the cap, the
    # requests paid for just before it began: at most one bucket and one request more.
    tpm = 10_000
    limiter = RequestLimiter(1_000_000, 10_000, tokens_per_minute=tpm)
    sizes = [300 + (i * 7919) % 1700 for i in range(30)]
    sent = run_virtual(_send_tokens(limiter, sizes))
    assert _busiest_minute(sent) <= tpm + tpm * 0.5 / 60 + max(sizes)
    last = max(t for t, _ in sent)
    assert sum(n for t, n in sent if t < last) / (last / 60.0) >= 0.97 * tpm


def test_a_request_larger_than_the_bucket_waits_its_turn_and_does_not_deadlock() -> None:
    # The bucket holds half a second of quota: 50 tokens. One request wants 3,000.
    limiter = RequestLimiter(1_000_000, 100, tokens_per_minute=6_000)
    sent = run_virtual(_send_tokens(limiter, [3_000, 10, 10]))
    times = [t for t, _ in sent]
    # It goes first (first come, first served) after about 30 s of quota, the small ones after.
    assert sent[0][1] == 3_000
    assert 29.0 <= times[0] <= 30.5
    assert times[1] >= times[0] and times[2] >= times[0]


def test_small_requests_do_not_starve_a_large_one() -> None:
    limiter = RequestLimiter(1_000_000, 10_000, tokens_per_minute=60_000)

    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        big_sent: list[float] = []

        async def big() -> None:
            async with limiter.slot(5_000):
                big_sent.append(loop.time())

        smalls = [asyncio.create_task(_send_tokens(limiter, [100] * 50)) for _ in range(2)]
        await asyncio.sleep(0)
        task = asyncio.create_task(big())
        later = asyncio.create_task(_send_tokens(limiter, [100] * 50))
        await asyncio.gather(*smalls, task, later)
        return big_sent[0], loop.time()

    big_at, end = run_virtual(scenario())
    # 10,000 tokens of small requests queued ahead of it take 10 s at 1,000 tokens/s.
    assert big_at <= 10 + 5 + 1
    assert end > big_at


def test_usage_below_the_estimate_is_credited_and_above_it_is_paid_back() -> None:
    limiter = RequestLimiter(1_000_000, 10, tokens_per_minute=60_000)  # bucket: 500 tokens

    async def scenario() -> None:
        async with limiter.slot(400) as lease:
            pass
        lease.answered(100)  # 300 unused come back, at most one bucket's worth
        assert limiter.tokens is not None
        assert limiter.tokens.balance == 300
        async with limiter.slot(400) as lease:
            pass
        lease.answered(2_400)  # 2,000 more than reserved: debt, paid by the next request
        assert limiter.tokens.balance == -2_000
        loop = asyncio.get_running_loop()
        before = loop.time()
        async with limiter.slot(100):
            pass
        # 2,100 tokens to pay at 1,000 tokens/s; the bucket was full (500) and may end full.
        assert 2.0 <= loop.time() - before <= 2.3

    run_virtual(scenario())


def test_credit_is_capped_at_one_bucket() -> None:
    limiter = RequestLimiter(1_000_000, 10, tokens_per_minute=60_000)

    async def scenario() -> None:
        async with limiter.slot(5_000) as lease:
            pass
        lease.answered(1)  # 4,999 unused: only 500 may be spent without pacing later

    run_virtual(scenario())
    assert limiter.tokens is not None and limiter.tokens.balance == 500


def test_no_token_cap_means_no_token_accounting() -> None:
    limiter = RequestLimiter(600, 4)
    assert limiter.tokens is None
    sent = run_virtual(_send_tokens(limiter, [10**9]))
    assert sent[0][0] < 0.01


# --- adaptive concurrency (AIMD) ---------------------------------------------------------


def test_a_429_halves_the_limit_once_per_round() -> None:
    aimd = AdaptiveConcurrency(32)
    first_round = aimd.round
    assert aimd.throttled(first_round)
    assert aimd.limit == 16
    # More 429s to requests sent before the cut say nothing new.
    assert not aimd.throttled(first_round)
    assert aimd.limit == 16
    assert aimd.throttled(aimd.round)
    assert aimd.limit == 8


def test_the_limit_never_drops_below_the_minimum() -> None:
    aimd = AdaptiveConcurrency(4, minimum=1)
    for _ in range(10):
        aimd.throttled(aimd.round)
    assert aimd.limit == 1


def test_the_limit_grows_back_by_one_per_window_of_successes() -> None:
    aimd = AdaptiveConcurrency(32)
    aimd.throttled(aimd.round)
    assert aimd.limit == 16
    grown = [aimd.succeeded() for _ in range(16)]
    assert grown == [False] * 15 + [True]
    assert aimd.limit == 17
    for _ in range(10_000):
        aimd.succeeded()
    assert aimd.limit == 32  # never above the configured cap


class ThrottlingServer:
    """Serves ``capacity`` requests at once in 1 s; answers 429 at once beyond that."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.busy = 0
        self.throttled = 0

    async def __call__(self, lease: Lease) -> bool:
        if self.busy >= self.capacity:
            self.throttled += 1
            await asyncio.sleep(0.01)
            lease.throttled()
            return False
        self.busy += 1
        await asyncio.sleep(1.0)
        self.busy -= 1
        lease.answered(0)
        return True


def test_429s_shrink_concurrency_and_successes_grow_it_back() -> None:
    limiter = RequestLimiter(1_000_000, 64)
    server = ThrottlingServer(capacity=10)
    limits_seen: list[int] = []

    async def one() -> None:
        served = False
        while not served:  # a client that sends a 429'd request again after a second
            async with limiter.slot() as lease:
                served = await server(lease)
            limits_seen.append(limiter.concurrency)
            if not served:
                await asyncio.sleep(1.0)

    async def scenario() -> None:
        await asyncio.gather(*(one() for _ in range(400)))

    run_virtual(scenario())
    lowest = limits_seen.index(min(limits_seen))
    # The first wave of 64 met a server of 10: the cap came down to about its capacity...
    assert min(limits_seen) <= 10
    # ...then grew back one step at a time (never straight to 64), and came down again.
    assert max(limits_seen[lowest:]) > min(limits_seen)
    assert max(limits_seen[lowest:]) < 64
    assert limiter.adaptive.decreases >= 3
    # Without the cut, 54 of every 64 requests would be turned away every second.
    assert server.throttled < 400
    assert limiter.in_flight == 0


def test_a_waiter_cancelled_while_queued_gives_its_slot_to_the_next() -> None:
    limiter = RequestLimiter(1_000_000, 1)

    async def scenario() -> list[str]:
        order: list[str] = []

        async def hold(name: str, seconds: float) -> None:
            async with limiter.slot():
                order.append(name)
                await asyncio.sleep(seconds)

        first = asyncio.create_task(hold("first", 1.0))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(hold("doomed", 1.0))
        last = asyncio.create_task(hold("last", 1.0))
        await asyncio.sleep(0.5)
        doomed.cancel()
        await asyncio.gather(first, last)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return order

    assert run_virtual(scenario()) == ["first", "last"]
    assert "in_flight=0/1" in repr(limiter)


def test_cancelling_every_waiter_at_once_leaves_the_limiter_consistent() -> None:
    # As when a run is cancelled: waiters are cancelled while slots are being released.
    limiter = RequestLimiter(1_000_000, 2)

    async def scenario() -> None:
        async def hold() -> None:
            async with limiter.slot():
                await asyncio.sleep(1.0)

        tasks = [asyncio.create_task(hold()) for _ in range(10)]
        await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert "in_flight=0/2" in repr(limiter)
        # Still usable, at its full concurrency.
        await asyncio.gather(hold(), hold())

    loop_time = run_virtual(_timed(scenario()))
    assert loop_time == pytest.approx(1.5, abs=0.01)


async def _timed(coro: Coroutine[Any, Any, None]) -> float:
    await coro
    return asyncio.get_running_loop().time()


def test_a_429_with_retry_after_holds_new_requests_until_then() -> None:
    limiter = RequestLimiter(1_000_000, 8)

    async def scenario() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        async with limiter.slot() as lease:
            pass
        lease.throttled(retry_after=5.0)  # at t=0: quiet until t=5
        async with limiter.slot():
            held = loop.time()
        lease.throttled()  # no Retry-After: no pause
        async with limiter.slot():
            free = loop.time()
        limiter.hold(3.0)
        lease.throttled(retry_after=1.0)  # a shorter pause never cuts a longer one short
        async with limiter.slot():
            longest = loop.time()
        return held, free - held, longest - free

    held, free, longest = run_virtual(scenario())
    assert 5.0 <= held < 5.01
    assert free < 0.01
    assert 3.0 <= longest < 3.01
