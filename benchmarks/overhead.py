"""Client overhead: requests per second against a zero-latency simulator in another process.

Client and server each get their own process (and core), so the figure is the engine's own
cost per request. The server's CPU share is printed too: near 100 % it, not the engine, is
the limit.

    python -m benchmarks.overhead [--docs 200] [--questions 200] [--concurrency 128] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    NO_RPM_CAP,
    build_config,
    cpu_seconds,
    machine,
    simulator_process,
    verdict,
    write_seeds,
)
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats

TARGET = 2000.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--questions", type=int, default=200, help="document_based_qa")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="cProfile the engine (slower)")
    parser.add_argument(
        "--checks-off", action="store_true", help="quality.enabled=false: the gates' own cost"
    )
    return parser


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    args = _parser().parse_args()
    overrides = [
        f"limits.requests_per_minute={NO_RPM_CAP}",
        f"limits.max_concurrency={args.concurrency}",
        "generation.types=['document_based_qa']",
        f"generation.document_based_qa.questions={args.questions}",
        *(["quality.enabled=false"] if args.checks_off else []),
    ]
    profiler = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory() as tmp, simulator_process() as (url, server):
        seeds = write_seeds(Path(tmp) / "seeds.jsonl", args.docs)
        config = build_config(url, Path(tmp) / "out", seeds, overrides)
        stats = Stats()
        server_cpu, client_cpu = cpu_seconds(server.pid), _self_cpu()
        start = time.monotonic()
        if profiler is not None:
            profiler.enable()
        asyncio.run(run_job(config, stats, cache=False, preflight=False))
        if profiler is not None:
            profiler.disable()
        wall = time.monotonic() - start
        server_cpu = cpu_seconds(server.pid) - server_cpu
    client_cpu = _self_cpu() - client_cpu
    print(f"machine: {machine()}")
    print(
        f"config: docs={args.docs} document_based_qa questions={args.questions} "
        f"concurrency={args.concurrency} rpm={NO_RPM_CAP} simulator pid {server.pid} "
        f"(separate process, zero latency){' PROFILED' if profiler else ''}"
    )
    print(f"engine: {stats.summary()}")
    print(
        f"wall {wall:.1f}s; CPU busy: engine {client_cpu / wall:.0%}, "
        f"simulator {server_cpu / wall:.0%} (of one core each; {os.cpu_count()} cores)"
    )
    rate = stats.teacher.requests_sent / wall
    verdict("requests/s", rate, f">= {TARGET:,.0f}", rate >= TARGET, fmt=",.0f")
    if profiler is not None:
        print("top engine hotspots (tottime):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
