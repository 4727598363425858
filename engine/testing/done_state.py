"""A large resume state built by the engine's own pipeline, for tests and benchmarks.

``build_done`` runs the first rows of a seed file through the real seed reader, scheduler,
writer and watermark, as a run does, with flows that finish each unit at once with one short
record (``DoneAtOnce``): an output directory that holds millions of finished units in
minutes, in the formats the engine itself writes (progress.jsonl, state.sqlite, gen files).
Not part of the runtime path: nothing in ``engine`` imports it.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Sequence

from engine.config import Config
from engine.flows import Flow
from engine.flows.planning import StagePlan
from engine.output import manifest
from engine.output.checkpoint import FOLD_AT, load_checkpoint
from engine.output.records import UnitResult, make_record
from engine.output.watermark import RowTracker
from engine.output.writer import OutputWriter
from engine.pipeline.resume import resume_point
from engine.pipeline.scheduler import Scheduler
from engine.pipeline.stats import Stats
from engine.seeds import SeedRow


class DoneAtOnce:
    """A flow of ``gen_type`` that finishes its unit at once with one short record."""

    def __init__(self, gen_type: str, model: str) -> None:
        self.gen_type = gen_type
        self.model = model

    async def run(self, row: SeedRow) -> UnitResult:
        """One record for ``row``: question "Q?", answer "A." (a key fact for key facts)."""
        fact = "F." if self.gen_type == "key_facts_to_qa" else None
        record = make_record(
            row,
            self.gen_type,
            ("q00",),
            document="d",
            question="Q?",
            response="A.",
            model=self.model,
            key_fact=fact,
        )
        return UnitResult(records=[record])

    def plan(self, seed: SeedRow) -> list[StagePlan]:
        """No requests: the unit needs no teacher."""
        return []


async def build_done(
    config: Config, rows: int, *, fold_at: int = FOLD_AT, workers: int = 64
) -> float:
    """Finish every unit of ``config``'s types for the first ``rows`` rows of its seed file,
    into its output directory, as a run would (manifest, scheduler, writer, watermark);
    ``fold_at``: log entries past which the writer folds the log into state.sqlite (a large
    value leaves a long log, as an engine from before state.sqlite did). Seconds taken."""
    started = time.monotonic()
    out, types = config.output.dir, config.generation.types
    checkpoint = load_checkpoint(out, fold_at=fold_at)
    try:
        manifest.check_and_write(out, config, has_output=False, force=False)
        resume = resume_point(
            config.input.seeds, config.input.max_document_chars, types, checkpoint, out
        )
        stats = Stats()
        writer = OutputWriter(
            out, types, checkpoint, stats, fold_at=fold_at, tracker=RowTracker(resume.mark)
        )
        flows: Sequence[Flow] = [DoneAtOnce(t, config.teacher.model) for t in types]
        scheduler = Scheduler(flows, writer, checkpoint, stats, workers=workers, resume=resume)
        with contextlib.closing(resume.seeds()) as all_rows:
            await scheduler.run(itertools.islice(all_rows, rows))
    finally:
        checkpoint.close()
    return time.monotonic() - started
