"""Crash and resume through the CLI: ``kill -9`` mid-run, then the same command finishes the job.

One uninterrupted run is the reference. Every other run is killed with SIGKILL at a moment
chosen by watching its output files (first record bytes, first progress line, halfway, late,
seeded random delays, twice in a row), then resumed; the resumed output must hold exactly the
reference's records, each once, and one progress line per unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from engine.testing.simulator import RunningSimulator, SimulatorConfig, running_simulator
from tests.support.cli import (
    start_engine,
)
from tests.support.runs import EXPECTED_PER_DOC, SAMPLE_SEEDS, SMALL, assert_record_shape

# Slow: real engine processes killed and resumed, over a corpus that lasts a second or two.
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

DOCS = 16
UNITS = DOCS * len(EXPECTED_PER_DOC)
# Enough latency that a run lasts a second or two, so a kill lands mid-run.
SIM = SimulatorConfig(latency_mean_s=0.012, latency_sigma=0.5, seed=3)
ENGINE_SETS = [*SMALL, "limits.max_concurrency=8"]
POLL_S = 0.002
# A run that neither finishes nor reaches its kill point within this is hung.
RUN_TIMEOUT_S = 20.0
POINT_SEED = 20240607
# Sentences that make each derived seed row a distinct document.
CONTEXTS = (
    "Field measurements from the 1990s were later confirmed by satellite observations.",
    "Textbooks often simplify this account for introductory courses.",
    "Several of these findings were disputed before independent replication settled them.",
    "The same principles are applied today in engineering and industry.",
    "Historical records describe the first observations in considerable detail.",
    "Laboratory experiments reproduce the effect under controlled conditions.",
)
Check = Callable[[Path], bool]


# --- seeds and the reference run --------------------------------------------------------------


def write_seeds(path: Path) -> None:
    """``DOCS`` distinct rows derived from the sample rows: sentences rotated, context added."""
    samples = [orjson.loads(line) for line in SAMPLE_SEEDS.read_bytes().splitlines()]
    lines = []
    for i in range(DOCS):
        row = dict(samples[i % len(samples)])
        sentences = [s.strip() for s in row["document"].split(". ") if s.strip()]
        turn = i // len(samples) % len(sentences)
        rotated = [*sentences[turn:], *sentences[:turn]]
        body = ". ".join(s.rstrip(".") for s in rotated) + "."
        row["document"] = f"{body} {CONTEXTS[i % len(CONTEXTS)]} (Part {i + 1}.)"
        row["document_outline"] = f"{row['document_outline']}, part {i + 1}"
        for q in (1, 2, 3):
            key = f"icl_query_{q}"
            row[key] = f"{row[key].rstrip('?')}, according to part {i + 1}?"
        lines.append(orjson.dumps(row))
    path.write_bytes(b"\n".join(lines) + b"\n")


@dataclass(frozen=True)
class Engine:
    """``python -m engine run`` against the simulator, one output directory per call."""

    base_url: str
    seeds: Path

    async def start(self, out: Path) -> asyncio.subprocess.Process:
        env = {
            **os.environ,
            "TEACHER_MODEL_BASE_URL": self.base_url,
            "TEACHER_MODEL_NAME": "sim-teacher",
        }
        overrides = [*ENGINE_SETS, f'output.dir="{out}"', f'input.seeds="{self.seeds}"']
        sets = [arg for s in overrides for arg in ("--set", s)]
        out.mkdir(parents=True, exist_ok=True)
        # The log lives beside the output dir so the output holds only the engine's files.
        with (out.parent / f"{out.name}.log").open("ab") as log:
            return await start_engine("run", "config/default.toml", *sets, env=env, output=log)

    async def run(self, out: Path) -> None:
        """Run to the end; it must exit 0."""
        proc = await self.start(out)
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S):
                code = await proc.wait()
        finally:
            await _reap(proc)
        assert code == 0, _log(out)

    async def kill_when(self, out: Path, check: Check) -> int:
        """Start a run and SIGKILL it as soon as ``check(out)`` holds. Returns the exit code:
        -9 when killed, the run's own when it ended before the check held."""
        proc = await self.start(out)
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S):
                # The simulator answers from this event loop, so while a poll waits the
                # engine can finish at most the requests already answered.
                while proc.returncode is None:
                    if check(out):
                        proc.send_signal(signal.SIGKILL)
                        return await proc.wait()
                    await asyncio.sleep(POLL_S)
                return proc.returncode
        finally:
            await _reap(proc)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Leave no process behind, whatever happened in the test."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")[-4000:]


@dataclass(frozen=True)
class Reference:
    out: Path
    requests: int  # requests the uninterrupted run sent
    records: dict[str, list[dict[str, Any]]]
    units: set[tuple[str, str]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sim() -> AsyncIterator[RunningSimulator]:
    async with running_simulator(SIM) as running:
        yield running


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seeds") / "seed_data.jsonl"
    write_seeds(path)
    return path


@pytest.fixture
def engine(sim: RunningSimulator, seeds: Path) -> Engine:
    return Engine(sim.base_url, seeds)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(
    sim: RunningSimulator, seeds: Path, tmp_path_factory: pytest.TempPathFactory
) -> Reference:
    out = tmp_path_factory.mktemp("reference") / "out"
    before = sim.state.total_requests
    await Engine(sim.base_url, seeds).run(out)
    requests = sim.state.total_requests - before
    records = {t: sorted_records(out, t) for t in EXPECTED_PER_DOC}
    for gen_type, per_doc in EXPECTED_PER_DOC.items():
        assert len(records[gen_type]) == DOCS * per_doc, gen_type
        for record in records[gen_type]:
            assert_record_shape(record, gen_type)
    units = progress_units(out)
    assert len(units) == UNITS
    return Reference(out, requests, records, units)


# --- reading an output directory --------------------------------------------------------------


def jsonl(path: Path) -> list[Any]:
    """Every line of ``path`` parsed; each must be complete JSON ending in a newline."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends in a torn line"
    return [orjson.loads(line) for line in data.splitlines()]


def sorted_records(out: Path, gen_type: str) -> list[dict[str, Any]]:
    records = jsonl(out / gen_type / "gen.jsonl")
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids), f"{gen_type}: duplicate ids"
    return sorted(records, key=lambda r: r["id"])


def progress_units(out: Path) -> set[tuple[str, str]]:
    """The units in ``progress.jsonl``; each must appear exactly once."""
    entries = jsonl(out / "progress.jsonl")
    units = {(e["doc_id"], e["gen_type"]) for e in entries}
    assert len(units) == len(entries), "a unit has more than one progress line"
    return units


def progress_lines(out: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return (out / "progress.jsonl").read_bytes().count(b"\n")
    return 0


def gen_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*/gen.jsonl"))


def assert_same_as_reference(out: Path, reference: Reference) -> None:
    for path in out.rglob("*.jsonl"):
        jsonl(path)
    for gen_type, expected in reference.records.items():
        got = sorted_records(out, gen_type)
        assert [r["id"] for r in got] == [r["id"] for r in expected], gen_type
        assert got == expected, gen_type
    assert progress_units(out) == reference.units
    failures = out / "failures.jsonl"
    assert not failures.exists() or failures.stat().st_size == 0


# --- the crashes ------------------------------------------------------------------------------

KILL_POINTS: dict[str, Check] = {
    "first-record-bytes": lambda out: gen_bytes(out) > 0,
    "first-progress-line": lambda out: progress_lines(out) >= 1,
    "halfway": lambda out: progress_lines(out) >= UNITS // 2,
    "late": lambda out: progress_lines(out) >= UNITS * 3 // 4,
}


@pytest.mark.parametrize("point", KILL_POINTS)
async def test_kill_at_a_watched_moment_then_resume(
    engine: Engine, reference: Reference, tmp_path: Path, point: str
) -> None:
    out = tmp_path / "out"
    code = await engine.kill_when(out, KILL_POINTS[point])
    assert code == -signal.SIGKILL, "the run ended before the kill point"
    assert progress_lines(out) < UNITS, "killed, yet every unit was already done"
    await engine.run(out)
    assert_same_as_reference(out, reference)


@pytest.mark.parametrize("draw", range(3))
async def test_kill_at_a_random_point_then_resume(
    engine: Engine, sim: RunningSimulator, reference: Reference, tmp_path: Path, draw: int
) -> None:
    # Seeded per draw: the same fractions of the reference run's requests on every run. The
    # point is reached while requests are still to come, so the kill always lands mid-run.
    share = random.Random(POINT_SEED + draw).uniform(0.2, 0.95)
    target = sim.state.total_requests + int(share * reference.requests)
    out = tmp_path / "out"
    code = await engine.kill_when(out, lambda _: sim.state.total_requests >= target)
    assert code == -signal.SIGKILL, _log(out)
    await engine.run(out)
    assert_same_as_reference(out, reference)


async def test_killed_twice_before_the_resume_that_finishes(
    engine: Engine, reference: Reference, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = await engine.kill_when(out, KILL_POINTS["first-progress-line"])
    after_first = progress_lines(out)
    second = await engine.kill_when(out, lambda o: progress_lines(o) >= after_first + UNITS // 3)
    assert (first, second) == (-signal.SIGKILL, -signal.SIGKILL)
    assert progress_lines(out) < UNITS
    await engine.run(out)
    assert_same_as_reference(out, reference)


# --- torn files, no process -------------------------------------------------------------------


async def test_torn_lines_left_by_a_crash_are_cut_and_nothing_is_redone(
    engine: Engine, sim: RunningSimulator, reference: Reference, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    gen = out / "key_facts_to_qa" / "gen.jsonl"
    whole = {p: p.read_bytes() for p in out.rglob("*.jsonl")}
    record = gen.read_bytes().splitlines()[-1]
    with gen.open("ab") as f:
        f.write(record[: len(record) // 2])
    progress = (out / "progress.jsonl").read_bytes().splitlines()[-1]
    with (out / "progress.jsonl").open("ab") as f:
        f.write(progress[: len(progress) // 2])
    sent = sim.state.total_requests
    await engine.run(out)
    assert sim.state.total_requests == sent
    assert {p: p.read_bytes() for p in out.rglob("*.jsonl")} == whole
    assert_same_as_reference(out, reference)


async def test_records_without_their_progress_line_are_redone_once(
    engine: Engine, sim: RunningSimulator, reference: Reference, tmp_path: Path
) -> None:
    """A crash between the records' fsync and their progress line: the unit runs again."""
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    progress = out / "progress.jsonl"
    lines = progress.read_bytes().splitlines(keepends=True)
    progress.write_bytes(b"".join(lines[:-3]))
    # Without the copied response cache, the redone units must really ask the teacher.
    for cache_file in out.glob("cache.sqlite*"):
        cache_file.unlink()
    sent = sim.state.total_requests
    await engine.run(out)
    assert sim.state.total_requests > sent
    assert_same_as_reference(out, reference)
