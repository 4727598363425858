"""One run of the engine: check the paths, resume state, open the teacher, run the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType

from engine.budget import PassBudget
from engine.config import GEN_TYPES, Config
from engine.embedded.resolve import resolve_teacher
from engine.errors import ConfigError
from engine.flows import build_flows, stage_settings
from engine.flows.admission import Admission
from engine.output import manifest
from engine.output.checkpoint import Checkpoint, UnitSet, gen_name, load_checkpoint
from engine.output.files import write_problem
from engine.output.lock import DirectoryLock
from engine.output.watermark import RowTracker
from engine.output.writer import OutputWriter
from engine.pipeline import collector
from engine.pipeline.breaker import Breaker
from engine.pipeline.causes import RunSettings, likely_fix
from engine.pipeline.preflight import Findings
from engine.pipeline.preflight import check as preflight_check
from engine.pipeline.resume import ResumePoint, resume_point
from engine.pipeline.scheduler import Ready, Scheduler, UnitRunner, any_wanted, wanted
from engine.pipeline.shutdown import Shutdown
from engine.pipeline.stats import CacheSnapshot, Stats, TeacherSnapshot
from engine.progress.display import InFlight, show_progress
from engine.seeds import seed_file_problem
from engine.teacher.cache import CACHE_FILE, ResponseCache
from engine.teacher.client import HTTPTeacher
from engine.teacher.limits import RequestLimiter

log = logging.getLogger(__name__)


def check_paths(config: Config) -> None:
    """Fail before any request if the seeds cannot be read or the output cannot be written."""
    problems = []
    if problem := seed_file_problem(config.input.seeds, config.input.max_document_chars):
        problems.append(problem)
    if problem := _unwritable_dir("output.dir", config.output.dir):
        problems.append(problem)
    # An output.cache that is set but cannot be written: the run would go on without the
    # cache (a warning at its start), and a re-run after a crash would send every request again.
    if config.output.cache and (
        problem := _unwritable_dir("output.cache", Path(config.output.cache).parent)
    ):
        problems.append(problem)
    if problems:
        raise ConfigError(problems)


def _unwritable_dir(key: str, directory: Path) -> str:
    """Why ``directory`` (for config ``key``) cannot be created or written ("" when it can);
    ``OutputWriteError`` when the disk is full or read-only (``engine.output.files``)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except (FileExistsError, NotADirectoryError):
        return f"{key}: {directory} is, or is inside, a file: give a folder"
    except OSError as err:
        if fault := write_problem(directory, err):
            raise fault from err  # the disk, not the configuration: exit 1, as mid-run
        return f"{key}: cannot write to {directory}: {err.strerror or err}"
    return ""


def make_breaker(config: Config) -> Breaker:
    """The run's breaker, with the fixes it suggests worded for ``config``'s keys."""
    run = RunSettings(
        stage_settings(config),
        config.teacher.structured_output,
        config.teacher.supports_n,
        config.teacher.model,
        config.teacher.urls,
    )
    retry = config.retry
    return Breaker(
        documents=retry.breaker_documents,
        window=retry.breaker_window,
        share=retry.breaker_share,
        reject_share=retry.breaker_reject_share,
        fixes=lambda signature, said: likely_fix(signature, said, run),
    )


async def _checked(config: Config, teacher: HTTPTeacher, stats: Stats) -> Config:
    """The preflight, before any seed row: the config to run with, the client's wire set."""
    config, findings = await preflight_check(config, teacher, stats)
    teacher.wire = findings.wire
    for url, why in findings.down.items():
        teacher.endpoints.mark_down(url, f"{why} in the preflight")
    if findings.adapted:  # a durable replace (two fsyncs): off the loop
        await asyncio.to_thread(manifest.record_adapted, config.output.dir, findings.adapted)
    return config


def _work_to_do(
    resume: ResumePoint, types: Sequence[str], want: Callable[[str, str], bool]
) -> bool:
    """Whether any unit is to run (a finished output needs no preflight)."""
    with contextlib.closing(resume.seeds()) as seeds:
        return any_wanted(seeds, types, want)


class _FirstSignal:
    """What the first SIGINT/SIGTERM does: during the preflight, cancel at once (there is
    nothing to finish); once units run, ``scheduler.stop`` (no new units; grace for the rest)."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action

    def __call__(self) -> None:
        self.action()


def _wants(checkpoint: Checkpoint, only: UnitSet | None, redo: UnitSet, doc: str, t: str) -> bool:
    return wanted(checkpoint, only, redo, (doc, t))


def cache_path(config: Config) -> Path:
    """Where the response cache lives: ``output.cache``, or ``cache.sqlite`` in the output."""
    return Path(config.output.cache) if config.output.cache else config.output.dir / CACHE_FILE


async def run_job(
    config: Config,
    stats: Stats,
    *,
    fresh: bool = False,
    force: bool = False,
    cache: bool = True,
    retry_failed: bool = False,
    preflight: bool = True,
) -> int | None:
    """Generate every unit of ``config`` that the output directory does not already hold, and
    again every unit that lost items in an earlier run.

    Raises ``OutputInUse`` at once if another run is using the output directory.

    ``fresh`` moves existing output aside first; ``force`` adds to output made with other
    generation settings; ``cache=False`` neither reads nor writes the response cache;
    ``retry_failed`` runs only the units with items in failures.jsonl, adding the records they
    lack; ``preflight=False`` skips the teacher check (``engine.pipeline.preflight``). Returns
    the exit code a signal asked for (130/143), or None when the run went to its end.
    """
    check_paths(config)
    options = {
        "force": force,
        "cache": cache,
        "retry_failed": retry_failed,
        "preflight": preflight,
    }
    with _own_output(config, fresh=fresh):
        # The whole run with the config resolve yields: for the embedded demo, its server's
        # (mode "http"), so that the manifest records the settings actually used.
        async with resolve_teacher(config) as served:
            return await _generate(served, stats, **options)


@contextlib.contextmanager
def _own_output(config: Config, *, fresh: bool) -> Iterator[None]:
    """Hold the output directory's lock (``engine.output.lock``) for the block; ``OutputInUse`` if
    another run holds it. ``fresh`` moves the old output aside under the lock, so that a
    directory a run is still writing is never moved from under it."""
    out_dir = config.output.dir
    lock = DirectoryLock.acquire(out_dir)
    try:
        if fresh and manifest.move_aside(out_dir) is not None:
            check_paths(config)  # creates the new, empty directory
            # Taken before the old one (moved aside with its directory) is let go.
            new = DirectoryLock.acquire(out_dir)
            lock.release()
            lock = new
        yield
    finally:
        lock.release()


async def probe_teacher(config: Config, stats: Stats) -> Findings:
    """Only the preflight (``validate --probe``), against the teacher ``resolve_teacher``
    yields (the embedded one is started for it). Raises ``FatalRunError`` when the teacher
    fails the check, ``ConfigError`` when the embedded one is needed but not installed."""
    async with resolve_teacher(config) as served:
        limits = served.limits
        limiter = RequestLimiter(limits.requests_per_minute, limits.max_concurrency)
        async with HTTPTeacher(
            served.teacher, served.retry, limiter, stats=stats.teacher
        ) as teacher:
            return (await preflight_check(served, teacher, stats))[1]


async def _generate(
    config: Config,
    stats: Stats,
    *,
    force: bool,
    cache: bool,
    retry_failed: bool,
    preflight: bool,
) -> int | None:
    """``run_job`` once the paths are checked and the teacher is an HTTP endpoint."""
    # Off the event loop: a long log is folded into state.sqlite here.
    checkpoint = await asyncio.to_thread(_resume, config, force=force)
    try:
        return await _run_pipeline(
            config, stats, checkpoint, cache=cache, retry_failed=retry_failed, preflight=preflight
        )
    finally:
        checkpoint.close()


async def _run_pipeline(
    config: Config,
    stats: Stats,
    checkpoint: Checkpoint,
    *,
    cache: bool,
    retry_failed: bool,
    preflight: bool,
) -> int | None:
    """The run itself, over ``checkpoint`` (loaded, its manifest checked)."""
    types = list(config.generation.types)
    # Units that lost items: run again, plain re-run or --retry-failed alike, so that fixing
    # the config and running the same command recovers them.
    redo = checkpoint.failed.of_types(types)
    only = redo if retry_failed else None
    _log_resume(config, checkpoint, only, redo)
    if only is not None and not only:
        return None
    seeds = config.input.seeds
    resume = await asyncio.to_thread(
        resume_point,
        seeds,
        config.input.max_document_chars,
        types,
        checkpoint,
        config.output.dir,
        only if only is not None else redo,
    )
    limits = config.limits
    limiter = RequestLimiter(
        limits.requests_per_minute, limits.max_concurrency, limits.tokens_per_minute
    )
    task = asyncio.current_task()
    assert task is not None
    stop = _FirstSignal(task.cancel)
    shutdown = Shutdown(config.run.grace_s, stop)
    async with contextlib.AsyncExitStack() as stack:
        replies = await _open_cache(config, stats, stack) if cache else None
        teacher = await stack.enter_async_context(
            HTTPTeacher(config.teacher, config.retry, limiter, stats=stats.teacher, cache=replies)
        )
        # However the run ends, the report shows the endpoints and the limiter as they were.
        stack.callback(_snapshot, stats, teacher, limiter)
        stack.enter_context(shutdown.installed(task))
        stack.push(partial(_absorb_own_cancel, shutdown, task))
        wants = partial(_wants, checkpoint, only, redo)
        if preflight and await asyncio.to_thread(_work_to_do, resume, types, wants):
            config = await _checked(config, teacher, stats)
        log.info("teacher %r, %r, %r", teacher, limiter, replies)
        # The event loop's time per pass for the steps of the flows and the writer.
        budget = PassBudget()
        runners, gauge, ready = await _runners(
            config, stats, teacher, stack, cache=cache, budget=budget
        )
        writer = await asyncio.to_thread(
            partial(
                OutputWriter,
                config.output.dir,
                types,
                checkpoint,
                stats,
                retrying=redo,
                # --retry-failed runs only some units: the seed file is not finished behind it.
                tracker=None if only is not None else RowTracker(resume.mark),
                rejects_from=resume.mark.rejects_end if resume.skips else None,
                budget=budget,
            )
        )
        scheduler = Scheduler(
            runners,
            writer,
            checkpoint,
            stats,
            config.workers,
            only=only,
            redo=redo,
            resume=resume,
            ready=ready,
        )
        stop.action = scheduler.stop
        stats.teacher_model = teacher.model
        stack.enter_context(collector.tuned())  # after start-up: see engine.pipeline.collector
        async with show_progress(config, stats, gauge or limiter, scheduler, resume=resume):
            await scheduler.run(resume.seeds())
    return shutdown.exit_code


async def _open_cache(
    config: Config, stats: Stats, stack: contextlib.AsyncExitStack
) -> ResponseCache:
    """The response cache, opened off the loop and closed (with its figures kept for the
    report) when ``stack`` unwinds."""
    bound = config.output.cache_max_bytes
    replies = await asyncio.to_thread(ResponseCache.open, cache_path(config), max_bytes=bound)

    async def close() -> None:
        await replies.aclose()
        stats.cache_at_end = CacheSnapshot(
            str(replies.path), replies.size_bytes, bound, replies.stored, replies.evicted
        )

    stack.push_async_callback(close)
    return replies


async def _runners(
    config: Config,
    stats: Stats,
    teacher: HTTPTeacher,
    stack: contextlib.AsyncExitStack,
    *,
    cache: bool,
    budget: PassBudget,
) -> tuple[Sequence[UnitRunner], InFlight | None, Ready | None]:
    """How units run: by the flows in this process, or (``run.backend = "ray"``) by worker
    actors on a Ray cluster, which ``stack`` stops when the run ends; with what the progress
    display reads requests in flight from when it is not the run's own limiter, and what
    the scheduler awaits before it starts a unit (the flows' admission control has room)."""
    types = config.generation.types
    if config.run.backend == "ray":
        # Imported here only: a local run never imports ray (a layering contract).
        from engine.distributed.backend import remote_units

        own_cache = cache_path(config) if cache else None
        units = await stack.enter_async_context(
            remote_units(config, stats, teacher.wire, own_cache)
        )
        return units.flows(types), units, None
    admission = Admission.for_concurrency(config.limits.max_concurrency)
    flows = build_flows(
        config,
        teacher,
        tally=stats.count_reply,
        breaker=make_breaker(config),
        admission=admission,
        budget=budget,
    )
    return [flows[t] for t in types], None, admission.room


def _resume(config: Config, *, force: bool) -> Checkpoint:
    """The output directory's checkpoint, once its manifest agrees with ``config`` (or
    ``force``); ``ConfigError`` when it does not (``engine.output.manifest``)."""
    out_dir = config.output.dir
    checkpoint = load_checkpoint(out_dir)
    try:
        with_records = {t for t in GEN_TYPES if checkpoint.lengths.get(gen_name(t), 0) > 0}
        manifest.check_and_write(
            out_dir,
            config,
            has_output=bool(checkpoint.done),
            force=force,
            with_records=with_records,
        )
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint


def _log_resume(
    config: Config, checkpoint: Checkpoint, only: UnitSet | None, redo: UnitSet
) -> None:
    if only is not None:
        log.info("--retry-failed: %d units with failed items to run again", len(only))
    elif checkpoint.done:
        log.info(
            "resuming: %d units already done in %s; %d of them lost items and run again",
            len(checkpoint.done),
            config.output.dir,
            len(redo),
        )


def _snapshot(stats: Stats, teacher: HTTPTeacher, limiter: RequestLimiter) -> None:
    """Keep what the report shows of the endpoints and the limiter, read once at the end."""
    stats.teacher_at_end = TeacherSnapshot(
        endpoints=teacher.endpoints.summary(),
        concurrency=limiter.concurrency,
        concurrency_cuts=limiter.adaptive.decreases,
        concurrency_max=limiter.max_concurrency,
    )


def _absorb_own_cancel(
    shutdown: Shutdown,
    task: asyncio.Task[object],
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> bool:
    """An exit callback: a cancellation that a signal asked for (``shutdown``) ends the run
    normally, the writer having committed what finished; any other goes on."""
    if exc_type is None or not issubclass(exc_type, asyncio.CancelledError):
        return False
    if shutdown.signum is None:
        return False
    task.uncancel()
    return True
