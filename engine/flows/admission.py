"""Admission control for the branches of all units: at most ``limit`` run at once.

A branch (one step of a unit, ``Unit.spawn``) becomes a task only when a slot is free;
until then it waits in a FIFO queue as its unstarted coroutine. Without this, every reply
spawns its next stage at once (a summary reply of 50 choices: 50 branches; 128 units in
flight: thousands), and each spawned branch is a task that runs its first step (building
its request, the cache lookup) in the same pass of the event loop and then waits at the
limiter. Measured on ``benchmarks.scale rate`` (2 cores): loop passes of 200-500 ms running
thousands of such steps, and a heap of 500,000-800,000 objects (12,000-16,000 waiting
tasks of about 8 coroutines each) whose full garbage collections took 370-480 ms each.
With admission control, a finished branch starts at most one queued branch (its done
callback), so a pass runs about as many steps as replies arrived, and the waiting branches
hold a few objects each.

A slot is held for the branch's whole life, waits at the limiter included: ``limit`` must
exceed the requests the limiter lets out at once (``limits.max_concurrency``), or the
teacher would be kept idle; ``for_concurrency`` gives a margin of several times that.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol

# Slots per request the limiter allows in flight: the branches between replies (parsing,
# spawning, waiting for a slot at the limiter) keep the teacher busy.
SLOTS_PER_REQUEST = 4
MIN_SLOTS = 64
# Branches started in one pass of the event loop, at most; the rest start in the next passes.
# A branch's first step (its request built, hashed, looked up in the cache) takes 0.1-0.4 ms,
# so this bounds a pass's share of first steps to about 10-25 ms. At start-up every worker
# begins a unit at once, and later one reply may spawn 50 branches: without it, such a pass
# ran 500-2,500 first steps (130-260 ms).
PER_PASS = 64

# A branch: its stage, its item and the coroutine of its step (not started yet).
Branch = tuple[str, str, Coroutine[Any, Any, None]]


class Owner(Protocol):
    """The unit a branch belongs to."""

    def launch(self, branch: Branch) -> asyncio.Task[None]:
        """Start ``branch`` as a task; discard it and raise ``RuntimeError`` when the unit
        is shutting down."""

    def discard(self, branch: Branch) -> None:
        """Forget ``branch``, which will never start (close its coroutine)."""


class Admission:
    """Starts branches while fewer than ``limit`` run; queues the rest, first in first out."""

    def __init__(self, limit: int, per_pass: int = PER_PASS) -> None:
        if limit < 1 or per_pass < 1:
            raise ValueError(f"admission limits must be at least 1, got {limit}, {per_pass}")
        self.limit = limit
        self.per_pass = per_pass
        self.running = 0
        # Branches started in the current pass of the loop, and whether the next pass is
        # marked (a callback that resets the count and starts queued branches).
        self._this_pass = 0
        self._marked = False
        self.peak_queued = 0
        self._queue: deque[tuple[Owner, Branch]] = deque()

    @classmethod
    def for_concurrency(cls, max_concurrency: int) -> Admission:
        """The gate for a limiter allowing ``max_concurrency`` requests in flight."""
        return cls(max(MIN_SLOTS, SLOTS_PER_REQUEST * max_concurrency))

    @property
    def queued(self) -> int:
        """Branches waiting for a slot."""
        return len(self._queue)

    def submit(self, owner: Owner, branch: Branch) -> None:
        """Start ``branch`` (``owner.launch``) now if a slot is free, else when one frees;
        ``owner.discard`` it if ``drop(owner)`` comes first. Raises what ``launch`` raises
        when it runs now."""
        if self._free():
            self._launch(owner, branch)
            return
        # Queued, a branch is a tuple and an unstarted coroutine: a few objects, where a
        # started one waiting at the limiter is a task and a chain of coroutines.
        self._queue.append((owner, branch))
        self.peak_queued = max(self.peak_queued, len(self._queue))

    def drop(self, owner: Owner) -> int:
        """Discard the queued branches of ``owner`` (its unit failed or was cancelled);
        returns how many."""
        mine = [branch for who, branch in self._queue if who is owner]
        if mine:
            self._queue = deque(item for item in self._queue if item[0] is not owner)
        for branch in mine:
            owner.discard(branch)
        return len(mine)

    def _free(self) -> bool:
        return self.running < self.limit and self._this_pass < self.per_pass

    def _launch(self, owner: Owner, branch: Branch) -> None:
        task = owner.launch(branch)
        self.running += 1
        self._this_pass += 1
        if not self._marked:
            # Runs in the next pass: callbacks scheduled now wait for this pass to end.
            asyncio.get_running_loop().call_soon(self._next_pass)
            self._marked = True
        task.add_done_callback(self._release)

    def _next_pass(self) -> None:
        self._this_pass = 0
        self._marked = False
        self._start_queued()

    def _release(self, _task: asyncio.Task[None]) -> None:
        self.running -= 1
        self._start_queued()

    def _start_queued(self) -> None:
        while self._queue and self._free():
            owner, branch = self._queue.popleft()
            try:
                self._launch(owner, branch)
            except RuntimeError:  # its unit is shutting down: launch discarded the branch
                continue

    def __repr__(self) -> str:
        return f"<Admission running={self.running}/{self.limit} queued={self.queued}>"
