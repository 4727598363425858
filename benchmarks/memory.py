"""Memory: peak RSS of ``python -m engine run`` over many seed rows vs few.

A streaming pipeline holds a bounded number of units whatever the input size, so the peak
should hardly grow with the number of rows. One type (document_based_qa, 1 question: two
requests per row), zero-latency simulator in its own process.

    python -m benchmarks.memory [--small 1000] [--large 20000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEFAULT_TOML, MODEL, REPO, machine, simulator_process, verdict
from benchmarks.common import write_seeds as _write_seeds

TARGET = 1.2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=1000, help="seed rows")
    parser.add_argument("--large", type=int, default=20000, help="seed rows")
    parser.add_argument("--concurrency", type=int, default=64)
    return parser


def command(seeds: Path, out: Path, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "engine", "run", str(DEFAULT_TOML), "--no-cache",
        "--set", f'input.seeds="{seeds}"',
        "--set", f'output.dir="{out}"',
        "--set", "generation.types=['document_based_qa']",
        "--set", "generation.document_based_qa.questions=1",
        "--set", "limits.requests_per_minute=1000000",
        "--set", f"limits.max_concurrency={concurrency}",
    ]  # fmt: skip


def peak_rss(cmd: list[str], base_url: str, cwd: Path) -> tuple[int, float, int]:
    """Run ``cmd``; return its peak RSS in KiB (from wait4), seconds taken and exit code."""
    env = {**os.environ, "TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": MODEL}
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    tail = proc.stderr.read()[-400:]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(tail.decode(errors="replace"))
    return usage.ru_maxrss, time.monotonic() - start, proc.returncode


def main() -> None:
    args = _parser().parse_args()
    print(f"machine: {machine()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp, simulator_process() as (url, _):
        for rows in (args.small, args.large):
            seeds = _write_seeds(Path(tmp) / f"seeds-{rows}.jsonl", rows)
            cmd = command(seeds, Path(tmp) / f"out-{rows}", args.concurrency)
            rss, seconds, code = peak_rss(cmd, url, REPO)
            results[rows] = rss
            print(f"{rows:>6} rows: peak RSS {rss / 1024:.1f} MiB, {seconds:.1f}s, exit {code}")
    print("command:", " ".join(command(Path("SEEDS"), Path("OUT"), args.concurrency)))
    ratio = results[args.large] / results[args.small]
    verdict(
        f"peak RSS ratio {args.large}/{args.small} rows", ratio, f"<= {TARGET}", ratio <= TARGET
    )


if __name__ == "__main__":
    main()
