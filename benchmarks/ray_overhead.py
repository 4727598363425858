"""The Ray path's client overhead against the local path: requests per second against a
zero-latency simulator in another process, the same workload run both ways.

The local path is ``benchmarks.overhead``'s run. The Ray path (``run.backend = "ray"``, a Ray
started for the run on this machine, ``--workers`` worker actors) adds per unit a call from
the driver to a worker and the result's way back, and per half second of quota a lease from
the limiter actor; its rate is counted from the moment its first worker is ready (starting
Ray takes seconds, once per run, and is printed apart). On one machine the workers, the
driver, Ray's own processes and the simulator share its cores, so this is the overhead on
the same hardware, not a scale-out figure.

    python -m benchmarks.ray_overhead [--docs 200] [--questions 200] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    NO_RPM_CAP,
    build_config,
    machine,
    simulator_process,
    verdict,
    write_seeds,
)
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats

# The Ray path keeps at least this share of the local path's rate.
TARGET_SHARE = 0.5


class _FirstReady(logging.Handler):
    """Notes when the first worker says it is ready (engine.distributed.dispatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and "ready on" in record.getMessage():
            self.at = time.monotonic()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--questions", type=int, default=200, help="document_based_qa")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="worker actors of the Ray path")
    return parser


def _run(
    url: str, tmp: Path, docs: int, name: str, overrides: list[str]
) -> tuple[Stats, str, float, float]:
    """One run; its stats and their summary at its end, its wall time, and its time from
    the first worker's readiness."""
    seeds = write_seeds(tmp / "seeds.jsonl", docs)
    config = build_config(url, tmp / name, seeds, overrides)
    ready = _FirstReady()
    logging.getLogger("engine.distributed.dispatch").addHandler(ready)
    stats = Stats()
    start = time.monotonic()
    asyncio.run(run_job(config, stats, cache=False, preflight=False))
    end = time.monotonic()
    logging.getLogger("engine.distributed.dispatch").removeHandler(ready)
    return stats, stats.summary(), end - start, end - (ready.at or start)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("engine.distributed.dispatch").setLevel(logging.INFO)
    args = _parser().parse_args()
    common = [
        f"limits.requests_per_minute={NO_RPM_CAP}",
        f"limits.max_concurrency={args.concurrency}",
        "generation.types=['document_based_qa']",
        f"generation.document_based_qa.questions={args.questions}",
    ]
    ray = ['run.backend="ray"', f"ray.workers={args.workers}", "ray.worker_cpus=0"]
    with tempfile.TemporaryDirectory() as tmp, simulator_process() as (url, _server):
        local, local_summary, local_wall, _ = _run(url, Path(tmp), args.docs, "local", common)
        remote, ray_summary, ray_wall, ray_steady = _run(
            url, Path(tmp), args.docs, "ray", [*common, *ray]
        )
    print(f"machine: {machine()} ({os.cpu_count()} cores)")
    print(
        f"config: docs={args.docs} document_based_qa questions={args.questions} "
        f"concurrency={args.concurrency}, zero latency, simulator in its own process; "
        f"Ray path: a Ray started for the run, {args.workers} worker actor(s)"
    )
    local_rate = local.teacher.requests_sent / local_wall
    ray_rate = remote.teacher.requests_sent / ray_steady
    print(f"local: {local_summary}")
    print(f"ray:   {ray_summary}")
    print(f"local path: {local_rate:,.0f} requests/s ({local_wall:.1f} s)")
    print(
        f"ray path: {ray_rate:,.0f} requests/s from the first worker ready ({ray_steady:.1f} s; "
        f"{ray_wall - ray_steady:.1f} s to start Ray and the actors)"
    )
    share = ray_rate / local_rate
    verdict(
        "ray/local requests/s", share, f">= {TARGET_SHARE:.2f}", share >= TARGET_SHARE, fmt=".2f"
    )


if __name__ == "__main__":
    main()
