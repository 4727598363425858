"""A time budget for each pass of the event loop: work past it waits for the next pass.

A pass of asyncio's loop runs every callback that was ready when it began, one after the
other, before it looks at timers and sockets again. At about 2,000 requests a second the
replies that arrive together wake as many tasks in one pass, and each then runs a step of
0.1 to 3 ms (the reply parsed and checked choice by choice, the next request built, hashed
and looked up in the cache): passes of 30 to 70 ms, and a timer due in the middle of one
fired up to two passes late (``benchmarks.scale rate``: 107 to 133 ms).

``PassBudget.turn()`` is a cooperative yield point in the manner of Tokio's task budget
(tokio::task::coop), counted in time rather than in operations: the first ``turn()`` of a
pass opens the pass's budget; a ``turn()`` after ``slice_s`` of it has gone yields
(``asyncio.sleep(0)``) until a later pass has budget left. The deferred tasks were queued
in order and are the first to run in the next pass, so none is passed over, and the
timers and sockets that came due are served in between. The flows take a turn before each
reply choice they parse and check (``engine.flows.ask``), the writer before each unit it
writes. A deferred step costs a wake-up every pass until it runs, so turns belong before
steps that are long or many, not before every small one. Work not preceded by a
``turn()`` (socket callbacks, the HTTP client's steps, a branch's first step, bounded by
``engine.flows.admission`` instead) is not counted, so a pass may run longer than
``slice_s``: the budget bounds the share of the engine's own steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# The engine's steps run in one pass before the rest wait for the next: a timer or a socket
# is then served at least every few tens of milliseconds, whatever arrives at once.
SLICE_S = 0.005


class PassBudget:
    """Yield points sharing ``slice_s`` seconds (of ``clock``) per pass of the running loop."""

    def __init__(
        self, slice_s: float = SLICE_S, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if slice_s <= 0:
            raise ValueError(f"a pass's budget must be positive, got {slice_s} s")
        self.slice_s = slice_s
        self._clock = clock
        # When this pass's first turn() ran (None until one runs in the current pass), and
        # on which loop: a budget left open by a loop that ended is not held against another.
        self._opened: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # turn() calls that yielded, in all: how often the budget held a step back.
        self.deferred = 0

    async def turn(self) -> None:
        """Return at once while the current pass has budget left; else yield to the loop
        until a pass that has."""
        while True:
            now = self._clock()
            loop = asyncio.get_running_loop()
            if self._opened is None or loop is not self._loop:
                self._opened, self._loop = now, loop
                # Queued now, this runs in the next pass, before the steps deferred below.
                loop.call_soon(self._close)
                return
            if now - self._opened < self.slice_s:
                return
            self.deferred += 1
            await asyncio.sleep(0)

    def _close(self) -> None:
        self._opened = None

    def __repr__(self) -> str:
        return f"<PassBudget slice={self.slice_s * 1000:.0f}ms deferred={self.deferred}>"
