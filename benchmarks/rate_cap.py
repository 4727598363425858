"""Rate cap: what the server receives against ``limits.requests_per_minute`` (or, with
``--tpm``, ``limits.tokens_per_minute``) over minutes.

The workload is larger than the run: the job is cancelled after ``--seconds``. The server
admits everything (no 429s), so what it sees is the engine's own pacing. With ``--tpm`` the
server reports every reply as using its whole ``max_tokens`` (so a reservation is exact,
and the figure is the pacing itself) unless ``--short-replies``, where replies use what they
say and the figure shows how much of the cap the settling from ``usage`` recovers.

    python -m benchmarks.rate_cap [--rpm 600] [--seconds 130]
    python -m benchmarks.rate_cap --tpm 600000 [--short-replies]

With ``--server-rpm N`` the server itself rate-limits (429 with Retry-After beyond N requests
in any 60 s); the figures then count the requests it answered (200) against N: how close the
engine's back-off and adaptive concurrency stay to a hosted API's limit.
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

from benchmarks.common import NO_RPM_CAP, build_config, machine, verdict, write_seeds
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.testing.simulator import RequestLog, SimulatorConfig, running_simulator

# The opening seconds (bucket filling, first units starting) are not steady state.
WARMUP_S = 5.0
# Token mode: small max_tokens and fan-out, so one request is a small share of a minute.
TOKEN_WORKLOAD = [
    f"generation.{t}.{k}=512"
    for t in ("extractive_summary", "detailed_summary", "key_facts_to_qa", "document_based_qa")
    for k in ("max_tokens", "qa_max_tokens")
] + [
    "generation.extractive_summary.summaries=5",
    "generation.detailed_summary.summaries=5",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=0, help="cap tokens instead of requests")
    parser.add_argument("--short-replies", action="store_true", help="--tpm: real usage")
    parser.add_argument("--server-rpm", type=int, default=0, help="the server's own limit")
    parser.add_argument("--seconds", type=float, default=130.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-mean", type=float, default=0.3)
    parser.add_argument("--docs", type=int, default=64)
    return parser


def _busiest_minute(arrivals: list[tuple[float, int]]) -> int:
    """The most weight any 60 s window of (time, weight) arrivals holds."""
    times = [t for t, _ in arrivals]
    sums = [0]
    for _, weight in arrivals:
        sums.append(sums[-1] + weight)
    return max(
        (sums[bisect.bisect_left(times, t + 60.0)] - sums[i] for i, t in enumerate(times)),
        default=0,
    )


async def _run(args: argparse.Namespace) -> None:
    tokens = args.tpm > 0
    overrides = [
        f"limits.requests_per_minute={NO_RPM_CAP if tokens else args.rpm}",
        f"limits.tokens_per_minute={args.tpm}",
        f"limits.max_concurrency={args.concurrency}",
        *(TOKEN_WORKLOAD if tokens else []),
        # Demand: 64 docs x 4 types is far more than the run sends.
    ]
    sim_config = SimulatorConfig(
        latency_mean_s=args.latency_mean,
        latency_sigma=0.5,
        usage_fills_max_tokens=tokens and not args.short_replies,
        rpm_limit=args.server_rpm,
    )
    with tempfile.TemporaryDirectory() as tmp:
        seeds = write_seeds(Path(tmp) / "seeds.jsonl", args.docs)
        async with running_simulator(sim_config) as sim:
            config = build_config(sim.base_url, Path(tmp) / "out", seeds, overrides)
            stats = Stats()
            start = time.monotonic()
            task = asyncio.create_task(run_job(config, stats, cache=False, preflight=False))
            done, _ = await asyncio.wait({task}, timeout=args.seconds)
            stopped = time.monotonic()
            if not done:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            requests: list[RequestLog] = sorted(sim.state.requests, key=lambda r: r.arrival)
    cap, unit = (args.tpm, "tokens") if tokens else (args.rpm, "requests")
    if args.server_rpm:
        cap = args.server_rpm
        print(f"429 answers: {sum(r.status == 429 for r in requests)}")
        requests = [r for r in requests if r.status == 200]
    arrivals = [(r.arrival, r.tokens if tokens else 1) for r in requests]
    print(f"machine: {machine()}")
    print(
        f"config: {unit} cap={cap}/min concurrency={args.concurrency} docs={args.docs} "
        f"latency mean={args.latency_mean}s, ran {stopped - start:.1f}s "
        f"({'finished' if done else 'cancelled'})"
        + (f", replies {'short' if args.short_replies else 'fill max_tokens'}" if tokens else "")
    )
    print(f"engine: {stats.summary()}")
    print(
        f"arrivals {len(requests)}, non-200 replies {sum(r.status != 200 for r in requests)}, "
        f"{sum(r.tokens for r in requests):,} tokens"
    )
    lo, hi = start + WARMUP_S, stopped
    steady = sum(w for t, w in arrivals if lo <= t < hi)
    achieved = steady / (hi - lo) * 60
    print(f"steady window {hi - lo:.1f}s: {steady:,} {unit} = {achieved:,.1f}/min")
    if stopped - start < 60:
        print("(run shorter than 60 s: busiest-window figure covers less than a minute)")
    ratio = achieved / cap
    verdict(f"achieved/cap ({unit})", ratio, ">= 0.97", ratio >= 0.97)
    peak = _busiest_minute(arrivals) / cap
    verdict(f"busiest 60s window/cap ({unit})", peak, "<= 1.02", peak <= 1.02)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_run(_parser().parse_args()))


if __name__ == "__main__":
    main()
