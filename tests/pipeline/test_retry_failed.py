"""Lost items are run again: by a plain re-run (every unit not done, and the ones that lost
items) or ``--retry-failed`` (only the units that lost items); only what they lack is added."""

from __future__ import annotations

from pathlib import Path

from engine.output import report
from engine.output.checkpoint import PROGRESS_FILE, load_checkpoint
from engine.output.report import RunOutcome
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.faults import FaultInjector, error
from tests.support.runs import (
    D,
    assert_complete_output,
    config_for,
    is_document_answer,
    pipeline_requests,
    read_gen,
    seed_count,
)


def bad_request_for_document_answers() -> FaultInjector:
    return FaultInjector(
        lambda seen: (
            error(400, "context too long", code="context_length_exceeded")
            if is_document_answer(seen)
            else None
        )
    )


async def test_retry_failed_sends_only_the_failed_requests(tmp_path: Path) -> None:
    lost = seed_count() * D
    async with running_simulator(SimulatorConfig(fault=bad_request_for_document_answers())) as sim:
        first = Stats()
        await run_job(config_for(sim.base_url, tmp_path), first)
    assert sum(first.failures.values()) == lost
    assert read_gen(tmp_path, "document_based_qa") == []
    assert len(load_checkpoint(tmp_path).failed) == seed_count()

    async with running_simulator(SimulatorConfig()) as sim:
        again = Stats()
        await run_job(config_for(sim.base_url, tmp_path), again, retry_failed=True)
        # The cache answers everything that succeeded before: only the failed items go out
        # (and the preflight's probes).
        assert len(pipeline_requests(sim)) == lost
    assert sum(again.records.values()) == lost
    assert_complete_output(tmp_path)  # every record once; failures.jsonl now empty
    assert len(load_checkpoint(tmp_path).failed) == 0
    # A plain resume afterwards has nothing left to do.
    async with running_simulator(SimulatorConfig()) as sim:
        await run_job(config_for(sim.base_url, tmp_path), Stats())
        assert sim.state.total_requests == 0
    assert len((tmp_path / PROGRESS_FILE).read_bytes().splitlines()) > seed_count() * 4


async def test_retry_failed_with_nothing_failed_does_nothing(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        await run_job(config_for(sim.base_url, tmp_path), Stats())
        sent = sim.state.total_requests
        stats = Stats()
        await run_job(config_for(sim.base_url, tmp_path), stats, retry_failed=True)
        assert sim.state.total_requests == sent
    assert sum(stats.units_done.values()) == 0


async def test_a_plain_rerun_recovers_the_lost_items_and_says_so(tmp_path: Path) -> None:
    lost = seed_count() * D
    async with running_simulator(SimulatorConfig(fault=bad_request_for_document_answers())) as sim:
        await run_job(config_for(sim.base_url, tmp_path), Stats())
    assert read_gen(tmp_path, "document_based_qa") == []

    # The same command once the cause is gone: no flag needed.
    async with running_simulator(SimulatorConfig()) as sim:
        again = Stats()
        await run_job(config_for(sim.base_url, tmp_path), again)
        assert len(pipeline_requests(sim)) == lost  # the rest comes from the cache
    assert_complete_output(tmp_path)
    assert again.lost_before == {"request_rejected: HTTP 400": lost}
    assert again.recovered == lost and not again.still_lost
    assert again.units_done == {"document_based_qa": seed_count()}
    content = report.build(
        config_for("http://x/v1", tmp_path), again, RunOutcome(0, "done", ""), {}
    )
    assert content["lost_items"] == {
        "before": lost,
        "before_by_reason": {"request_rejected: HTTP 400": lost},
        "recovered": lost,
        "still_failing": 0,
        "still_failing_by_reason": {},
    }
    assert (
        f"lost items: {lost} lost by earlier runs (request_rejected: HTTP 400: {lost}), "
        f"{lost} recovered by this run; 0 still failing"
    ) in report.summary(content)


async def test_a_rerun_that_loses_them_again_says_they_still_fail(tmp_path: Path) -> None:
    lost = seed_count() * D
    for _ in range(2):
        faulty = SimulatorConfig(fault=bad_request_for_document_answers())
        async with running_simulator(faulty) as sim:
            stats = Stats()
            await run_job(config_for(sim.base_url, tmp_path), stats)
    assert stats.lost_before == stats.still_lost == {"request_rejected: HTTP 400": lost}
    assert stats.recovered == 0
    # Each item listed once, not once per run.
    assert len((tmp_path / "failures.jsonl").read_bytes().splitlines()) == lost
