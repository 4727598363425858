"""Resuming from the watermark: rows before it are not read again (only those whose units lost
items, at their recorded offsets), rows after it are, and the output is the same as a run that
read everything: each record once, duplicates and rejects counted as before."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest

from engine.config import Config
from engine.output.checkpoint import load_checkpoint
from engine.output.state import STATE_FILE
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.plan import make_plan
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.faults import FaultInjector, Hang, Seen, error
from tests.support.runs import as_before_state, config_for, corpus, lines, pipeline_requests

DOCS = 60
LOST, HUNG, COPY_OF, COPY = 20, 55, 10, 58  # rows (line numbers) the scenario picks
MESSED = 50  # a row before the watermark, past the 64 KiB the fingerprint hashes
TYPE = "document_based_qa"


def seeds_with_a_duplicate(path: Path) -> Path:
    """``DOCS`` rows of ~1.4 KB; row COPY repeats row COPY_OF's document."""
    corpus(path, DOCS)
    rows = path.read_bytes().splitlines(keepends=True)
    rows[COPY - 1] = rows[COPY_OF - 1]
    path.write_bytes(b"".join(rows))
    return path


def config(base_url: str, out: Path, seeds: Path) -> Config:
    return config_for(
        base_url,
        out,
        f'input.seeds="{seeds}"',
        f"generation.types=['{TYPE}']",
        "generation.document_based_qa.questions=1",
    )


def about(row: int) -> str:
    return f"Part {row}. "


def first_run_plan(hang: Hang) -> FaultInjector:
    """Row LOST's requests are refused (its unit loses its item); row HUNG's never answered."""

    def plan(seen: Seen) -> object:
        if about(LOST) in seen.prompt:
            return error(400, "refused for the test")
        if about(HUNG) in seen.prompt:
            return hang()
        return None

    return FaultInjector(plan)  # type: ignore[arg-type]


async def stopped_run(out: Path, seeds: Path) -> None:
    """A run over the seeds cancelled once every unit but row HUNG's is written."""
    hang = Hang(60)
    async with running_simulator(SimulatorConfig(fault=first_run_plan(hang))) as sim:
        stats = Stats()
        job = asyncio.create_task(run_job(config(sim.base_url, out, seeds), stats, preflight=False))
        async with asyncio.timeout(20):
            while sum(stats.units_done.values()) < DOCS - 2:  # all but HUNG and the duplicate
                assert not job.done(), job
                await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        hang.release()


def mess_up_in_place(path: Path, row: int) -> None:
    """Overwrite a row with invalid bytes of the same length, keeping size and mtime: a run
    that parses it again rejects it."""
    stat = path.stat()
    rows = path.read_bytes().splitlines(keepends=True)
    rows[row - 1] = b"#" * (len(rows[row - 1]) - 1) + b"\n"
    path.write_bytes(b"".join(rows))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


async def test_a_resume_starts_at_the_watermark_and_reads_again_only_what_lost_items(
    tmp_path: Path,
) -> None:
    seeds = seeds_with_a_duplicate(tmp_path / "seeds.jsonl")
    out = tmp_path / "out"
    await stopped_run(out, seeds)
    checkpoint = load_checkpoint(out)
    mark = checkpoint.watermark
    checkpoint.close()
    assert mark is not None and (mark.line_no, mark.rows) == (HUNG, HUNG - 1)
    mess_up_in_place(seeds, MESSED)

    async with running_simulator() as sim:
        stats = Stats()
        await run_job(config(sim.base_url, out, seeds), stats, preflight=False)
        # Row LOST again (read at its offset), row HUNG: a question and an answer each.
        prompts = [log.prompt_head for log in pipeline_requests(sim)]
        assert len(prompts) == 4, prompts
    assert stats.rejects == 1  # the duplicate only: row MESSED was never parsed again
    assert stats.units_done[TYPE] == 2 and stats.units_skipped[TYPE] == DOCS - 1 - 2
    assert stats.seed_rows == DOCS - 1  # the count pass took the rows before the mark as read
    records = lines(out / TYPE / "gen.jsonl")
    assert len({r["id"] for r in records}) == len(records) == DOCS - 1
    assert (out / "failures.jsonl").read_bytes() == b""
    [reject] = lines(out / "rejects.jsonl")
    assert (
        reject["line"] == COPY
        and reject["reason"] == f"duplicate document (same as line {COPY_OF})"
    )
    assert make_plan(config(sim.base_url, out, seeds)).rejects == 1


async def test_a_seed_file_that_changed_is_read_from_the_top(tmp_path: Path) -> None:
    seeds = seeds_with_a_duplicate(tmp_path / "seeds.jsonl")
    out = tmp_path / "out"
    await stopped_run(out, seeds)
    extra = orjson.loads(seeds.read_bytes().splitlines()[0])
    with seeds.open("ab") as f:  # more rows arrived, one of them a copy of row 3
        for n in (1, 2):
            f.write(orjson.dumps({**extra, "document": f"New part {n}. {extra['document']}"}))
            f.write(b"\n")
        f.write(seeds.read_bytes().splitlines(keepends=True)[2])

    async with running_simulator() as sim:
        stats = Stats()
        await run_job(config(sim.base_url, out, seeds), stats, preflight=False)
    assert stats.units_done[TYPE] == 4  # LOST, HUNG and the two new rows
    assert stats.rejects == 2
    records = lines(out / TYPE / "gen.jsonl")
    assert len({r["id"] for r in records}) == len(records) == DOCS - 1 + 2
    reasons = {r["line"]: r["reason"] for r in lines(out / "rejects.jsonl")}
    assert reasons == {
        COPY: f"duplicate document (same as line {COPY_OF})",
        DOCS + 3: "duplicate document (same as line 3)",
    }


async def test_plan_counts_the_rows_before_the_watermark_without_reading_them(
    tmp_path: Path,
) -> None:
    seeds = seeds_with_a_duplicate(tmp_path / "seeds.jsonl")
    out = tmp_path / "out"
    await stopped_run(out, seeds)
    before = make_plan(config("http://127.0.0.1:9/v1", out, seeds))
    mess_up_in_place(seeds, MESSED)
    after = make_plan(config("http://127.0.0.1:9/v1", out, seeds))
    assert (after.rows, after.rejects, after.done) == (before.rows, before.rejects, before.done)
    assert (after.rows, after.rejects, after.done) == (DOCS - 1, 1, DOCS - 2)
    assert after.total() == before.total()


async def test_an_output_directory_from_before_the_state_resumes_with_nothing_to_redo(
    tmp_path: Path,
) -> None:
    """What an engine from before state.sqlite left: progress.jsonl alone, its entries without
    seed positions. A run over it asks nothing again and leaves the output as it was."""
    seeds, out = corpus(tmp_path / "seeds.jsonl", 12), tmp_path / "out"
    async with running_simulator() as sim:
        await run_job(config_for(sim.base_url, out, f'input.seeds="{seeds}"'), Stats())
        assert (out / STATE_FILE).exists()
        as_before_state(out)
        gen = {p: p.read_bytes() for p in out.glob("*/gen.jsonl")}
        sent = len(pipeline_requests(sim))
        stats = Stats()
        await run_job(config_for(sim.base_url, out, f'input.seeds="{seeds}"'), stats)
        assert len(pipeline_requests(sim)) == sent
    assert sum(stats.units_skipped.values()) == 12 * 4
    assert {p: p.read_bytes() for p in out.glob("*/gen.jsonl")} == gen
    checkpoint = load_checkpoint(out)
    assert len(checkpoint.done) == 12 * 4
    checkpoint.close()
