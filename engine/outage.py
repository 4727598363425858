"""Endpoint outages: stop dispatching while the teacher is down, probe it, resume by itself.

Without this, a ten-minute outage burns every in-flight item's retry budget in its first
minute and the night's run ends with thousands of failed items. Failures that say "the
server is not there" (connection refused or reset, timeouts, 502/503/504) from ``threshold``
different requests in a row close the gate (one request failing again and again is that
request's problem: it uses up its own attempts and is recorded as failed). From then on a
single request at a time goes out as a probe, with growing pauses between probes; all
others wait. The first probe that gets any HTTP answer opens the gate again. Attempts that
fail while the gate is closed do not count against an item's retry budget. If the endpoint
stays away longer than ``give_up_s``, every waiting request gets ``EndpointDown`` and the
run stops, resumable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum

from engine.errors import EndpointDown

log = logging.getLogger(__name__)


class Outcome(Enum):
    ANSWERED = "answered"  # any HTTP answer, even an error: the server is there
    UNREACHABLE = "unreachable"  # refused, reset, timed out, 502/503/504


@dataclass(slots=True)
class Passage:
    """One attempt through the gate; the caller sets ``outcome`` once it knows it."""

    request: object
    probe: bool
    outcome: Outcome | None = None


class OutageGate:
    def __init__(
        self,
        endpoint: str,
        *,
        threshold: int,
        probe_base_s: float,
        probe_max_s: float,
        give_up_s: float,
    ) -> None:
        self.endpoint = endpoint
        self.threshold = threshold
        self.probe_base_s = probe_base_s
        self.probe_max_s = probe_max_s
        self.give_up_s = give_up_s
        # Requests whose latest attempt was UNREACHABLE since the last answer from the server.
        self._failing: set[object] = set()
        self.down_since: float | None = None
        self.outages = 0
        self._failed_probes = 0
        self._next_probe_at = 0.0
        self._probe_turn = asyncio.Lock()

    @property
    def streak(self) -> int:
        """Different requests that failed as if the server were gone, since its last answer."""
        return len(self._failing)

    @property
    def down(self) -> bool:
        return self.down_since is not None

    @asynccontextmanager
    async def passage(self, request: object) -> AsyncIterator[Passage]:
        """Wait until an attempt of ``request`` (any object that identifies it across its
        attempts) may go out; settle the gate with the attempt's outcome."""
        passage = Passage(request, probe=await self._admit())
        try:
            yield passage
        finally:
            self._settle(passage)

    async def _admit(self) -> bool:
        """Return at once while the endpoint is up; else wait for a turn to probe."""
        if not self.down:
            return False
        await self._probe_turn.acquire()
        try:
            while self.down:
                self._check_give_up()
                delay = self._next_probe_at - _now()
                if delay <= 0:
                    return True  # the lock stays held until the probe settles
                await asyncio.sleep(min(delay, self.probe_max_s))
        except BaseException:
            self._probe_turn.release()
            raise
        self._probe_turn.release()
        return False

    def _settle(self, passage: Passage) -> None:
        if passage.outcome is Outcome.ANSWERED:
            # A late answer to a request sent before the outage proves nothing about now
            # (a server shutting down still finishes its requests): only a probe reopens.
            if passage.probe or not self.down:
                self._answered()
        elif passage.outcome is Outcome.UNREACHABLE:
            self._unreachable(passage)
        if passage.probe:
            self._probe_turn.release()

    def _answered(self) -> None:
        self._failing.clear()
        if self.down_since is not None:
            log.warning(
                "teacher at %s answers again after %.0f s: resuming dispatch",
                self.endpoint,
                _now() - self.down_since,
            )
            self.down_since = None
            self._failed_probes = 0

    def _unreachable(self, passage: Passage) -> None:
        self._failing.add(passage.request)
        if self.down_since is None and self.streak >= self.threshold:
            self.down_since = _now()
            self.outages += 1
            self._next_probe_at = self.down_since + self.probe_base_s
            log.warning(
                "teacher at %s looks down (%d requests failed in a row): pausing dispatch, "
                "probing it one request at a time",
                self.endpoint,
                self.streak,
            )
        elif passage.probe:
            self._failed_probes += 1
            pause = min(self.probe_max_s, self.probe_base_s * 2**self._failed_probes)
            self._next_probe_at = _now() + pause
            log.info("teacher at %s still down; next probe in %.1f s", self.endpoint, pause)

    def _check_give_up(self) -> None:
        if self.down_since is not None and _now() - self.down_since >= self.give_up_s:
            raise EndpointDown(self.endpoint, _now() - self.down_since)

    def __repr__(self) -> str:
        state = "down" if self.down else "up"
        return f"<OutageGate {self.endpoint} {state} streak={self.streak} outages={self.outages}>"


def _now() -> float:
    return asyncio.get_running_loop().time()
