"""SIGINT/SIGTERM on a real run (a subprocess against the simulator): clean exit, then resume."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.cli import finish, progress_lines, start_run, wait_for
from tests.support.runs import assert_complete_output, seed_count

TYPES = 4


async def resume_to_completion(out: Path) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        code, text = await finish(await start_run(sim.base_url, out))
    assert code == 0, text
    assert_complete_output(out)
    assert progress_lines(out) == seed_count() * TYPES  # each unit recorded exactly once


async def test_sigint_lets_units_in_flight_finish_then_exits_130(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(latency_mean_s=0.1)) as sim:
        # Two units at a time, so that most units have not started when the signal comes.
        proc = await start_run(sim.base_url, tmp_path, "limits.workers=2", "run.grace_s=20")
        await wait_for(lambda: progress_lines(tmp_path) >= 1, proc)
        proc.send_signal(signal.SIGINT)
        code, text = await finish(proc)
    assert code == 130, text
    assert "taking no new work" in text and "Traceback" not in text
    done = progress_lines(tmp_path)
    # The units in flight finished within the grace period; no new unit was started.
    assert 1 < done < seed_count() * TYPES, done
    await resume_to_completion(tmp_path)


async def test_a_second_sigterm_stops_at_once_and_exits_143(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(latency_mean_s=2.0)) as sim:
        # The pipeline's second signal: no preflight, whose first signal stops at once.
        proc = await start_run(sim.base_url, tmp_path, "run.grace_s=60", flags=("--no-preflight",))
        await wait_for(lambda: sim.state.total_requests >= 1, proc)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        sent = sim.state.total_requests
        proc.send_signal(signal.SIGTERM)
        code, text = await finish(proc)
        # At once: not after the 2 s replies, whose units would then send their next stages
        # (and not after the 60 s grace, which finish() would not wait out).
        assert sim.state.total_requests == sent
    assert code == 143, text
    assert "again: stopping now" in text and "Traceback" not in text
    assert progress_lines(tmp_path) == 0
    await resume_to_completion(tmp_path)


async def test_a_signal_during_the_preflight_stops_at_once_and_exits_143(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(latency_mean_s=2.0)) as sim:
        proc = await start_run(sim.base_url, tmp_path, "run.grace_s=60")
        await wait_for(lambda: sim.state.total_requests >= 1, proc)  # a probe, unanswered
        proc.send_signal(signal.SIGTERM)
        code, text = await finish(proc)
        assert sim.state.total_requests == 1  # nothing after the signal
    assert code == 143, text
    assert "run interrupted (exit 143)" in text and "Traceback" not in text
    assert progress_lines(tmp_path) == 0
    await resume_to_completion(tmp_path)
