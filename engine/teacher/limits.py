"""Request limits: requests in flight (adaptive on 429), paced requests and tokens per minute.

Every teacher request passes through ``RequestLimiter.slot()``: a concurrency slot first, then
the requests-per-minute bucket, then (when ``tokens_per_minute`` is set) the token bucket.
Both buckets are aiolimiter leaky buckets holding half a second of quota, so starting or
resuming after a lull never sends a burst: a bucket of a whole minute would send 60 s of
quota in the first second, and the busiest minute would hold twice the cap.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from aiolimiter import AsyncLimiter

log = logging.getLogger(__name__)

# The most quota that goes out at once: half a second's worth.
BURST_SECONDS = 0.5


def pace_bucket(per_minute: int) -> AsyncLimiter:
    """A leaky bucket for ``per_minute`` holding about ``BURST_SECONDS`` of it (at least 1);
    its ``max_rate`` is that capacity."""
    capacity = max(1, int(per_minute * BURST_SECONDS / 60))
    return AsyncLimiter(capacity, 60.0 * capacity / per_minute)


class Pace(Protocol):
    """Where a request's turn under the requests-per-minute cap comes from: the local leaky
    bucket (``pace_bucket``), or quota leased from a limiter shared by several processes
    (``engine.distributed``)."""

    async def acquire(self) -> None:
        """Wait for one request's turn."""
        ...


class Tokens(Protocol):
    """Where tokens under the tokens-per-minute cap come from: ``TokenBudget``, or quota
    leased from a shared limiter."""

    async def reserve(self, tokens: int) -> None:
        """Wait until ``tokens`` (an estimate) can be spent."""
        ...

    def settle(self, reserved: int, used: int) -> None:
        """A request that reserved ``reserved`` tokens used ``used``."""
        ...


class AdaptiveConcurrency:
    """Additive increase, multiplicative decrease of the requests allowed in flight.

    A 429 halves the limit, once per round: a 429 to a request sent before the last
    decrease says nothing new (that request went out under the old limit). Every success
    adds ``1 / limit``, so the limit grows back by one per limit's worth of successes, up
    to ``maximum``. Pure state, no clock: the caller reports outcomes. ``ValueError`` unless
    ``1 <= minimum <= maximum``.
    """

    def __init__(self, maximum: int, minimum: int = 1, factor: float = 0.5) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        self.maximum = maximum
        self.minimum = minimum
        self.factor = factor
        self.limit = maximum
        self.round = 0  # bumped at every decrease
        self.decreases = 0
        self._growth = 0.0

    def throttled(self, sent_in_round: int) -> bool:
        """A 429 to a request sent in ``sent_in_round``; True if the limit went down."""
        if sent_in_round != self.round or self.limit == self.minimum:
            return False
        self.limit = max(self.minimum, int(self.limit * self.factor))
        self.round += 1
        self.decreases += 1
        self._growth = 0.0
        return True

    def succeeded(self) -> bool:
        """A reply that was not a 429; True if the limit went up."""
        if self.limit >= self.maximum:
            return False
        self._growth += 1.0 / self.limit
        if self._growth < 1.0:
            return False
        self._growth -= 1.0
        self.limit += 1
        return True

    def __repr__(self) -> str:
        return f"<AdaptiveConcurrency {self.limit}/{self.maximum} decreases={self.decreases}>"


class TokenBudget:
    """Tokens per minute: each request reserves an estimate, settled later from its usage.

    Over-estimates come back as credit for the next requests, at most one bucket's worth
    (more would let the busiest minute exceed the cap); under-estimates become debt that the
    next requests pay before they go. Reservations queue in arrival order (aiolimiter wakes
    its smallest waiter first, which could starve a large request) and a request larger than
    the bucket is paid in bucket-sized parts, so it waits its turn instead of deadlocking.
    """

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._bucket = pace_bucket(per_minute)
        self._capacity = int(self._bucket.max_rate)
        self._turn = asyncio.Lock()
        self.balance = 0.0  # > 0: credit from over-estimates; < 0: debt from under-estimates

    async def reserve(self, tokens: int) -> None:
        """Wait until ``tokens`` (an estimate, in tokens) can be spent, in arrival order; the
        balance (credit or debt) is spent with it."""
        need = float(tokens)
        async with self._turn:
            while True:
                # Credit that came back while this request waited is used first; a debt is
                # paid on top. Either way the balance is spent here.
                need -= self.balance
                self.balance = max(0.0, -need)
                if need <= 0:
                    return
                part = min(need, self._capacity)
                await self._bucket.acquire(part)
                need -= part

    def settle(self, reserved: int, used: int) -> None:
        """A request that reserved ``reserved`` tokens used ``used``: the difference becomes
        credit (capped at one bucket) or debt."""
        self.balance = min(self.balance + reserved - used, float(self._capacity))


@dataclass(frozen=True, slots=True)
class Lease:
    """One request's hold on a ``RequestLimiter`` slot: what the limiter needs to know when
    the request's outcome is reported (``RequestLimiter.throttled`` / ``answered``).

    ``reserved_tokens``: the tokens taken from the tokens-per-minute budget for it (0 when
    there is no such budget); ``round``: the concurrency round it was sent in
    (``AdaptiveConcurrency.round``).
    """

    limiter: RequestLimiter
    reserved_tokens: int
    round: int

    def throttled(self, retry_after: float | None = None) -> None:
        """Report a 429: ``RequestLimiter.throttled`` for this lease."""
        self.limiter.throttled(self, retry_after)

    def answered(self, used_tokens: int) -> None:
        """Report any other reply: ``RequestLimiter.answered`` for this lease."""
        self.limiter.answered(self, used_tokens)


class RequestLimiter:
    """A concurrency cap that shrinks on 429 and grows back, plus paced RPM and TPM budgets.

    The slot is held while the request is in flight; waiting for it is first come, first
    served. The client reports each request's outcome through its ``Lease``
    (``throttled`` / ``answered``). Raises ``ValueError`` for a ``requests_per_minute`` or
    ``max_concurrency`` below 1, or a negative ``tokens_per_minute`` (0: no token cap);
    ``sleep`` waits out a 429's quiet (injectable for tests). ``pace`` and ``tokens`` replace
    the limiter's own buckets (default: a ``pace_bucket`` and, when ``tokens_per_minute`` is
    set, a ``TokenBudget``): a worker of a distributed run draws on quota leased from the
    run's one shared limiter instead.
    """

    def __init__(
        self,
        requests_per_minute: int,
        max_concurrency: int,
        tokens_per_minute: int = 0,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        pace: Pace | None = None,
        tokens: Tokens | None = None,
    ) -> None:
        if requests_per_minute < 1 or max_concurrency < 1 or tokens_per_minute < 0:
            raise ValueError(
                "requests_per_minute and max_concurrency must be >= 1, tokens_per_minute >= 0"
            )
        self.requests_per_minute = requests_per_minute
        self.max_concurrency = max_concurrency
        self.tokens_per_minute = tokens_per_minute
        self.adaptive = AdaptiveConcurrency(max_concurrency)
        if tokens is None and tokens_per_minute:
            tokens = TokenBudget(tokens_per_minute)
        self.tokens = tokens
        self._pace: Pace = pace if pace is not None else pace_bucket(requests_per_minute)
        self._held = 0  # slots taken, including requests still waiting for pacing
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._resume_at = 0.0  # loop time before which nothing new is sent (after a 429)
        self._sleep = sleep
        self.in_flight = 0

    @property
    def concurrency(self) -> int:
        """Requests allowed in flight right now (below ``max_concurrency`` after 429s)."""
        return self.adaptive.limit

    @property
    def resume_at(self) -> float:
        """Event-loop time (``loop.time()``, seconds) before which no new request is sent; in
        the past when nothing is held back."""
        return self._resume_at

    def throttled(self, lease: Lease, retry_after: float | None = None) -> None:
        """The request holding ``lease`` was answered 429, asking for ``retry_after`` seconds
        of quiet (None or 0: it did not say). Cuts the requests in flight (once per round,
        see ``AdaptiveConcurrency``) and holds new requests back for ``retry_after``."""
        if self.adaptive.throttled(lease.round):
            log.warning(
                "teacher answered 429: requests in flight cut to %d (of %d)",
                self.adaptive.limit,
                self.max_concurrency,
            )
        if retry_after:
            self.hold(retry_after)

    def answered(self, lease: Lease, used_tokens: int) -> None:
        """The request holding ``lease`` got any reply but a 429 (an error too);
        ``used_tokens`` is its usage's prompt plus completion tokens (0 when the server sent
        none, which leaves the reservation as it was). Grows the requests in flight back, and
        settles the tokens-per-minute reservation against what was used."""
        if self.adaptive.succeeded():
            self._wake()
        if self.tokens is not None and used_tokens > 0:
            self.tokens.settle(lease.reserved_tokens, used_tokens)

    def hold(self, seconds: float) -> None:
        """Send nothing new for ``seconds``: a rate limit's Retry-After is about the whole
        account, not the one request that got it, and every request sent meanwhile would
        only be turned away too."""
        self._resume_at = max(self._resume_at, asyncio.get_running_loop().time() + seconds)

    @asynccontextmanager
    async def slot(self, tokens: int = 0) -> AsyncIterator[Lease]:
        """Hold a slot for one request that may use up to ``tokens`` tokens (prompt plus
        completion): waits for a free slot, the end of any 429 quiet, the pace, and the
        tokens; the slot is freed when the block ends."""
        await self._take()
        try:
            quiet = self._resume_at - asyncio.get_running_loop().time()
            if quiet > 0:
                await self._sleep(quiet)
            await self._pace.acquire()
            if self.tokens is not None and tokens > 0:
                await self.tokens.reserve(tokens)
            self.in_flight += 1
            try:
                yield Lease(self, tokens if self.tokens is not None else 0, self.adaptive.round)
            finally:
                self.in_flight -= 1
        finally:
            self._held -= 1
            self._wake()

    async def _take(self) -> None:
        if self._held < self.adaptive.limit and not self._waiters:
            self._held += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            # A cancelled waiter stays in the queue until ``_wake`` skips it; one that was
            # handed a slot just as it was cancelled passes the slot on.
            if not waiter.cancelled():
                self._held -= 1
                self._wake()
            raise

    def _wake(self) -> None:
        """Hand free slots to the longest waiters; the slot is counted as taken here."""
        while self._waiters and self._held < self.adaptive.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._held += 1
                waiter.set_result(None)

    def __repr__(self) -> str:
        tpm = f" tpm={self.tokens_per_minute}" if self.tokens is not None else ""
        return (
            f"<RequestLimiter rpm={self.requests_per_minute}{tpm} "
            f"in_flight={self.in_flight}/{self.max_concurrency} limit={self.adaptive.limit}>"
        )
