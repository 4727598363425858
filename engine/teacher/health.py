"""One endpoint's health: up, or down and waiting for a probe. Pure state, no waiting.

Without this, a ten-minute outage burns every in-flight item's retry budget in its first
minute and the night's run ends with thousands of failed items. Failures that say "the
server is not there" (connection refused or reset, timeouts, 502/503/504) from ``threshold``
different requests in a row mark the endpoint down (one request failing again and again is
that request's problem: it uses up its own attempts and is recorded as failed). From then on
a single request at a time goes to it as a probe, with growing pauses between probes. The
first probe that gets any HTTP answer marks it up again. ``engine.teacher.endpoints`` routes
requests by this state and does the waiting.
"""

from __future__ import annotations

import logging
from enum import Enum

from engine.errors import RetryableError, TeacherConnectionError, TeacherHTTPError, TeacherTimeout

log = logging.getLogger(__name__)

# A proxy or load balancer answering for a backend that is gone.
GATEWAY_STATUSES = frozenset({502, 503, 504})


class AttemptOutcome(Enum):
    """What one attempt says about its endpoint being there (not about the reply)."""

    ANSWERED = "answered"  # any HTTP answer, even an error: the server is there
    UNREACHABLE = "unreachable"  # refused, reset, timed out, 502/503/504


def answered_outcome(status: int) -> AttemptOutcome:
    """The outcome of an attempt answered with HTTP ``status``: a gateway's 502/503/504 says
    the server behind it is gone; any other status, that it is there."""
    return AttemptOutcome.UNREACHABLE if status in GATEWAY_STATUSES else AttemptOutcome.ANSWERED


def unreachable(err: RetryableError) -> bool:
    """Whether ``err`` says the server is not there (refused, reset, timed out, a gateway's
    502/503/504), as opposed to a server answering badly."""
    if isinstance(err, TeacherHTTPError):
        return err.status in GATEWAY_STATUSES
    return isinstance(err, TeacherConnectionError | TeacherTimeout)


class Health:
    """One endpoint's up/down state, fed with the outcome of every attempt sent to it.

    ``endpoint``: its base URL (for logs); ``threshold``: different requests failing as
    unreachable in a row that mark it down; ``probe_base_s`` / ``probe_max_s``: the pause
    before the first probe, doubling after each failed probe up to the maximum (seconds of
    event-loop time). ``down_since`` is the loop time it went down (None: up).
    """

    def __init__(
        self, endpoint: str, *, threshold: int, probe_base_s: float, probe_max_s: float
    ) -> None:
        self.endpoint = endpoint
        self.threshold = threshold
        self.probe_base_s = probe_base_s
        self.probe_max_s = probe_max_s
        # Requests whose latest attempt was UNREACHABLE since the last answer from the server.
        self._failing: set[object] = set()
        self.down_since: float | None = None
        self.outages = 0
        self.probing = False
        self.next_probe_at = 0.0
        self._failed_probes = 0

    @property
    def streak(self) -> int:
        """Different requests that failed as if the server were gone, since its last answer."""
        return len(self._failing)

    def failing(self, request: object) -> bool:
        """Whether ``request``'s latest attempt here failed as if the server were gone."""
        return request in self._failing

    @property
    def down(self) -> bool:
        """Marked down, and not answered a probe since."""
        return self.down_since is not None

    def probe_due(self, now: float) -> bool:
        """Down, no probe out, and the pause since the last probe is over."""
        return self.down and not self.probing and now >= self.next_probe_at

    def record(
        self, request: object, outcome: AttemptOutcome | None, *, probe: bool, now: float
    ) -> None:
        """The outcome of an attempt of ``request`` (any object naming the request across its
        attempts; None outcome: it was never sent), at loop time ``now``; ``probe``: the
        attempt was the endpoint's probe."""
        if probe:
            self.probing = False
        if outcome is AttemptOutcome.ANSWERED:
            # A late answer to a request sent before the outage proves nothing about now
            # (a server shutting down still finishes its requests): only a probe reopens.
            if probe or not self.down:
                self._answered(now)
        elif outcome is AttemptOutcome.UNREACHABLE:
            self._unreachable(request, probe, now)

    def mark_down(self, now: float, why: str) -> None:
        """Mark the endpoint down at loop time ``now`` without waiting for failed requests
        (the preflight found it not answering: ``why``); its first probe is due after
        ``probe_base_s``. No-op when it is down already."""
        if self.down_since is None:
            self._go_down(now, f"{why}: no requests go to it until a probe gets an answer")

    def _go_down(self, now: float, why: str) -> None:
        """Down from loop time ``now`` (``why``, for the log); the first probe after
        ``probe_base_s``."""
        self.down_since = now
        self.outages += 1
        self.next_probe_at = now + self.probe_base_s
        log.warning("teacher at %s %s", self.endpoint, why)

    def _answered(self, now: float) -> None:
        self._failing.clear()
        if self.down_since is not None:
            log.warning(
                "teacher at %s answers again after %.0f s: resuming dispatch",
                self.endpoint,
                now - self.down_since,
            )
            self.down_since = None
            self._failed_probes = 0

    def _unreachable(self, request: object, probe: bool, now: float) -> None:
        self._failing.add(request)
        if self.down_since is None and self.streak >= self.threshold:
            self._go_down(
                now,
                f"looks down ({self.streak} requests failed in a row): pausing dispatch "
                "to it, probing it one request at a time",
            )
        elif probe:
            self._failed_probes += 1
            pause = min(self.probe_max_s, self.probe_base_s * 2**self._failed_probes)
            self.next_probe_at = now + pause
            log.info("teacher at %s still down; next probe in %.1f s", self.endpoint, pause)

    def __repr__(self) -> str:
        state = "down" if self.down else "up"
        return f"<Health {self.endpoint} {state} streak={self.streak} outages={self.outages}>"
