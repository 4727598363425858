"""``--retry-failed``: run again only the units with failed items; add only what they lack."""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint import PROGRESS_FILE, load_checkpoint
from engine.job import run_job
from engine.simulator import SimulatorConfig, running_simulator
from engine.stats import Stats
from tests.faults import FaultInjector, error
from tests.test_e2e import D, assert_complete_output, config_for, read_gen, seed_count
from tests.test_faults import is_document_answer


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
        # The cache answers everything that succeeded before: only the failed items go out.
        assert sim.state.total_requests == lost
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
