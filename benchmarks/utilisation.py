"""Concurrency utilisation: Σ server-side request latency / (wall x max_concurrency).

Four-type workload with the judge on, against an in-process simulator with lognormal latency.
An ideal scheduler keeps every slot busy until the last dependency chain drains (≈ 0.98).

    python -m benchmarks.utilisation [--latency-mean 1.0] [--docs 32]
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from benchmarks.common import NO_RPM_CAP, machine, timed_run, verdict
from engine.testing.simulator import RequestLog, SimulatorConfig

TARGET = 0.95


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-mean", type=float, default=1.0, help="seconds")
    parser.add_argument("--latency-sigma", type=float, default=0.6)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--summaries", type=int, default=5)
    return parser


def _full_fraction(logs: list[RequestLog], cap: int, start: float, end: float) -> float:
    """Share of [start, end] during which ``cap`` requests were in flight at the server."""
    events = sorted([(r.arrival, 1) for r in logs] + [(r.finish or end, -1) for r in logs])
    level, last, full = 0, start, 0.0
    for t, step in events:
        if level >= cap:
            full += t - last
        level, last = level + step, t
    return full / (end - start)


async def _run(args: argparse.Namespace) -> None:
    summaries = args.summaries
    overrides = [
        f"limits.max_concurrency={args.concurrency}",
        f"limits.requests_per_minute={NO_RPM_CAP}",
        "generation.judge=true",
        f"generation.extractive_summary.summaries={summaries}",
        f"generation.detailed_summary.summaries={summaries}",
        "generation.extractive_summary.questions_per_summary=3",
        "generation.detailed_summary.questions_per_summary=3",
        "generation.key_facts_to_qa.max_facts=5",
        "generation.key_facts_to_qa.qa_per_fact=3",
        "generation.document_based_qa.questions=5",
    ]
    sim_config = SimulatorConfig(
        latency_mean_s=args.latency_mean, latency_sigma=args.latency_sigma, seed=1
    )
    run = await timed_run(sim_config, args.docs, overrides)
    stats, logs, start, end = run.stats, run.requests, run.start, run.end
    busy = sum((r.finish or end) - r.arrival for r in logs)
    wall = end - start
    served = logs[-1].finish or end
    print(f"machine: {machine()}")
    print(
        f"config: docs={args.docs} summaries={summaries} judge=on "
        f"concurrency={args.concurrency} latency lognormal mean={args.latency_mean}s "
        f"sigma={args.latency_sigma}"
    )
    print(f"engine: {stats.summary()}")
    print(f"requests {len(logs)}, Σ latency {busy:.1f}s, wall {wall:.1f}s")
    print(f"wall lower bound Σ latency / concurrency = {busy / args.concurrency:.1f}s")
    full = _full_fraction(logs, args.concurrency, start, end)
    print(f"share of wall with all {args.concurrency} slots busy at the server: {full:.3f}")
    print(f"from first arrival to last finish: {served - logs[0].arrival:.1f}s")
    value = busy / (wall * args.concurrency)
    verdict("utilisation", value, f">= {TARGET}", value >= TARGET)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_run(_parser().parse_args()))


if __name__ == "__main__":
    main()
