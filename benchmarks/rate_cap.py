"""Rate cap: arrivals at the server against ``limits.requests_per_minute`` over minutes.

The workload is larger than the run: the job is cancelled after ``--seconds``. The server
admits everything (no 429s), so what it sees is the engine's own pacing.

    python -m benchmarks.rate_cap [--rpm 600] [--seconds 130]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.common import build_config, machine, verdict, write_seeds
from engine.job import run_job
from engine.simulator import SimulatorConfig, running_simulator
from engine.stats import Stats

# The opening seconds (bucket filling, first units starting) are not steady state.
WARMUP_S = 5.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--seconds", type=float, default=130.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-mean", type=float, default=0.3)
    parser.add_argument("--docs", type=int, default=64)
    return parser


async def _run(args: argparse.Namespace) -> None:
    overrides = [
        f"limits.requests_per_minute={args.rpm}",
        f"limits.max_concurrency={args.concurrency}",
        # Demand: 64 docs x 4 types at the default fan-out is far more than the run sends.
    ]
    sim_config = SimulatorConfig(latency_mean_s=args.latency_mean, latency_sigma=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        seeds = write_seeds(Path(tmp) / "seeds.jsonl", args.docs)
        async with running_simulator(sim_config) as sim:
            config = build_config(sim.base_url, Path(tmp) / "out", seeds, overrides)
            stats = Stats()
            start = time.monotonic()
            task = asyncio.create_task(run_job(config, stats, cache=False))
            done, _ = await asyncio.wait({task}, timeout=args.seconds)
            stopped = time.monotonic()
            if not done:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            arrivals = sorted(r.arrival for r in sim.state.requests)
    print(f"machine: {machine()}")
    print(
        f"config: rpm={args.rpm} concurrency={args.concurrency} docs={args.docs} "
        f"latency mean={args.latency_mean}s, ran {stopped - start:.1f}s "
        f"({'finished' if done else 'cancelled'})"
    )
    print(f"engine: {stats.summary()}")
    statuses = [r.status for r in sim.state.requests]
    print(f"arrivals {len(arrivals)}, non-200 replies {sum(s != 200 for s in statuses)}")
    lo, hi = start + WARMUP_S, stopped
    steady = bisect.bisect_left(arrivals, hi) - bisect.bisect_left(arrivals, lo)
    achieved = steady / (hi - lo) * 60
    print(f"steady window {hi - lo:.1f}s: {steady} arrivals = {achieved:.1f}/min")
    busiest = max(
        (bisect.bisect_left(arrivals, t + 60.0) - i for i, t in enumerate(arrivals)), default=0
    )
    if stopped - start < 60:
        print("(run shorter than 60 s: busiest-window figure covers less than a minute)")
    ratio = achieved / args.rpm
    verdict("achieved/cap", ratio, ">= 0.97", ratio >= 0.97)
    peak = busiest / args.rpm
    verdict("busiest 60s window/cap", peak, "<= 1.02", peak <= 1.02)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_run(_parser().parse_args()))


if __name__ == "__main__":
    main()
