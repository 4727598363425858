"""SIGINT/SIGTERM: the first stops new work and gives in-flight units a grace period; the second
(or the end of the grace period) cancels at once. Either way the writer commits every unit
that finished, so the run resumes cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Shutdown:
    """What SIGINT/SIGTERM do to a run: the first calls ``stop_taking_work`` and gives units in
    flight ``grace_s`` seconds; the second, or the end of the grace, cancels the task."""

    def __init__(self, grace_s: float, stop_taking_work: Callable[[], None]) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self._stop_taking_work = stop_taking_work
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @contextmanager
    def installed(self, task: asyncio.Task[object]) -> Iterator[Shutdown]:
        """Handle the signals for the duration of the block by stopping ``task``."""
        loop = asyncio.get_running_loop()
        self._task = task
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self.request, signum)
        try:
            yield self
        finally:
            for signum in SIGNALS:
                loop.remove_signal_handler(signum)
            if self._timer is not None:
                self._timer.cancel()

    def request(self, signum: int) -> None:
        """What a signal does (also callable directly, e.g. from tests)."""
        name = signal.Signals(signum).name
        if self.signum is not None:
            log.warning("%s again: stopping now; finished units are kept", name)
            self._cancel()
            return
        self.signum = signum
        log.warning(
            "%s: taking no new work; units in flight get %.0f s to finish (signal again to "
            "stop at once). Run the same command later to resume.",
            name,
            self.grace_s,
        )
        self._stop_taking_work()
        self._timer = asyncio.get_running_loop().call_later(self.grace_s, self._grace_over)

    def _grace_over(self) -> None:
        log.warning("grace period over: stopping the units still in flight (they will rerun)")
        self._cancel()

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def exit_code(self) -> int | None:
        """128 + the signal number, as shells report it (130 SIGINT, 143 SIGTERM)."""
        return None if self.signum is None else 128 + self.signum

    def __repr__(self) -> str:
        state = "running" if self.signum is None else signal.Signals(self.signum).name
        return f"<Shutdown {state} grace={self.grace_s}s>"
