"""A worker of a distributed run: the flows, its own HTTP client and response cache, its
share of the run's limiter; one unit in, its result out.

``UnitWorker`` is plain asyncio: ``engine.distributed.ray_backend`` makes it a Ray actor, tests
use it as it is. The driver sends it a seed row and a type; it runs that type's flow as a
local run would and answers with a ``UnitReply``: the ``UnitResult`` (the driver's writer
writes it), what its client sent and got since its last reply (``Tally``, added to the run's
statistics), or the fatal error that must stop the run, as words (engine errors do not
survive pickling).

The API key is never sent to a worker: it reads ``TEACHER_MODEL_API_KEY`` from its own
process environment, which its node gives it (README, "Running on a Ray cluster").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from engine.config import Config, TeacherConfig
from engine.distributed.lease import LeaseCall, LeasedLimiter, QuotaClient
from engine.distributed.quota import share_of
from engine.errors import ConfigError, FatalRunError
from engine.flows import Flow, build_flows
from engine.output.records import UnitResult
from engine.pipeline.job import make_breaker
from engine.pipeline.stats import Stats
from engine.seeds import SeedRow
from engine.teacher.cache import ResponseCache
from engine.teacher.client import HTTPTeacher
from engine.teacher.protocol import Wire

log = logging.getLogger(__name__)

KEY_VARIABLE = "TEACHER_MODEL_API_KEY"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What the driver gives a worker: the run's config without its key (``config``), how
    requests are written for this server (``wire``, from the preflight), the worker's index
    among ``workers``, whether the driver has a key (so the worker must find one), the
    ledger's slice sizes, and its response cache file (None: no cache)."""

    config: Config
    wire: Wire
    index: int
    workers: int
    key_expected: bool
    slice_requests: int
    slice_tokens: int
    cache: Path | None


def settings_for(
    config: Config,
    wire: Wire,
    index: int,
    workers: int,
    *,
    slices: tuple[int, int],
    cache: Path | None,
) -> WorkerSettings:
    """``WorkerSettings`` for worker ``index``: ``config`` loses its API key here, so that
    the key is never a task argument; ``cache`` is the run's cache file, each worker
    keeping its own beside it (``cache-worker<N>.sqlite``)."""
    keyless = config.model_copy(
        update={"teacher": config.teacher.model_copy(update={"api_key": None})}
    )
    own = None if cache is None else cache.with_name(f"{cache.stem}-worker{index}{cache.suffix}")
    return WorkerSettings(
        keyless,
        wire,
        index,
        workers,
        key_expected=config.teacher.api_key is not None,
        slice_requests=slices[0],
        slice_tokens=slices[1],
        cache=own,
    )


@dataclass
class Tally:
    """What one worker's client sent and got, and its reply checks counted, since its last
    report (``engine.teacher.stats.RequestStats`` and ``Stats.replies`` / ``rejected``)."""

    requests_sent: int = 0
    cache_hits: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    rejected: dict[str, Counter[str]] = field(default_factory=dict)

    @classmethod
    def take(cls, stats: Stats) -> Tally:
        """The counts in ``stats`` (a worker's own), which then start again from zero."""
        teacher = stats.teacher
        tally = cls(
            teacher.requests_sent,
            teacher.cache_hits,
            teacher.retries,
            teacher.prompt_tokens,
            teacher.completion_tokens,
            stats.replies,
            stats.rejected,
        )
        teacher.requests_sent = teacher.cache_hits = 0
        teacher.prompt_tokens = teacher.completion_tokens = 0
        teacher.retries = Counter()
        stats.replies = Counter()
        stats.rejected = {}
        return tally

    def add_to(self, stats: Stats) -> None:
        """Add these counts to the run's ``stats``."""
        teacher = stats.teacher
        teacher.requests_sent += self.requests_sent
        teacher.cache_hits += self.cache_hits
        teacher.retries.update(self.retries)
        teacher.prompt_tokens += self.prompt_tokens
        teacher.completion_tokens += self.completion_tokens
        stats.replies.update(self.replies)
        for stage, checks in self.rejected.items():
            stats.rejected.setdefault(stage, Counter()).update(checks)


@dataclass(frozen=True, slots=True)
class UnitReply:
    """A worker's answer for one unit: its ``result`` (None when ``fatal``), the ``tally``
    since the worker's last reply, ``fatal``: why the run must stop, in words ("" if not),
    and the worker's requests in flight and share of the concurrency limit just then."""

    result: UnitResult | None
    tally: Tally
    fatal: str = ""
    in_flight: int = 0
    concurrency: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Where a worker runs: its index, host name, process id and cluster node ("" outside a
    cluster)."""

    index: int
    host: str
    pid: int
    node: str = ""


@dataclass
class _Opened:
    flows: dict[str, Flow]
    teacher: HTTPTeacher
    limiter: LeasedLimiter
    stack: contextlib.AsyncExitStack


class UnitWorker:
    """Runs units of any type for the driver; opens its client on first use.

    ``lease`` reaches the run's ledger (``engine.distributed.quota``); ``environ`` is where
    the API key is read (default: this process's environment).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        lease: LeaseCall,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self._lease = lease
        self._environ = os.environ if environ is None else environ
        self._stats = Stats()
        self._opened: _Opened | None = None
        self._problem = ""
        self._opening: asyncio.Lock | None = None
        self.units = 0

    async def ready(self) -> WorkerInfo:
        """Open the client (once) and say where this worker runs. Raises ``FatalRunError``
        when it cannot work (no key on this node, a config its node cannot use)."""
        await self._open()
        return WorkerInfo(self.settings.index, socket.gethostname(), os.getpid(), self.node())

    def node(self) -> str:
        """The cluster node this worker runs on ("" here; the Ray actor says which)."""
        return ""

    async def run_unit(self, seed: SeedRow, gen_type: str) -> UnitReply:
        """Generate the unit (``seed``, ``gen_type``) as a local run would."""
        try:
            opened = await self._open()
            result = await opened.flows[gen_type].run(seed)
        except FatalRunError as err:
            return UnitReply(None, Tally.take(self._stats), fatal=str(err))
        self.units += 1
        limiter = opened.limiter
        return UnitReply(
            result, Tally.take(self._stats), "", limiter.in_flight, limiter.concurrency
        )

    async def close(self) -> dict[str, dict[str, int]]:
        """Report the outcomes not yet reported and close the client; the endpoints as this
        worker used them (``EndpointPool.summary``)."""
        opened, self._opened = self._opened, None
        if opened is None:
            return {}
        summary = opened.teacher.endpoints.summary()
        await opened.stack.aclose()
        return summary

    async def _open(self) -> _Opened:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._problem:
                raise FatalRunError(self._problem)
            if self._opened is None:
                try:
                    self._opened = await self._start()
                except (ConfigError, FatalRunError) as err:
                    self._problem = f"worker {self.settings.index} on {socket.gethostname()}: {err}"
                    raise FatalRunError(self._problem) from None
            return self._opened

    async def _start(self) -> _Opened:
        s = self.settings
        config = s.config.model_copy(update={"teacher": self._teacher()})
        limits = config.limits
        quota = QuotaClient(self._lease, s.slice_requests, s.slice_tokens)
        share = share_of(limits.max_concurrency, s.workers, s.index)
        limiter = LeasedLimiter(quota, limits.requests_per_minute, share, limits.tokens_per_minute)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(quota.close)
            cache = await self._open_cache(s.cache, stack) if s.cache else None
            teacher = await stack.enter_async_context(
                HTTPTeacher(
                    config.teacher, config.retry, limiter, stats=self._stats.teacher, cache=cache
                )
            )
            teacher.wire = s.wire
            flows = build_flows(
                config, teacher, tally=self._stats.count_reply, breaker=make_breaker(config)
            )
            log.info("worker %d ready: %r, %r, %r", s.index, teacher, limiter, cache)
            return _Opened(flows, teacher, limiter, stack.pop_all())
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open_cache(self, path: Path, stack: contextlib.AsyncExitStack) -> ResponseCache:
        """This worker's response cache at ``path``, opened off the loop and closed when
        ``stack`` unwinds; the workers' files share ``output.cache_max_gb`` equally."""
        s = self.settings
        bound = s.config.output.cache_max_bytes // max(1, s.workers)
        cache = await asyncio.to_thread(ResponseCache.open, path, max_bytes=bound)
        stack.push_async_callback(cache.aclose)
        return cache

    def _teacher(self) -> TeacherConfig:
        """The run's teacher settings with the key of this worker's environment."""
        key = self._environ.get(KEY_VARIABLE, "").strip()
        if self.settings.key_expected and not key:
            raise ConfigError(
                [
                    f"{KEY_VARIABLE} is not set in this node's environment. The key never "
                    "travels through Ray (its runtime_env is logged and shown on the "
                    "dashboard): set it where the node starts (the environment of `ray "
                    "start`, or a Kubernetes Secret in the head and worker pods' env)"
                ]
            )
        raw = self.settings.config.teacher.model_dump()
        try:
            return TeacherConfig.model_validate({**raw, "api_key": key or None})
        except ValidationError as err:
            problems = [str(e["msg"]) for e in err.errors()]
            raise ConfigError(problems) from None

    def __repr__(self) -> str:
        state = "open" if self._opened is not None else "closed"
        return (
            f"<UnitWorker {self.settings.index}/{self.settings.workers} {state} units={self.units}>"
        )
