"""Which endpoint each attempt goes to: the least-loaded healthy replica.

``teacher.base_url`` may list several replicas of one model. Each attempt goes to the
healthy endpoint with the fewest attempts under way (ties: the one used least). An endpoint
that looks down (``engine.teacher.health``) gets no traffic but one probe at a time, with growing
pauses, while the others carry on; its first answered probe brings it back. Only when every
endpoint is down do attempts wait here, and if none has answered for ``give_up_s`` they get
``EndpointDown`` and the run stops, resumable.

An attempt waits for a usable endpoint (``ready``) before it takes a limiter slot, so a
request waiting out an outage holds no concurrency slot and spends no rate budget (while all
are down, only the one probe due goes on); it is routed (``route``) once it has its slot, so
"least loaded" is judged when it is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.errors import EndpointDown
from engine.teacher.health import AttemptOutcome, Health


@dataclass(slots=True, eq=False)
class Endpoint:
    """One replica of the teacher: its base URL, health and load."""

    url: str  # the base URL, e.g. http://host:8000/v1
    health: Health
    assigned: int = 0  # attempts routed here and not settled yet
    chosen: int = 0  # attempts routed here in all

    @property
    def chat_url(self) -> str:
        """The URL chat completions are POSTed to: ``url`` + ``/chat/completions``."""
        return self.url + "/chat/completions"


@dataclass(slots=True)
class Passage:
    """One attempt's route; the caller sets ``outcome`` once it knows it."""

    endpoint: Endpoint
    request: object
    probe: bool
    outcome: AttemptOutcome | None = field(default=None)


class EndpointPool:
    """The teacher's replicas (``urls``, base URLs; at least one, else ``ValueError``) and
    where each attempt goes. ``threshold``, ``probe_base_s`` and ``probe_max_s`` configure
    each endpoint's ``Health``; ``give_up_s``: seconds with every endpoint down after which
    waiting attempts get ``EndpointDown``.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        threshold: int,
        probe_base_s: float,
        probe_max_s: float,
        give_up_s: float,
    ) -> None:
        if not urls:
            raise ValueError("no endpoint URLs")
        self.endpoints = [
            Endpoint(
                url,
                Health(
                    url, threshold=threshold, probe_base_s=probe_base_s, probe_max_s=probe_max_s
                ),
            )
            for url in urls
        ]
        self.give_up_s = give_up_s
        self._change: asyncio.Future[None] | None = None

    @property
    def down(self) -> bool:
        """Every endpoint is down."""
        return all(e.health.down for e in self.endpoints)

    @property
    def outages(self) -> int:
        """Times any endpoint was found down, in all."""
        return sum(e.health.outages for e in self.endpoints)

    async def ready(self) -> Endpoint | None:
        """Return once an attempt can go out.

        While an endpoint is up, at once, with None: ``route`` picks the endpoint when the
        attempt has its slot. While all are down, when a probe is due, with the endpoint this
        attempt is to probe, claimed for it alone (pass it to ``route``, or ``release`` it):
        the other waiters stay here rather than queue for slots they could not use. Raises
        ``EndpointDown`` when every endpoint has been down for ``give_up_s``.
        """
        while True:
            now = _now()
            if any(not e.health.down for e in self.endpoints):
                return None
            due = next((e for e in self.endpoints if e.health.probe_due(now)), None)
            if due is not None:
                due.health.probing = True
                return due
            await self._wait(now)

    def route(self, request: object, probe: Endpoint | None = None) -> Passage | None:
        """The endpoint for one attempt of ``request`` (any object naming it across its
        attempts): ``probe`` if the attempt claimed one, else a due probe, else the least
        loaded healthy endpoint, preferring one where the request's last attempt did not fail
        as unreachable; None if none can take it now. ``settle`` it when it is over.
        """
        if probe is None:
            now = _now()
            # Probes first: a replica that is back rejoins even while the others carry all.
            probe = next((e for e in self.endpoints if e.health.probe_due(now)), None)
            if probe is not None:
                probe.health.probing = True
        if probe is not None:
            chosen = probe
        else:
            up = [e for e in self.endpoints if not e.health.down]
            if not up:
                return None
            # A retry goes elsewhere when it can: the replica its last attempt could not
            # reach may be on its way out (not yet marked down), and a second attempt there
            # would spend the request's budget on it.
            up = [e for e in up if not e.health.failing(request)] or up
            chosen = min(up, key=lambda e: (e.assigned, e.chosen))
        chosen.assigned += 1
        chosen.chosen += 1
        return Passage(chosen, request, probe is not None)

    def mark_down(self, url: str, why: str) -> None:
        """Mark the endpoint whose base URL is ``url`` down before any attempt fails on it
        (``Health.mark_down``); ``KeyError`` for a URL not in the pool."""
        endpoint = next((e for e in self.endpoints if e.url == url), None)
        if endpoint is None:
            raise KeyError(url)
        endpoint.health.mark_down(_now(), why)
        self._changed()

    def release(self, probe: Endpoint) -> None:
        """A probe claimed by ``ready`` that will not be sent (its attempt was cancelled)."""
        probe.health.probing = False
        self._changed()

    def settle(self, passage: Passage) -> None:
        """Record the attempt's outcome in its endpoint's health."""
        endpoint = passage.endpoint
        endpoint.assigned -= 1
        endpoint.health.record(passage.request, passage.outcome, probe=passage.probe, now=_now())
        self._changed()

    async def _wait(self, now: float) -> None:
        """Every endpoint is down: wait for a probe to settle or the next one to be due."""
        down_for = now - max(_down_since(e, now) for e in self.endpoints)
        if down_for >= self.give_up_s:
            raise EndpointDown(", ".join(e.url for e in self.endpoints), down_for)
        due = [e.health.next_probe_at for e in self.endpoints if not e.health.probing]
        delay = self.give_up_s - down_for
        if due:
            delay = min(delay, max(0.0, min(due) - now))
        if self._change is None:
            self._change = asyncio.get_running_loop().create_future()
        # Returns on the change or after ``delay``, whichever comes first; a waiter cancelled
        # here leaves the shared future alone.
        await asyncio.wait({self._change}, timeout=delay)

    def _changed(self) -> None:
        if self._change is not None:
            if not self._change.done():
                self._change.set_result(None)
            self._change = None

    def summary(self) -> dict[str, dict[str, int]]:
        """Per endpoint URL: ``{"requests": attempts routed there, "outages": times it was
        found down, "down": 1 if it is down now else 0}``."""
        return {
            e.url: {"requests": e.chosen, "outages": e.health.outages, "down": int(e.health.down)}
            for e in self.endpoints
        }

    def __repr__(self) -> str:
        states = ", ".join(
            f"{e.url} {'down' if e.health.down else 'up'} {e.assigned}" for e in self.endpoints
        )
        return f"<EndpointPool {states}>"


def _down_since(endpoint: Endpoint, now: float) -> float:
    since = endpoint.health.down_since
    return now if since is None else since


def _now() -> float:
    return asyncio.get_running_loop().time()
