"""SIGINT/SIGTERM on a real run (a subprocess against the simulator): clean exit, then resume."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from engine.output.checkpoint import PROGRESS_FILE
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.test_e2e import REPO, SMALL, assert_complete_output, seed_count

TYPES = 4


async def start_run(
    base_url: str, out: Path, *extra: str, flags: tuple[str, ...] = ()
) -> asyncio.subprocess.Process:
    env = {**os.environ, "TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": "sim-teacher"}
    sets = [a for s in [*SMALL, f'output.dir="{out}"', *extra] for a in ("--set", s)]
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", "run", "config/default.toml", *flags, *sets,
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


def progress_lines(out: Path) -> int:
    path = out / PROGRESS_FILE
    return len(path.read_bytes().splitlines()) if path.exists() else 0


async def wait_for(condition: object, proc: asyncio.subprocess.Process) -> None:
    """Poll ``condition()`` (file sizes, server counters) until true; the run must still be on."""
    assert callable(condition)
    async with asyncio.timeout(20):
        while not condition():
            assert proc.returncode is None, "the run ended before the test could interrupt it"
            await asyncio.sleep(0.01)


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    try:
        async with asyncio.timeout(30):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode is not None
    return proc.returncode, output.decode()


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
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code, text = await finish(proc)
        stopped_after = time.monotonic() - started
    assert code == 143, text
    assert stopped_after < 1.5, stopped_after  # not the 60 s grace, not the 2 s replies
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
