"""The run's one request limiter when units run on several workers: the ledger the limiter
actor holds.

It owns what must be global for a cap to mean anything across machines: the paced
requests-per-minute bucket, the tokens-per-minute budget, the ``Retry-After`` hold and the
adaptive concurrency, all of them ``engine.teacher.limits``' own classes. Workers never ask it
per request: they lease slices of quota (``Lease.requests`` up to half a second's worth, see
``engine.distributed.lease``) and report what became of their requests in batches
(``Outcomes``). Each answer (``Grant``) carries the worker's share of the concurrency limit,
the concurrency round, and how long new requests are held back.

Plain asyncio, no Ray: the actor (``engine.distributed.ray_backend``) wraps it, and tests
drive it directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from engine.teacher.limits import BURST_SECONDS, AdaptiveConcurrency, TokenBudget, pace_bucket

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcomes:
    """What one worker's requests met since its last report: replies that were not 429
    (``answered``), 429s (``throttled``: the concurrency round each was sent in and its
    Retry-After in seconds, None when it gave none), and the tokens its answered requests
    had reserved and used (``reserved`` / ``used``, summed over those whose reply reported
    usage)."""

    answered: int = 0
    throttled: tuple[tuple[int, float | None], ...] = ()
    reserved: int = 0
    used: int = 0

    def __bool__(self) -> bool:
        return bool(self.answered or self.throttled or self.reserved or self.used)


@dataclass(frozen=True, slots=True)
class Grant:
    """The ledger's answer to a worker: ``requests`` and ``tokens`` granted (spend them
    now), the worker's share of the requests allowed in flight (``concurrency``), the
    concurrency round to tag new requests with, and ``hold_s``: send nothing new for this
    many seconds (a 429's Retry-After, as the ledger last heard of it; 0 when none)."""

    requests: int
    tokens: int
    concurrency: int
    round: int
    hold_s: float = 0.0


@dataclass
class LedgerTotals:
    """What the ledger has granted and heard, for the report and for tests."""

    leases: int = 0  # lease calls that asked for quota (reports alone not counted)
    requests: int = 0
    tokens: int = 0
    answered: int = 0
    throttled: int = 0
    by_worker: dict[int, int] = field(default_factory=dict)  # requests granted per worker


def share_of(limit: int, workers: int, worker: int) -> int:
    """``worker``'s part (0-based) of ``limit`` requests in flight over ``workers``: split
    evenly, the remainder to the first workers, at least 1 each (so with more workers than
    the limit, the sum exceeds it by at most the number of workers)."""
    base, extra = divmod(limit, workers)
    return max(1, base + (1 if worker % workers < extra else 0))


class QuotaLedger:
    """The global requests/tokens-per-minute buckets, Retry-After hold and adaptive
    concurrency of a run whose requests go out from ``workers`` processes.

    ``requests_per_minute``, ``max_concurrency`` and ``tokens_per_minute`` mean what they
    mean in ``engine.teacher.limits.RequestLimiter`` (the same bounds; ``ValueError`` below
    them, or for ``workers`` < 1). ``sleep`` waits out a hold (injectable for tests).
    """

    def __init__(
        self,
        requests_per_minute: int,
        max_concurrency: int,
        tokens_per_minute: int = 0,
        *,
        workers: int = 1,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if requests_per_minute < 1 or max_concurrency < 1 or tokens_per_minute < 0:
            raise ValueError(
                "requests_per_minute and max_concurrency must be >= 1, tokens_per_minute >= 0"
            )
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.workers = workers
        self.adaptive = AdaptiveConcurrency(max_concurrency)
        self.tokens = TokenBudget(tokens_per_minute) if tokens_per_minute else None
        self._pace = pace_bucket(requests_per_minute)
        # A lease is for at most one bucket's worth: half a second of the cap.
        self.slice_requests = int(self._pace.max_rate)
        self.slice_tokens = max(1, int(tokens_per_minute * BURST_SECONDS / 60))
        self._turn = asyncio.Lock()  # requests are granted in arrival order
        self._resume_at = 0.0
        self._sleep = sleep
        self.totals = LedgerTotals()

    async def lease(self, worker: int, requests: int, tokens: int, outcomes: Outcomes) -> Grant:
        """Record ``outcomes`` of ``worker`` (0-based), then grant up to ``requests``
        requests (at most ``slice_requests``; at least 1 when any is asked for) and exactly
        ``tokens`` tokens, waiting for the pace, the token budget and any hold. Asking for
        neither only reports."""
        self.record(outcomes)
        granted = 0
        if requests > 0:
            granted = min(requests, self.slice_requests)
            await self._quiet()
            async with self._turn:
                await self._pace.acquire(granted)
            self.totals.requests += granted
            self.totals.by_worker[worker] = self.totals.by_worker.get(worker, 0) + granted
        if tokens > 0 and self.tokens is not None:
            await self._quiet()
            await self.tokens.reserve(tokens)
            self.totals.tokens += tokens
        if requests > 0 or tokens > 0:
            self.totals.leases += 1
        return self.grant(worker, granted, tokens if self.tokens is not None else 0)

    def record(self, outcomes: Outcomes) -> None:
        """Take in one worker's batch of outcomes: 429s cut the concurrency (once per
        round) and hold everyone back for their Retry-After; successes grow it back; token
        usage settles the reservations."""
        for sent_in_round, retry_after in outcomes.throttled:
            self.totals.throttled += 1
            if self.adaptive.throttled(sent_in_round):
                log.warning(
                    "teacher answered 429: requests in flight cut to %d (of %d), for all workers",
                    self.adaptive.limit,
                    self.adaptive.maximum,
                )
            if retry_after:
                self.hold(retry_after)
        self.totals.answered += outcomes.answered
        for _ in range(outcomes.answered):
            self.adaptive.succeeded()
        if self.tokens is not None and (outcomes.reserved or outcomes.used):
            self.tokens.settle(outcomes.reserved, outcomes.used)

    def hold(self, seconds: float) -> None:
        """Grant nothing new for ``seconds``."""
        now = asyncio.get_running_loop().time()
        self._resume_at = max(self._resume_at, now + seconds)

    def grant(self, worker: int, requests: int = 0, tokens: int = 0) -> Grant:
        """The answer for ``worker`` now: what it was granted, its concurrency share, the
        round and the hold left."""
        left = self._resume_at - asyncio.get_running_loop().time()
        return Grant(requests, tokens, self.share(worker), self.adaptive.round, max(0.0, left))

    def share(self, worker: int) -> int:
        """``worker``'s part of the requests allowed in flight now (``share_of``)."""
        return share_of(self.adaptive.limit, self.workers, worker)

    async def _quiet(self) -> None:
        while (left := self._resume_at - asyncio.get_running_loop().time()) > 0:
            await self._sleep(left)

    def __repr__(self) -> str:
        tpm = f" tpm={self.tokens_per_minute}" if self.tokens is not None else ""
        return (
            f"<QuotaLedger rpm={self.requests_per_minute}{tpm} workers={self.workers} "
            f"limit={self.adaptive.limit}/{self.adaptive.maximum} "
            f"granted={self.totals.requests} leases={self.totals.leases}>"
        )
