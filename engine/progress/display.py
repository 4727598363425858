"""Live progress while a run goes: count the units, sample the figures on a timer, show them.

On a terminal a rich live display (logging routed above it), else a log line every
``run.progress_interval_s``; ``engine.progress.view`` turns the figures into text.

Unit totals come from one streaming count pass over the seed file before the run (the same
reader as the producer, about 400 MB/s: seconds for a corpus that takes a night). Counting as
the producer goes would not do: with bounded queues the producer stays only a few units ahead
of the workers, so the total, and with it the ETA, would stay unknown until the very end.

The figures are sampled from ``Stats`` and the limiter by a timer, never on the request path:
a tick is O(types) and there are at most four a second. Rates are over the last minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler

from engine.config import Config, LimitsConfig
from engine.pipeline.resume import ResumePoint
from engine.pipeline.stats import Stats
from engine.progress.view import Snapshot, TypeFigures, line, render
from engine.seeds import SeedRow, read_seeds

log = logging.getLogger(__name__)

LIVE_REFRESH_S = 0.5  # a frame costs ~2 ms of the event loop: 2 a second is plenty
PLAIN_SAMPLE_S = 1.0  # without a terminal: sample the rates every second, log every interval
RATE_WINDOW_S = 60.0
# Rates over a shorter span are mostly the limiter's start-up burst: not shown.
MIN_RATE_SPAN_S = 10.0


class InFlight(Protocol):
    """What the display reads from the request limiter."""

    @property
    def in_flight(self) -> int:
        """Requests in flight now."""
        ...

    @property
    def concurrency(self) -> int:
        """Requests allowed in flight now (below the cap after 429s)."""
        ...


class Pending(Protocol):
    """What the count pass asks of the scheduler."""

    stopping: bool

    def wanted(self, doc_id: str, gen_type: str) -> bool:
        """Whether this run works on the unit."""
        ...


@dataclass(frozen=True, slots=True)
class Totals:
    """Units per type: one per valid seed row, of which ``skipped`` are not run (done before,
    or not selected by ``--retry-failed``)."""

    rows: int
    skipped: Mapping[str, int]


def count_units(
    path: Path,
    max_document_chars: int,
    gen_types: Sequence[str],
    wanted: Callable[[str, str], bool],
    stopped: Callable[[], bool] = lambda: False,
    *,
    resume: ResumePoint | None = None,
) -> Totals | None:
    """Count the valid rows of the seed file and, per type, the units this run skips.

    With ``resume`` (``engine.pipeline.resume``), the rows before its mark are taken from its
    figures, not read (those read again are asked about by their documents), and the file is
    read from the mark on. Returns None if ``stopped()`` turns true first. Call it before the
    run starts: ``wanted`` reads the checkpoint, which the writer changes as units finish.
    """
    rows = 0
    skipped = dict.fromkeys(gen_types, 0)
    seeds = read_seeds(path, max_document_chars) if resume is None else resume.seeds_after()
    if resume is not None:
        rows = resume.mark.rows
        for gen_type in gen_types:
            skipped[gen_type] = resume.rows_skipped
            skipped[gen_type] += sum(not wanted(doc, gen_type) for _, doc in resume.again)
    with contextlib.closing(seeds):
        for item in seeds:
            if stopped():
                return None
            if isinstance(item, SeedRow):
                rows += 1
                for gen_type in gen_types:
                    if not wanted(item.doc_id, gen_type):
                        skipped[gen_type] += 1
    return Totals(rows, skipped)


class RateWindow:
    """Request and token counts sampled over the last ``span`` seconds; memory is bounded by
    the number of samples in one span."""

    def __init__(self, span: float = RATE_WINDOW_S) -> None:
        self.span = span
        self._samples: deque[tuple[float, int, int]] = deque()

    def add(self, now: float, requests: int, tokens: int) -> None:
        """Sample the run's totals (requests, tokens) at ``now`` (seconds, monotonic)."""
        samples = self._samples
        samples.append((now, requests, tokens))
        # Keep one sample at or before the window's start, so the window spans all of it.
        while len(samples) > 2 and samples[1][0] <= now - self.span:
            samples.popleft()

    def per_minute(self, min_span: float = MIN_RATE_SPAN_S) -> tuple[float, float] | None:
        """Requests and tokens per minute across the window; None while it spans less than
        ``min_span`` seconds."""
        (t0, r0, k0), (t1, r1, k1) = self._samples[0], self._samples[-1]
        if t1 - t0 < min_span or t1 <= t0:
            return None
        scale = 60.0 / (t1 - t0)
        return (r1 - r0) * scale, (k1 - k0) * scale


class Progress:
    """Shows the run's progress while ``with progress.shown():`` is open.

    On a terminal (``stream`` is one, or ``terminal=True``) a rich live display refreshed twice
    a second; otherwise one ``log.info`` line every ``interval_s``.
    """

    def __init__(
        self,
        stats: Stats,
        gen_types: Sequence[str],
        limits: LimitsConfig,
        interval_s: float,
        *,
        limiter: InFlight | None = None,
        totals: Totals | None = None,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.gen_types = tuple(gen_types)
        self.limits = limits
        self.interval_s = interval_s
        self.limiter = limiter
        self.totals = totals
        stream = stream or sys.stdout
        # Our own isatty, not rich's guess: FORCE_COLOR (set by many CI systems) would make
        # rich redraw a live display into a log file.
        live = _isatty(stream) if terminal is None else terminal
        self.console = Console(file=stream, force_terminal=live, force_interactive=live)
        self.live = live and not self.console.is_dumb_terminal
        self._clock = clock
        self._started = clock()
        self._window = RateWindow()
        self._window.add(self._started, stats.teacher.requests_sent, stats.teacher.total_tokens)
        self._next_line = self._started + interval_s
        self._display: Live | None = None
        self._restore_logging: Callable[[], None] = _nothing
        self._timer: asyncio.TimerHandle | None = None
        self.ticks = 0

    def snapshot(self) -> Snapshot:
        """The figures now (also adds a sample to the rate window)."""
        now = self._clock()
        stats = self.stats
        self._window.add(now, stats.teacher.requests_sent, stats.teacher.total_tokens)
        rates = self._window.per_minute()
        types = tuple(self._type_figures(t) for t in self.gen_types)
        elapsed = now - self._started
        limiter = self.limiter
        return Snapshot(
            elapsed=elapsed,
            types=types,
            in_flight=None if limiter is None else limiter.in_flight,
            concurrency=None if limiter is None else limiter.concurrency,
            requests_per_minute=None if rates is None else rates[0],
            tokens_per_minute=None if rates is None else rates[1],
            rpm_cap=self.limits.requests_per_minute,
            tpm_cap=self.limits.tokens_per_minute,
            retries=dict(stats.teacher.retries),
            failures=dict(stats.failures),
            cached=stats.teacher.cache_hits,
            eta=_eta(types, elapsed),
            replies=stats.replies.total(),
            rejected=stats.replies_rejected,
        )

    def _type_figures(self, gen_type: str) -> TypeFigures:
        done = self.stats.units_done[gen_type]
        if self.totals is None:
            return TypeFigures(gen_type, done, self.stats.units_skipped[gen_type], None)
        return TypeFigures(gen_type, done, self.totals.skipped[gen_type], self.totals.rows)

    def tick(self) -> None:
        """One timer tick: refresh the live display, or log a line if one is due."""
        self.ticks += 1
        snap = self.snapshot()
        now = self._started + snap.elapsed
        if self._display is not None:
            self._display.update(render(snap), refresh=True)
        elif now >= self._next_line:
            log.info("%s", line(snap))
            # From now, not from the missed deadline: a stalled loop must not log in a burst.
            self._next_line = max(self._next_line + self.interval_s, now)

    @contextlib.contextmanager
    def shown(self) -> Iterator[Progress]:
        """Show progress for the duration of the block; stop cleanly however it ends."""
        if self.live:
            self._start_display()
        self._schedule()
        try:
            yield self
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._stop_display()

    def _start_display(self) -> None:
        try:
            self._display = Live(render(self.snapshot()), console=self.console, auto_refresh=False)
            self._display.start(refresh=True)
            self._restore_logging = _route_logging_through(self.console)
        except Exception as err:
            log.warning("progress display failed to start (%r); the run goes on without it", err)
            self._stop_display()

    def _schedule(self) -> None:
        period = LIVE_REFRESH_S if self.live else min(PLAIN_SAMPLE_S, self.interval_s)
        self._timer = asyncio.get_running_loop().call_later(period, self._on_timer)

    def _on_timer(self) -> None:
        # A timer, not a task: nothing to cancel or await at the end, and an error here can
        # only cost the display, never the run.
        try:
            self.tick()
        except Exception as err:
            log.warning("progress display failed (%r); the run goes on without it", err)
            log.debug("progress display failure", exc_info=True)
            self._timer = None
            self._stop_display()
            return
        self._schedule()

    def _stop_display(self) -> None:
        """Take the display down (its last frame stays on the screen) and give logging back its
        handlers. Never raises: it runs while the run itself may be ending on an error."""
        display, self._display = self._display, None
        restore, self._restore_logging = self._restore_logging, _nothing
        try:
            if display is not None:
                with contextlib.suppress(Exception):
                    display.update(render(self.snapshot()))
                display.stop()
        except Exception as err:
            log.warning("progress display did not stop cleanly: %r", err)
        finally:
            restore()

    def __repr__(self) -> str:
        mode = "live" if self.live else f"every {self.interval_s:g}s"
        return f"<Progress {mode} ticks={self.ticks} totals={self.totals}>"


@contextlib.asynccontextmanager
async def show_progress(
    config: Config,
    stats: Stats,
    limiter: InFlight | None,
    scheduler: Pending,
    *,
    resume: ResumePoint | None = None,
) -> AsyncIterator[Progress]:
    """Count the units to do (from ``resume``'s figures and the rows after its mark, when
    given), then show progress around the block (``run_job`` wraps ``scheduler.run`` in it).
    A stop request (signal) cuts the count short."""
    gen_types = list(config.generation.types)
    stop = threading.Event()
    started = time.monotonic()
    try:
        totals = await asyncio.to_thread(
            count_units,
            config.input.seeds,
            config.input.max_document_chars,
            gen_types,
            scheduler.wanted,
            lambda: stop.is_set() or scheduler.stopping,
            resume=resume,
        )
    finally:
        stop.set()  # cancelled: the thread stops at its next row instead of reading on
    if totals is not None:
        stats.seed_rows = totals.rows
        log.info(
            "%d valid seed rows: %d units, %d of them done before (counted in %.1fs)",
            totals.rows,
            totals.rows * len(gen_types),
            sum(totals.skipped.values()),
            time.monotonic() - started,
        )
    progress = Progress(
        stats,
        gen_types,
        config.limits,
        config.run.progress_interval_s,
        limiter=limiter,
        totals=totals,
    )
    with progress.shown():
        yield progress


def _nothing() -> None:
    pass


def _eta(types: Sequence[TypeFigures], elapsed: float) -> float | None:
    """Seconds left at this run's average unit rate; None while unknown."""
    remaining = [t.remaining for t in types]
    if None in remaining:
        return None
    left = sum(r or 0 for r in remaining)
    if left == 0:
        return 0.0
    done = sum(t.done for t in types)
    return left * elapsed / done if done and elapsed > 0 else None


def _route_logging_through(console: Console) -> Callable[[], None]:
    """While the live display is up, log records bound for the terminal go through its console
    (above the display) instead of garbling it. Returns what puts the handlers back."""
    root = logging.getLogger()
    replaced = [h for h in root.handlers if _writes_to_terminal(h)]
    if not replaced:
        return lambda: None
    handler = RichHandler(console=console, show_path=False, log_time_format="%X")
    handler.setLevel(min(h.level for h in replaced))
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    for old in replaced:
        root.removeHandler(old)
    root.addHandler(handler)

    def restore() -> None:
        root.removeHandler(handler)
        for old in replaced:
            root.addHandler(old)

    return restore


def _writes_to_terminal(handler: logging.Handler) -> bool:
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    return _isatty(handler.stream)


def _isatty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return callable(isatty) and bool(isatty())
    except ValueError:  # a closed stream
        return False
