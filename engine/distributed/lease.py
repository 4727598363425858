"""A worker's side of the shared limiter: quota leased in slices, outcomes reported in batches.

``QuotaClient`` stands in for a ``RequestLimiter``'s own buckets (it is a ``Pace`` and a
``Tokens``): a request takes its turn from quota already leased to this worker, and only when
that is spent does the worker ask the ledger (``engine.distributed.quota``) again, for as many
requests as are waiting then, up to half a second's worth of the cap, so a worker busy at
the cap makes about two lease calls a second, whatever its request rate. What its requests
met (answered, 429 and Retry-After, tokens used) goes back with the next lease, or after at
most ``flush_after_s`` when no lease is due; a 429 is sent at once, since it holds back every
worker.

``LeasedLimiter`` is the ``RequestLimiter`` a worker's ``HTTPTeacher`` uses: the same slots,
waiting and holds, drawing on a ``QuotaClient``, with its share of the concurrency limit and
the round set from each ``Grant``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from engine.distributed.quota import Grant, Outcomes
from engine.teacher.limits import Lease, RequestLimiter

log = logging.getLogger(__name__)

# (requests, tokens, outcomes) -> the ledger's grant: one remote call to the limiter actor.
LeaseCall = Callable[[int, int, Outcomes], Awaitable[Grant]]


class QuotaClient:
    """Requests and tokens leased from the run's ledger through ``call``.

    ``slice_requests`` / ``slice_tokens``: the most one lease asks for beyond what is waiting
    (the ledger's half second of quota). ``on_grant`` is told of every grant (the limiter
    takes its concurrency share and holds from it).
    """

    def __init__(
        self,
        call: LeaseCall,
        slice_requests: int,
        slice_tokens: int = 0,
        *,
        flush_after_s: float = 0.5,
    ) -> None:
        self._call = call
        self.slice_requests = max(1, slice_requests)
        self.slice_tokens = slice_tokens
        self.flush_after_s = flush_after_s
        self.on_grant: Callable[[Grant], None] = lambda grant: None
        self.requests = 0  # leased, not yet spent
        self.tokens = 0
        self.leases = 0  # lease calls that asked for quota
        self._waiting_requests = 0
        self._waiting_tokens = 0
        self._request_turn = asyncio.Lock()
        self._token_turn = asyncio.Lock()
        # Outcomes not yet reported.
        self._answered = 0
        self._throttled: list[tuple[int, float | None]] = []
        self._reserved = 0
        self._used = 0
        self._flush: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def acquire(self) -> None:
        """One request's turn (``engine.teacher.limits.Pace``), in arrival order."""
        self._waiting_requests += 1
        try:
            async with self._request_turn:
                while self.requests < 1:
                    want = min(self._waiting_requests, self.slice_requests)
                    self.requests += (await self._lease(want, 0)).requests
                self.requests -= 1
        finally:
            self._waiting_requests -= 1

    async def reserve(self, tokens: int) -> None:
        """``tokens`` for one request (``engine.teacher.limits.Tokens``), in arrival order;
        a lease asks for this request's shortfall plus what the requests queued behind it
        need, up to a slice."""
        self._waiting_tokens += tokens
        try:
            async with self._token_turn:
                while self.tokens < tokens:
                    short = tokens - self.tokens
                    behind = self._waiting_tokens - tokens
                    want = short + min(behind, max(0, self.slice_tokens - short))
                    granted = (await self._lease(0, want)).tokens
                    if granted <= 0:  # the ledger has no token cap: nothing to wait for
                        return
                    self.tokens += granted
                self.tokens -= tokens
        finally:
            self._waiting_tokens -= tokens

    def settle(self, reserved: int, used: int) -> None:
        """A request that reserved ``reserved`` tokens used ``used`` (reported with the
        next lease)."""
        self._reserved += reserved
        self._used += used
        self._flush_later()

    def answered(self) -> None:
        """A request got a reply that was not a 429 (reported with the next lease)."""
        self._answered += 1
        self._flush_later()

    def throttled(self, sent_in_round: int, retry_after: float | None) -> None:
        """A request sent in ``sent_in_round`` got a 429: reported at once."""
        self._throttled.append((sent_in_round, retry_after))
        self._spawn(self._report())

    def take(self) -> Outcomes:
        """The outcomes not yet reported, which are then counted as reported."""
        outcomes = Outcomes(self._answered, tuple(self._throttled), self._reserved, self._used)
        self._answered = self._reserved = self._used = 0
        self._throttled = []
        return outcomes

    async def close(self) -> None:
        """Report what is left and stop the timer; outstanding reports are awaited."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        with contextlib.suppress(Exception):
            await self._report()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _lease(self, requests: int, tokens: int) -> Grant:
        if self._flush is not None:  # this call carries the outcomes
            self._flush.cancel()
            self._flush = None
        self.leases += 1
        grant = await self._call(requests, tokens, self.take())
        self.on_grant(grant)
        return grant

    async def _report(self) -> None:
        outcomes = self.take()
        if outcomes:
            self.on_grant(await self._call(0, 0, outcomes))

    def _flush_later(self) -> None:
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self.flush_after_s, self._flush_now)

    def _flush_now(self) -> None:
        self._flush = None
        self._spawn(self._report())

    def _spawn(self, report: Awaitable[None]) -> None:
        task = asyncio.ensure_future(report)
        self._tasks.add(task)
        task.add_done_callback(self._reported)

    def _reported(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            log.warning("could not report request outcomes to the limiter: %s", err)

    def __repr__(self) -> str:
        return (
            f"<QuotaClient requests={self.requests} tokens={self.tokens} "
            f"leases={self.leases} waiting={self._waiting_requests}>"
        )


class LeasedLimiter(RequestLimiter):
    """A worker's ``RequestLimiter``: its slots are its share of the run's concurrency
    limit, its pace and tokens come from ``quota``, and what its requests meet goes to the
    ledger, which decides for every worker (no AIMD of its own)."""

    def __init__(
        self,
        quota: QuotaClient,
        requests_per_minute: int,
        share: int,
        tokens_per_minute: int = 0,
    ) -> None:
        """``share``: this worker's part of ``limits.max_concurrency`` (its most slots)."""
        super().__init__(
            requests_per_minute,
            share,
            tokens_per_minute,
            pace=quota,
            tokens=quota if tokens_per_minute else None,
        )
        self.quota = quota
        quota.on_grant = self.apply

    def apply(self, grant: Grant) -> None:
        """Take the concurrency share, round and hold of ``grant``."""
        self.adaptive.limit = max(1, min(grant.concurrency, self.adaptive.maximum))
        self.adaptive.round = grant.round
        if grant.hold_s > 0:
            self.hold(grant.hold_s)
        self._wake()

    def throttled(self, lease: Lease, retry_after: float | None = None) -> None:
        """A 429: hold this worker at once; the ledger cuts the concurrency of all."""
        if retry_after:
            self.hold(retry_after)
        self.quota.throttled(lease.round, retry_after)

    def answered(self, lease: Lease, used_tokens: int) -> None:
        """Any other reply: counted for the ledger's growth, its tokens settled there."""
        self.quota.answered()
        if self.tokens is not None and used_tokens > 0:
            self.quota.settle(lease.reserved_tokens, used_tokens)
