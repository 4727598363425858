"""kill -9 while a long progress log is folded into state.sqlite, then resume: exactly once.

An output directory holding ``ROWS`` finished rows (built by the engine's own writer with the
fold held back, so that its log is long, as an engine from before state.sqlite left it) is
resumed by ``python -m engine run``, which folds the log at start in chunks. The run is
SIGKILLed at points of the fold chosen by watching state.sqlite (a chunk committed, a chunk's
transaction under way, seeded random sizes on the way), then the same command runs to the
end: every earlier unit is still done and none is asked again, the new rows' units are done
once, every record is in its file once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
import pytest_asyncio

from engine.config import Config, load_config
from engine.output.checkpoint import FOLD_AT, PROGRESS_FILE, load_checkpoint, read_checkpoint
from engine.output.state import STATE_FILE
from engine.testing.done_state import build_done
from engine.testing.simulator import RunningSimulator, running_simulator
from tests.support.cli import DEFAULT_TOML, set_args, start_engine, teacher_env
from tests.support.runs import EXPECTED_PER_DOC, REPO, REQUESTS_PER_DOC, SMALL, corpus

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

ROWS = 10_000  # 40,000 log entries: four times FOLD_AT, eight fold transactions
NEW = 3  # rows after them, run against the simulator once the fold is done
TYPES = list(EXPECTED_PER_DOC)
POLL_S = 0.001
RUN_TIMEOUT_S = 60.0
POINT_SEED = 20261129
Check = Callable[[Path], bool]


def overrides(out: Path, seeds: Path) -> list[str]:
    return [*SMALL, f'output.dir="{out}"', f'input.seeds="{seeds}"']


def build_config(out: Path, seeds: Path) -> Config:
    env = {"TEACHER_MODEL_BASE_URL": "http://127.0.0.1:9/v1", "TEACHER_MODEL_NAME": "sim-teacher"}
    return load_config(REPO / "config" / "default.toml", overrides(out, seeds), environ=env)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(seed file, output directory with ROWS finished rows and the whole log unfolded)."""
    base = tmp_path_factory.mktemp("fold")
    seeds = corpus(base / "seeds.jsonl", ROWS + NEW)
    out = base / "done"
    await build_done(build_config(out, seeds), ROWS, fold_at=10**9)
    assert (out / PROGRESS_FILE).read_bytes().count(b"\n") == ROWS * len(TYPES) > FOLD_AT
    return seeds, out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sim() -> AsyncIterator[RunningSimulator]:
    async with running_simulator() as running:
        yield running


@pytest.fixture(scope="module")
def state_sizes(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> range:
    """state.sqlite's size before the fold and after it (folded here, in a copy)."""
    _, done = built
    copy = tmp_path_factory.mktemp("sizes") / "out"
    shutil.copytree(done, copy)
    before = (copy / STATE_FILE).stat().st_size
    load_checkpoint(copy).close()
    return range(before, (copy / STATE_FILE).stat().st_size)


async def run(sim: RunningSimulator, seeds: Path, out: Path) -> asyncio.subprocess.Process:
    args = ["run", DEFAULT_TOML, "--no-preflight", *set_args(*overrides(out, seeds))]
    with (out.parent / "engine.log").open("ab") as log:
        return await start_engine(*args, env=teacher_env(sim.base_url), output=log)


async def kill_when(proc: asyncio.subprocess.Process, out: Path, check: Check) -> bool:
    """SIGKILL ``proc`` as soon as ``check(out)`` holds; whether the log was still unfolded
    then (False: the fold ended before the point was seen)."""
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            # Polled: nothing of the engine's can be awaited; the files are what is watched.
            while proc.returncode is None:
                if check(out):
                    break
                await asyncio.sleep(POLL_S)
            unfolded = (out / PROGRESS_FILE).stat().st_size > 0
            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL, "the run ended before the point"
            return unfolded
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def state_size(out: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return (out / STATE_FILE).stat().st_size
    return 0


def in_transaction(out: Path) -> bool:
    return (out / f"{STATE_FILE}-journal").exists()


def assert_exactly_once(out: Path) -> None:
    """Every unit of every row done once, every record in its file once."""
    for gen_type, per_doc in EXPECTED_PER_DOC.items():
        lines = (out / gen_type / "gen.jsonl").read_bytes().splitlines()
        ids = [orjson.loads(line)["id"] for line in lines]
        assert len(ids) == len(set(ids)) == ROWS + NEW * per_doc, gen_type
    checkpoint = read_checkpoint(out)
    assert len(checkpoint.done) == (ROWS + NEW) * len(TYPES)
    checkpoint.close()


async def kill_then_resume(
    sim: RunningSimulator, built: tuple[Path, Path], out: Path, check: Check
) -> None:
    seeds, done = built
    shutil.copytree(done, out)
    sent = sim.state.total_requests
    unfolded = await kill_when(await run(sim, seeds, out), out, check)
    assert unfolded, "the kill did not land during the fold"
    assert sim.state.total_requests == sent  # killed before any work
    proc = await run(sim, seeds, out)
    async with asyncio.timeout(RUN_TIMEOUT_S):
        assert await proc.wait() == 0, (out.parent / "engine.log").read_text()[-3000:]
    # Only the new rows' units were asked for: no earlier unit was taken for undone.
    assert sim.state.total_requests - sent == NEW * REQUESTS_PER_DOC
    assert (out / PROGRESS_FILE).stat().st_size < (done / PROGRESS_FILE).stat().st_size
    assert_exactly_once(out)


async def test_kill_after_the_first_chunk_is_committed(
    sim: RunningSimulator, built: tuple[Path, Path], state_sizes: range, tmp_path: Path
) -> None:
    grown = state_sizes.start + len(state_sizes) // 8
    await kill_then_resume(sim, built, tmp_path / "out", lambda out: state_size(out) >= grown)


async def test_kill_inside_a_chunk_transaction(
    sim: RunningSimulator, built: tuple[Path, Path], state_sizes: range, tmp_path: Path
) -> None:
    grown = state_sizes.start + len(state_sizes) // 4

    def point(out: Path) -> bool:
        return state_size(out) >= grown and in_transaction(out)

    await kill_then_resume(sim, built, tmp_path / "out", point)


@pytest.mark.parametrize("draw", range(3))
async def test_kill_at_a_random_point_of_the_fold(
    sim: RunningSimulator,
    built: tuple[Path, Path],
    state_sizes: range,
    tmp_path: Path,
    draw: int,
) -> None:
    # Seeded per draw: a size state.sqlite passes on its way from unfolded to folded.
    rng = random.Random(POINT_SEED + draw)
    target = state_sizes.start + int(rng.uniform(0.02, 0.9) * len(state_sizes))
    await kill_then_resume(sim, built, tmp_path / "out", lambda out: state_size(out) >= target)
