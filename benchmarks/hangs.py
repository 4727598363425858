"""Hung requests: wall time with 1 % of first attempts hanging past the timeout vs none.

A request hangs when a hash of its messages is 0 mod 100 (deterministic, so both runs send the
same work) and only on its first attempt; the engine must time it out and retry it while the
other requests carry on.

Parameters: each hang costs ``timeout`` seconds of one concurrency slot, so a slot-bound run
pays at least 1 % x timeout / latency extra slot-time (25 % at 5 s / 0.2 s) whatever the
scheduler does. The run is therefore rate-bound, as production runs are (RPM cap, spare
concurrency): then a hang should only delay its own unit. The baseline lasts about
``requests / (rpm / 60)`` = 40 s, long enough that one 5 s hang near the end stays < 15 %.

    python -m benchmarks.hangs [--timeout 5] [--latency 0.2] [--rpm 2400]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
from typing import Any

import orjson
from aiohttp import web

from benchmarks.common import machine, timed_run, verdict
from engine.pipeline.stats import Stats
from engine.testing.simulator import FaultHook, SimulatorConfig

TARGET = 1.15


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="teacher.timeout_s")
    parser.add_argument("--latency", type=float, default=0.2, help="fixed server latency (s)")
    parser.add_argument("--rpm", type=int, default=2400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--docs", type=int, default=80)
    parser.add_argument("--every", type=int, default=100, help="1 in EVERY requests hangs")
    return parser


def hang_hook(seconds: float, every: int, hung: list[str]) -> FaultHook:
    seen: set[str] = set()

    async def fault(seq: int, body: dict[str, Any]) -> web.StreamResponse | None:
        key = hashlib.sha256(orjson.dumps(body["messages"], option=orjson.OPT_SORT_KEYS))
        digest = key.hexdigest()
        if int(digest, 16) % every or digest in seen:
            return None
        seen.add(digest)
        hung.append(digest)
        await asyncio.sleep(seconds)
        return None

    return fault


async def _one(args: argparse.Namespace, hangs: bool) -> tuple[float, Stats, int]:
    overrides = [
        f"teacher.timeout_s={args.timeout}",
        f"limits.requests_per_minute={args.rpm}",
        f"limits.max_concurrency={args.concurrency}",
        "generation.types=['document_based_qa']",
        "generation.document_based_qa.questions=19",
    ]
    hung: list[str] = []
    fault = hang_hook(args.timeout * 2, args.every, hung) if hangs else None
    sim_config = SimulatorConfig(latency_mean_s=args.latency, fault=fault)
    run = await timed_run(sim_config, args.docs, overrides)
    return run.seconds, run.stats, len(hung)


async def _run(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    print(
        f"config: docs={args.docs} document_based_qa questions=19 (20 requests/doc), "
        f"timeout {args.timeout}s, latency {args.latency}s, rpm {args.rpm}, "
        f"concurrency {args.concurrency}, 1 in {args.every} first attempts hangs"
    )
    base, base_stats, _ = await _one(args, hangs=False)
    print(f"no hangs:   {base:.1f}s  {base_stats.summary()}")
    hung_wall, hung_stats, hung = await _one(args, hangs=True)
    print(f"with hangs: {hung_wall:.1f}s  {hung_stats.summary()}  ({hung} requests hung)")
    ratio = hung_wall / base
    verdict("wall-time ratio", ratio, f"<= {TARGET}", ratio <= TARGET)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_run(_parser().parse_args()))


if __name__ == "__main__":
    main()
