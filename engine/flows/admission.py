"""Admission control for the branches of all units: at most ``limit`` run at once.

A branch (one step of a unit, ``Unit.spawn``) becomes a task only when a slot is free;
until then it waits in its unit's queue as its unstarted coroutine. Without this, every reply
spawns its next stage at once (a summary reply of 50 choices: 50 branches; 128 units in
flight: thousands), and each spawned branch is a task that runs its first step (building
its request, the cache lookup) in the same pass of the event loop and then waits at the
limiter. Measured on ``benchmarks.scale rate`` (2 cores): loop passes of 200-500 ms running
thousands of such steps, and a heap of 500,000-800,000 objects (12,000-16,000 waiting
tasks of about 8 coroutines each) whose full garbage collections took 370-480 ms each.
With admission control, a finished branch starts at most one queued branch (its done
callback), so a pass runs about as many steps as replies arrived, and the waiting branches
hold a few objects each.

A free slot goes to the oldest unit that has a branch waiting (``Owner.order``), its
branches in the order they were spawned. Units then finish one after another, each freeing
its memory and reaching the writer as soon as it can; first in first out over the branches
of all units moved every unit forward together, so that they all finished at the end of a
wave, and the next wave was opened all at once.

A slot is held for the branch's whole life, waits at the limiter included: ``limit`` must
exceed the requests the limiter lets out at once (``limits.max_concurrency``), or the
teacher would be kept idle; ``for_concurrency`` gives a margin of several times that.

The slots are also the run's measure of work in hand: ``room()`` waits while every slot is
taken or promised (branches running, queued, and units let through in this pass), and the
scheduler waits on it before it starts another unit, so that a new unit starts only when
the units in flight would leave a slot idle. A unit fans out to hundreds of requests (the
default configuration: about 160 a unit); with every worker holding a unit
(``limits.workers``, 128 at ``max_concurrency`` 128) the queue held 14,000 branches, each
an unstarted coroutine and two tuples: 42,000 of the 98,000 objects that every collection
of the garbage collector walked, and collections of 40-85 ms. A unit's fan-out shows only
after its first replies, so units are let through a few a pass (``units_per_pass``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
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
# Units opened (``room()`` calls let through) in one pass of the loop, at most: at start-up
# every worker would open a unit in the same pass, before any of them has fanned out.
UNITS_PER_PASS = 8

# A branch: its stage, its item and the coroutine of its step (not started yet).
Branch = tuple[str, str, Coroutine[Any, Any, None]]


class Owner(Protocol):
    """The unit a branch belongs to."""

    # Units opened earlier have smaller numbers: their branches go first.
    order: int

    def launch(self, branch: Branch) -> asyncio.Task[None]:
        """Start ``branch`` as a task; discard it and raise ``RuntimeError`` when the unit
        is shutting down."""

    def discard(self, branch: Branch) -> None:
        """Forget ``branch``, which will never start (close its coroutine)."""


class Admission:
    """Starts branches while fewer than ``limit`` run; queues the rest, oldest unit first."""

    def __init__(
        self, limit: int, per_pass: int = PER_PASS, units_per_pass: int = UNITS_PER_PASS
    ) -> None:
        """``limit``: branches running at once; ``per_pass``: branches started in one pass
        of the loop; ``units_per_pass``: ``room()`` calls that return in one pass. Raises
        ``ValueError`` when any is below 1."""
        if min(limit, per_pass, units_per_pass) < 1:
            raise ValueError(
                f"admission limits must be at least 1, got {limit}, {per_pass}, {units_per_pass}"
            )
        self.limit = limit
        self.per_pass = per_pass
        self.units_per_pass = units_per_pass
        self.running = 0
        # Branches started and room() calls let through in the current pass of the loop, and
        # whether the next pass is marked (a callback that resets both counts, starts queued
        # branches and lets waiting room() calls through).
        self._this_pass = 0
        self._rooms_this_pass = 0
        self._marked = False
        # room() calls waiting, first come first served.
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.peak_queued = 0
        self._queued = 0
        # Each unit's queued branches, and a heap of the units that have some, by age (an
        # entry may be stale: its unit has none left, or another entry of it comes first).
        self._queues: dict[Owner, deque[Branch]] = {}
        self._oldest: list[tuple[int, int, Owner]] = []
        self._entries = itertools.count()

    @classmethod
    def for_concurrency(cls, max_concurrency: int) -> Admission:
        """The gate for a limiter allowing ``max_concurrency`` requests in flight."""
        return cls(max(MIN_SLOTS, SLOTS_PER_REQUEST * max_concurrency))

    @property
    def queued(self) -> int:
        """Branches waiting for a slot."""
        return self._queued

    def submit(self, owner: Owner, branch: Branch) -> None:
        """Start ``branch`` (``owner.launch``) now if a slot is free, else when one frees;
        ``owner.discard`` it if ``drop(owner)`` comes first. Raises what ``launch`` raises
        when it runs now."""
        if self._free():
            self._launch(owner, branch)
            return
        # Queued, a branch is a tuple and an unstarted coroutine, where a started one
        # waiting at the limiter is a task and a chain of coroutines.
        queue = self._queues.get(owner)
        if queue is None:
            queue = self._queues[owner] = deque()
            heapq.heappush(self._oldest, (owner.order, next(self._entries), owner))
        queue.append(branch)
        self._queued += 1
        self.peak_queued = max(self.peak_queued, self._queued)

    async def room(self) -> None:
        """Return once another unit may start: branches running and queued, and calls
        returned in this pass of the loop, are fewer than ``limit`` together, and those calls
        fewer than ``units_per_pass``. Calls return in the order they were made."""
        if not self._waiters and self._has_room():
            self._let_through()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter  # cancelled: skipped by _let_waiters_through

    def drop(self, owner: Owner) -> int:
        """Discard the queued branches of ``owner`` (its unit failed or was cancelled);
        returns how many."""
        mine = self._queues.pop(owner, ())  # its heap entry goes stale
        self._queued -= len(mine)
        for branch in mine:
            owner.discard(branch)
        if mine:
            self._let_waiters_through()
        return len(mine)

    def _free(self) -> bool:
        return self.running < self.limit and self._this_pass < self.per_pass

    def _has_room(self) -> bool:
        if self._rooms_this_pass >= self.units_per_pass:
            return False
        return self.running + self._queued + self._rooms_this_pass < self.limit

    def _let_through(self) -> None:
        self._rooms_this_pass += 1
        self._mark_next_pass()

    def _let_waiters_through(self) -> None:
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._let_through()

    def _mark_next_pass(self) -> None:
        if not self._marked:
            # Runs in the next pass: callbacks scheduled now wait for this pass to end.
            asyncio.get_running_loop().call_soon(self._next_pass)
            self._marked = True

    def _launch(self, owner: Owner, branch: Branch) -> None:
        task = owner.launch(branch)
        self.running += 1
        self._this_pass += 1
        self._mark_next_pass()
        task.add_done_callback(self._release)

    def _next_pass(self) -> None:
        self._this_pass = self._rooms_this_pass = 0
        self._marked = False
        self._start_queued()  # and lets room() calls through

    def _release(self, _task: asyncio.Task[None]) -> None:
        self.running -= 1
        self._start_queued()

    def _start_queued(self) -> None:
        """Start queued branches while slots are free; then let waiting ``room()`` calls
        through if the branches left room."""
        while self._queued and self._free():
            owner, branch = self._pop_oldest()
            try:
                self._launch(owner, branch)
            except RuntimeError:  # its unit is shutting down: launch discarded the branch
                continue
        self._let_waiters_through()

    def _pop_oldest(self) -> tuple[Owner, Branch]:
        """The first queued branch of the oldest unit that has one (some are queued)."""
        while True:
            owner = self._oldest[0][2]
            queue = self._queues.get(owner)
            if queue:
                break
            heapq.heappop(self._oldest)  # stale: the unit's branches were dropped
        branch = queue.popleft()
        self._queued -= 1
        if not queue:
            del self._queues[owner]
            heapq.heappop(self._oldest)
        return owner, branch

    def __repr__(self) -> str:
        return f"<Admission running={self.running}/{self.limit} queued={self.queued}>"
