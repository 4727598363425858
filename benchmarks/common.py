"""Shared helpers for the benchmarks: seed files, configs, a simulator in another process.

Benchmarks print a figure next to its limit and always exit 0: they measure, never assert.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from engine.config import Config, load_config
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.testing.simulator import RequestLog, SimulatorConfig, running_simulator

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOML = REPO / "config" / "default.toml"
SAMPLE_SEEDS = REPO / "config" / "sample_seeds.jsonl"
MODEL = "sim-teacher"
# Rates above the engine's own ceiling are pointless: the config accepts at most 1,000,000.
NO_RPM_CAP = 1_000_000


def write_seeds(path: Path, count: int) -> Path:
    """Write ``count`` distinct seed rows, varied copies of the sample rows, to ``path``."""
    samples = [orjson.loads(line) for line in SAMPLE_SEEDS.read_bytes().splitlines() if line]
    with path.open("wb") as f:
        for i in range(count):
            row = dict(samples[i % len(samples)])
            # A distinct opening sentence gives every row its own content-derived doc id.
            row["document"] = f"Section {i} (variant {i * 7919 % 1009}). {row['document']}"
            f.write(orjson.dumps(row) + b"\n")
    return path


def build_config(base_url: str, out: Path, seeds: Path, overrides: Sequence[str] = ()) -> Config:
    """The default config pointed at ``base_url``, writing to ``out``, plus ``overrides``."""
    base = [f'output.dir="{out}"', f'input.seeds="{seeds}"']
    env = {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": MODEL}
    return load_config(DEFAULT_TOML, [*base, *overrides], environ=env, dotenv_path=out)


@dataclass(frozen=True, slots=True)
class TimedRun:
    start: float  # time.monotonic(), the clock of the server's request log
    end: float
    stats: Stats
    requests: list[RequestLog]  # as the server saw them

    @property
    def seconds(self) -> float:
        return self.end - self.start


async def timed_run(sim_config: SimulatorConfig, docs: int, overrides: Sequence[str]) -> TimedRun:
    """One uncached run over ``docs`` generated seeds against an in-process simulator."""
    with tempfile.TemporaryDirectory() as tmp:
        seeds = write_seeds(Path(tmp) / "seeds.jsonl", docs)
        async with running_simulator(sim_config) as sim:
            config = build_config(sim.base_url, Path(tmp) / "out", seeds, overrides)
            stats = Stats()
            start = time.monotonic()
            await run_job(config, stats, cache=False, preflight=False)  # the pipeline alone
            return TimedRun(start, time.monotonic(), stats, list(sim.state.requests))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def simulator_process(*args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m engine.testing.simulator`` on a free port; yields its base URL and process."""
    port = free_port()
    cmd = [sys.executable, "-m", "engine.testing.simulator", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"simulator did not start: {' '.join(cmd)}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} cpus, {cpu}, Python {platform.python_version()}"


def verdict(name: str, value: float, target: str, ok: bool, fmt: str = ".3f") -> str:
    """``utilisation 0.962 (target >= 0.95) PASS``: printed and returned."""
    line = f"{name} {value:{fmt}} (target {target}) {'PASS' if ok else 'MISS'}"
    print(line, flush=True)
    return line
