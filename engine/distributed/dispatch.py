"""The driver's side of a distributed run: which worker runs a unit, and what happens when a
worker is lost.

The scheduler (``engine.pipeline.scheduler``) stays as it is: its unit tasks call a
``RemoteFlow`` per type instead of the flow itself, and ``RemoteUnits`` sends the unit to the
live worker with the fewest units in flight. When a worker (or its node) dies, every unit it
had in flight comes back here as ``WorkerLost`` and is sent again, to another worker: nothing
of it reached the writer, so each unit's records are still written once, by the driver's one
writer. The lost worker is waited for in the background (Ray restarts it, on another node if
its own is gone) and takes units again once it answers. When no worker has been alive for
``lost_max_s`` the run stops, resumably.

No Ray here: ``engine.distributed.ray_backend`` adapts actor handles to ``WorkerHandle``,
turning Ray's actor and node deaths into ``WorkerLost``; tests use fakes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.distributed.worker import UnitReply, WorkerInfo
from engine.errors import FatalRunError
from engine.output.records import UnitResult
from engine.pipeline.stats import Stats
from engine.seeds import SeedRow

log = logging.getLogger(__name__)


class WorkerLost(Exception):
    """The worker died, or its node did, before it answered."""


class RemoteFatal(FatalRunError):
    """A worker met an error that stops the run (its message says which)."""


class WorkerHandle(Protocol):
    """How the driver reaches one worker."""

    index: int

    async def ready(self) -> WorkerInfo:
        """Wait until the worker is up (again); ``WorkerLost`` if it is gone for good,
        ``FatalRunError`` if it cannot work."""
        ...

    async def run_unit(self, seed: SeedRow, gen_type: str) -> UnitReply:
        """Run the unit there; ``WorkerLost`` if the worker died first."""
        ...


@dataclass
class _Slot:
    handle: WorkerHandle
    alive: bool = False
    info: WorkerInfo | None = None
    units: int = 0  # in flight now
    requests: int = 0  # requests in flight, as its last reply said
    share: int = 0  # its share of the concurrency limit, as its last reply said
    done: int = 0
    sent: int = 0
    lost: int = 0  # times it was lost
    reviving: asyncio.Task[None] | None = field(default=None, repr=False)


class RemoteFlow:
    """One type's units, run on the workers (the scheduler's view of a flow)."""

    def __init__(self, gen_type: str, units: RemoteUnits) -> None:
        self.gen_type = gen_type
        self._units = units

    async def run(self, seed: SeedRow) -> UnitResult:
        """The unit's result from whichever worker ran it to the end."""
        return await self._units.run(seed, self.gen_type)

    def __repr__(self) -> str:
        return f"<RemoteFlow {self.gen_type} {self._units!r}>"


class RemoteUnits:
    """Sends units to ``handles`` and gathers their results and tallies into ``stats``.

    Use as ``async with``: entering starts waiting for every worker to be ready (units wait
    for the first), leaving stops waiting for lost ones. ``lost_max_s``: how long units may
    wait with no worker alive before ``FatalRunError``.
    """

    def __init__(self, handles: Sequence[WorkerHandle], stats: Stats, *, lost_max_s: float) -> None:
        self._slots = [_Slot(h) for h in handles]
        self.stats = stats
        self.lost_max_s = lost_max_s
        self.rerun: Counter[str] = Counter()  # units sent again after a worker was lost, by type
        self._alive = asyncio.Event()
        self._fatal: FatalRunError | None = None

    def flows(self, gen_types: Sequence[str]) -> list[RemoteFlow]:
        """One ``RemoteFlow`` per type, in order."""
        return [RemoteFlow(t, self) for t in gen_types]

    @property
    def units_in_flight(self) -> int:
        """Units on the workers now."""
        return sum(s.units for s in self._slots)

    @property
    def in_flight(self) -> int:
        """Requests in flight on the live workers, as of each one's last reply (what the
        progress display shows; ``engine.progress.display.InFlight``)."""
        return sum(s.requests for s in self._slots if s.alive)

    @property
    def concurrency(self) -> int:
        """Requests allowed in flight: the live workers' shares of the shared limit."""
        return sum(s.share for s in self._slots if s.alive)

    async def __aenter__(self) -> RemoteUnits:
        for slot in self._slots:
            self._revive(slot)
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [s.reviving for s in self._slots if s.reviving is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self, seed: SeedRow, gen_type: str) -> UnitResult:
        """Run the unit on a live worker, again elsewhere each time one is lost under it."""
        while True:
            slot = await self._pick()
            slot.units += 1
            try:
                reply = await slot.handle.run_unit(seed, gen_type)
            except WorkerLost as err:
                self.rerun[gen_type] += 1
                self._lost(slot, err)
                continue
            finally:
                slot.units -= 1
            reply.tally.add_to(self.stats)
            slot.sent += reply.tally.requests_sent
            slot.requests, slot.share = reply.in_flight, reply.concurrency
            if reply.fatal:
                raise RemoteFatal(reply.fatal)
            assert reply.result is not None
            slot.done += 1
            return reply.result

    def summary(self) -> dict[str, Any]:
        """For the run report: per worker where it ran, units done, requests sent and times
        lost; units run again after a loss, by type."""
        workers = []
        for slot in self._slots:
            info = slot.info
            workers.append(
                {
                    "worker": slot.handle.index,
                    "node": info.node if info else None,
                    "host": info.host if info else None,
                    "pid": info.pid if info else None,
                    "alive": slot.alive,
                    "units": slot.done,
                    "requests": slot.sent,
                    "lost": slot.lost,
                }
            )
        return {"workers": workers, "units_rerun": dict(sorted(self.rerun.items()))}

    async def _pick(self) -> _Slot:
        """The live worker with the fewest units in flight (the first on ties)."""
        while True:
            if self._fatal is not None:
                raise self._fatal
            alive = [s for s in self._slots if s.alive]
            if alive:
                return min(alive, key=lambda s: s.units)
            self._alive.clear()
            try:
                async with asyncio.timeout(self.lost_max_s):
                    await self._alive.wait()
            except TimeoutError:
                raise FatalRunError(
                    f"no Ray worker has been alive for {self.lost_max_s:g} s "
                    "(ray.lost_workers_max_s): check the cluster's nodes and resources; "
                    "run the same command to resume"
                ) from None

    def _lost(self, slot: _Slot, err: WorkerLost) -> None:
        if not slot.alive:
            return  # already known: its other units come back one by one
        slot.alive = False
        slot.lost += 1
        where = f" on {slot.info.host} (pid {slot.info.pid})" if slot.info else ""
        log.warning(
            "worker %d%s lost (%s): its units in flight run again on other workers",
            slot.handle.index,
            where,
            err,
        )
        self._revive(slot)

    def _revive(self, slot: _Slot) -> None:
        slot.reviving = asyncio.get_running_loop().create_task(
            self._wait_ready(slot), name=f"revive-worker-{slot.handle.index}"
        )

    async def _wait_ready(self, slot: _Slot) -> None:
        while True:
            try:
                slot.info = await slot.handle.ready()
            except WorkerLost as err:
                log.warning("worker %d is gone for good: %s", slot.handle.index, err)
                return
            except FatalRunError as err:
                self._fatal = err
                self._alive.set()  # wakes the units waiting in _pick, which raise it
                return
            break
        slot.alive = True
        log.info("worker %d ready on %s (pid %d)", slot.handle.index, slot.info.host, slot.info.pid)
        self._alive.set()

    def __repr__(self) -> str:
        alive = sum(s.alive for s in self._slots)
        units = self.units_in_flight
        return f"<RemoteUnits workers={alive}/{len(self._slots)} units_in_flight={units}>"
