"""Faults that hit every request: how many requests a run sends before the breaker stops it.

Each scenario is a simulator that fails every request of some kind the same way; the run has
the preflight off (it would catch most of these before the corpus), so the breaker alone
stops it. Counted at the server: every HTTP request on a chat path, 404s included. The corpus
is large enough (``--docs``, 200 by default = 800 units) that a run which did not stop would
send hundreds more.

Target: about 30 requests at the default concurrency (32) and rate (600/min) for faults that
are not retried; without pacing, the first wave of the concurrency plus at most one request
per loss before the trip (4 stages x 4 documents). Faults that are retried (a 500) or
re-asked (a reply that is not JSON) cost their attempts per item first.

    python -m benchmarks.breaker [--docs 200] [--unpaced]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from benchmarks.common import NO_RPM_CAP, build_config, machine, verdict, write_seeds
from engine.errors import FatalRunError
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.testing.simulator import FaultHook, SimulatorConfig, running_simulator

CONCURRENCY = 32
PACED_TARGET = 35


def _error(status: int, message: str) -> web.Response:
    payload = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _hook(answer: Callable[[dict[str, Any]], web.Response | None]) -> FaultHook:
    async def fault(seq: int, body: dict[str, Any]) -> web.StreamResponse | None:
        return answer(body)

    return fault


def _not_json(body: dict[str, Any]) -> web.Response:
    reply = {
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": "Sure! Here you go."}}
            for i in range(body.get("n", 1))
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
    }
    return web.Response(body=orjson.dumps(reply), content_type="application/json")


@dataclass(frozen=True)
class Scenario:
    name: str
    simulator: SimulatorConfig
    bare_url: bool = False  # the base URL without /v1
    overrides: tuple[str, ...] = ()
    retried: bool = False  # each item costs its attempts before it is lost


SCENARIOS = (
    Scenario("404: base URL without /v1", SimulatorConfig(prefixes=("/v1",)), bare_url=True),
    Scenario(
        "400: n > 1 refused",
        SimulatorConfig(
            fault=_hook(
                lambda body: _error(400, "n > 1 is not supported") if body.get("n", 1) > 1 else None
            )
        ),
    ),
    Scenario("400: max_tokens over a 2,048 context", SimulatorConfig(max_model_len=2048)),
    Scenario(
        "500: json_schema refused (llama.cpp)",
        SimulatorConfig(fault=_hook(lambda _body: _error(500, "Input should be 'json_object'"))),
        retried=True,
    ),
    Scenario("200: replies without JSON", SimulatorConfig(fault=_hook(_not_json)), retried=True),
)


async def _one(scenario: Scenario, docs: int, paced: bool) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        seeds = write_seeds(Path(tmp) / "seeds.jsonl", docs)
        async with running_simulator(scenario.simulator) as sim:
            url = sim.base_url.removesuffix("/v1") if scenario.bare_url else sim.base_url
            rpm = [] if paced else [f"limits.requests_per_minute={NO_RPM_CAP}"]
            config = build_config(url, Path(tmp) / "out", seeds, [*rpm, *scenario.overrides])
            reason = "did not stop"
            try:
                await run_job(config, Stats(), cache=False, preflight=False)
            except FatalRunError as err:
                reason = str(err)
            except BaseExceptionGroup as group:
                reason = str(group.exceptions[0])
            sent = sum(1 for _m, path, _s in sim.state.http if path.endswith("/completions"))
            return sent, reason


async def _run(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    paced = not args.unpaced
    pace = "600 requests/min (default)" if paced else "unpaced"
    print(f"config: docs={args.docs} ({args.docs * 4} units), concurrency {CONCURRENCY}, {pace}")
    for scenario in SCENARIOS:
        sent, reason = await _one(scenario, args.docs, paced)
        print(f"\n{scenario.name}: {sent} requests; {reason[:160]}...")
        if scenario.retried:
            print("  (retried or re-asked per item: no target)")
            continue
        limit = PACED_TARGET if paced else CONCURRENCY + 4 * 4
        verdict("  requests before the stop", sent, f"<= {limit}", sent <= limit, fmt="d")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--unpaced", action="store_true", help="no requests-per-minute cap")
    logging.basicConfig(level=logging.CRITICAL)
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
