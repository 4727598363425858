"""The shared limiter: one ledger, several workers leasing from it (engine.distributed.quota and
lease), in virtual time, with a delay on every call to the ledger as a remote call has."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from engine.distributed.lease import LeasedLimiter, QuotaClient
from engine.distributed.quota import Grant, Outcomes, QuotaLedger, share_of
from tests.support.clock import run_virtual
from tests.teacher.test_limits import _busiest_minute

CALL_S = 0.005  # one remote call's round trip


@dataclass
class Link:
    """A worker's line to the ledger, counting its calls."""

    ledger: QuotaLedger
    worker: int
    calls: list[tuple[int, int, Outcomes]] = field(default_factory=list)

    async def __call__(self, requests: int, tokens: int, outcomes: Outcomes) -> Grant:
        self.calls.append((requests, tokens, outcomes))
        await asyncio.sleep(CALL_S / 2)
        grant = await self.ledger.lease(self.worker, requests, tokens, outcomes)
        await asyncio.sleep(CALL_S / 2)
        return grant


def _workers(ledger: QuotaLedger, count: int, tpm: int = 0) -> list[tuple[Link, LeasedLimiter]]:
    made = []
    for i in range(count):
        link = Link(ledger, i)
        quota = QuotaClient(link, ledger.slice_requests, ledger.slice_tokens)
        share = share_of(ledger.adaptive.maximum, count, i)
        made.append((link, LeasedLimiter(quota, ledger.requests_per_minute, share, tpm)))
    return made


async def _send(limiter: LeasedLimiter, count: int, tokens: int = 0) -> list[float]:
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def one() -> None:
        async with limiter.slot(tokens) as lease:
            starts.append(loop.time())
            await asyncio.sleep(0.05)
            lease.answered(tokens)

    await asyncio.gather(*(one() for _ in range(count)))
    await limiter.quota.close()
    return starts


@pytest.mark.parametrize(("rpm", "workers"), [(300, 2), (600, 3), (6000, 2)])
def test_workers_together_keep_the_cap_in_every_minute_and_reach_it(rpm: int, workers: int) -> None:
    ledger = QuotaLedger(rpm, max_concurrency=10_000, workers=workers)
    pairs = _workers(ledger, workers)

    async def scenario() -> list[list[float]]:
        return await asyncio.gather(*(_send(lim, rpm * 3 // workers) for _, lim in pairs))

    per_worker = run_virtual(scenario())
    starts = [t for each in per_worker for t in each]
    assert _busiest_minute([(t, 1) for t in starts]) <= 1.02 * rpm
    assert len(starts) / (max(starts) / 60.0) >= 0.97 * rpm
    assert all(each for each in per_worker)  # every worker sent
    leases = sum(1 for link, _ in pairs for r, _t, _o in link.calls if r > 0)
    # Slices, not one call per request: the ledger's half second of quota per lease.
    assert leases <= len(starts) / max(1, ledger.slice_requests) * 1.1 + workers
    if ledger.slice_requests >= 2:
        assert leases < len(starts) / 1.9


def test_a_429_at_one_worker_holds_every_worker_and_cuts_the_shared_limit() -> None:
    ledger = QuotaLedger(6000, max_concurrency=8, workers=2)
    (_, first), (_, second) = _workers(ledger, 2)
    loop_times: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with first.slot() as lease:
            lease.throttled(retry_after=5.0)
        await asyncio.sleep(0.1)  # the report reaches the ledger
        # The other worker had no quota left: its next request waits out the hold.
        second.quota.requests = 0
        async with second.slot():
            loop_times.append(loop.time())
        await first.quota.close()
        await second.quota.close()

    run_virtual(scenario())
    assert loop_times[0] >= 5.0
    assert ledger.adaptive.limit == 4 and ledger.adaptive.decreases == 1
    assert (first.concurrency, second.concurrency) == (2, 2)  # each one's half of the cut


def test_429s_from_one_round_cut_once_and_successes_grow_every_share_back() -> None:
    ledger = QuotaLedger(60_000, max_concurrency=8, workers=2)
    ledger.record(Outcomes(throttled=((0, None), (0, None), (0, None))))
    assert ledger.adaptive.limit == 4  # three 429s of one round: one cut
    ledger.record(Outcomes(answered=4 + 5 + 6 + 7))
    assert ledger.adaptive.limit == 8
    assert [ledger.share(w) for w in (0, 1)] == [4, 4]


def test_tokens_per_minute_hold_across_workers() -> None:
    tpm = 60_000
    ledger = QuotaLedger(1_000_000, max_concurrency=10_000, tokens_per_minute=tpm, workers=2)
    pairs = _workers(ledger, 2, tpm=tpm)

    async def scenario() -> list[list[float]]:
        return await asyncio.gather(*(_send(lim, 150, tokens=400) for _, lim in pairs))

    starts = [t for each in run_virtual(scenario()) for t in each]
    assert _busiest_minute([(t, 400) for t in starts]) <= 1.02 * tpm
    assert len(starts) * 400 / (max(starts) / 60.0) >= 0.95 * tpm


def test_outcomes_reach_the_ledger_within_the_flush_time_without_a_lease() -> None:
    ledger = QuotaLedger(60_000, max_concurrency=4, tokens_per_minute=600_000, workers=1)
    ledger.adaptive.limit = 2
    [(link, limiter)] = _workers(ledger, 1, tpm=600_000)
    limiter.adaptive.limit = 2

    async def scenario() -> None:
        async with limiter.slot(100) as lease:
            lease.answered(40)
        await asyncio.sleep(limiter.quota.flush_after_s + CALL_S * 2)
        assert ledger.totals.answered == 1
        assert ledger.tokens is not None and ledger.tokens.balance == 60  # credit
        await limiter.quota.close()

    run_virtual(scenario())
    assert link.calls[-1][:2] == (0, 0)  # a report alone


@pytest.mark.parametrize(
    ("limit", "workers", "shares"),
    [(32, 2, [16, 16]), (33, 2, [17, 16]), (5, 3, [2, 2, 1]), (2, 4, [1, 1, 1, 1])],
)
def test_shares_split_the_limit(limit: int, workers: int, shares: list[int]) -> None:
    assert [share_of(limit, workers, w) for w in range(workers)] == shares


def test_ledger_repr_shows_its_state() -> None:
    ledger = QuotaLedger(300, 32, workers=2)
    assert repr(ledger) == "<QuotaLedger rpm=300 workers=2 limit=32/32 granted=0 leases=0>"
