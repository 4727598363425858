"""One run of the engine: check the paths, resume state, open the teacher, run the pipeline."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from engine.checkpoint import load_checkpoint
from engine.client import HTTPTeacher
from engine.config import Config
from engine.errors import ConfigError
from engine.flows import build_flows
from engine.limits import RequestLimiter
from engine.scheduler import Scheduler
from engine.seeds import read_seeds
from engine.stats import Stats
from engine.writer import OutputWriter

log = logging.getLogger(__name__)


def check_paths(config: Config) -> None:
    """Fail before any request if the seeds cannot be read or the output cannot be written."""
    problems = []
    seeds = config.input.seeds
    if not seeds.is_file():
        problems.append(
            f"input.seeds: no such file: {seeds} (set input.seeds to your seed_data.jsonl)"
        )
    out_dir = config.output.dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        problems.append(f"output.dir: cannot write to {out_dir}: {err.strerror or err}")
    if problems:
        raise ConfigError(problems)


async def run_job(config: Config, stats: Stats) -> None:
    """Generate every unit of ``config`` that the output directory does not already hold."""
    check_paths(config)
    out_dir: Path = config.output.dir
    checkpoint = load_checkpoint(out_dir)
    if checkpoint.done:
        log.info("resuming: %d units already done in %s", len(checkpoint.done), out_dir)
    limiter = RequestLimiter(config.limits.requests_per_minute, config.limits.max_concurrency)
    types = list(config.generation.types)
    async with HTTPTeacher(config.teacher, config.retry, limiter, stats) as teacher:
        log.info("teacher %r, %r", teacher, limiter)
        flows = build_flows(config, teacher)
        writer = OutputWriter(out_dir, types, checkpoint, stats)
        scheduler = Scheduler([flows[t] for t in types], writer, checkpoint, stats, config.workers)
        await scheduler.run(read_seeds(config.input.seeds, config.input.max_document_chars))
