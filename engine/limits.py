"""Request limits: a cap on requests in flight and a paced requests-per-minute budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiolimiter import AsyncLimiter

# The bucket holds at most this share of a minute's quota, so starting (or resuming after a
# lull) never sends a burst: a full-minute bucket would send 60 s of quota in the first second.
_BURST_SECONDS = 0.5


class RequestLimiter:
    """Every teacher request passes through ``slot()``: first a concurrency slot, then pacing.

    Pacing is a leaky bucket (aiolimiter) sized to half a second of quota; the concurrency cap
    is a semaphore. The slot is held while the request is in flight.
    """

    def __init__(self, requests_per_minute: int, max_concurrency: int) -> None:
        if requests_per_minute < 1 or max_concurrency < 1:
            raise ValueError("requests_per_minute and max_concurrency must be >= 1")
        burst = max(1, int(requests_per_minute * _BURST_SECONDS / 60))
        self.requests_per_minute = requests_per_minute
        self.max_concurrency = max_concurrency
        self._pace = AsyncLimiter(burst, 60.0 * burst / requests_per_minute)
        self._slots = asyncio.Semaphore(max_concurrency)
        self.in_flight = 0

    @property
    def concurrency(self) -> int:
        """Requests allowed in flight right now (below ``max_concurrency`` after 429s)."""
        return self.max_concurrency

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            await self._pace.acquire()
            self.in_flight += 1
            try:
                yield
            finally:
                self.in_flight -= 1

    def __repr__(self) -> str:
        return (
            f"<RequestLimiter rpm={self.requests_per_minute} "
            f"in_flight={self.in_flight}/{self.max_concurrency}>"
        )
