"""Corpus scale: a resume over millions of done units, the event loop under load, and the seed
passes over a ten-million-row seed file.

    python -m benchmarks.scale resume [--sizes 10000,1000000] [--dir /tmp]
    python -m benchmarks.scale rate [--seconds 20]
    python -m benchmarks.scale seeds [--rows 10000000] [--dir /tmp]

``resume``: for each size, the done state is built by the engine's own pipeline (the seed
reader, the scheduler, the writer and its watermark, over a flow that finishes each unit at
once with one short record), then ``python -m engine run`` (through ``benchmarks.lagged``:
the same run with a loop-lag probe) resumes it and runs ``--new`` new rows against the
zero-latency simulator, served by this process. Figures: the run's peak RSS (``wait4``), the
time from its start to the first request of a new unit (the simulator's request log; the
preflight's probes are not counted), and the largest event-loop lag. Limits: peak RSS at 1M
within 1.2x and at 10M within 1.5x of the 10k run's; start at 1M at most 10 s; lag under
100 ms.

``rate``: the event-loop lag during a run at about 2,000 requests a second (``--rate``) with
the response cache on (``--no-cache``: off, for comparison): the default configuration's
fan-out over ``--docs`` chunks, or with ``--questions N`` ``benchmarks.overhead``'s shape
(document_based_qa only); the simulator in its own process. Limit: under 100 ms.

``seeds``: the count pass of the progress display and ``python -m engine plan`` over a seed
file of ``--rows`` rows: seconds and peak RSS, recorded (no limit).

Everything is written under ``--dir`` and deleted at the end; check ``df -h`` first (10M
done units take about 14 GB with their seed file, the 10M-row seed file about 7 GB).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import (
    DEFAULT_TOML,
    MODEL,
    NO_RPM_CAP,
    REPO,
    SAMPLE_SEEDS,
    build_config,
    machine,
    simulator_process,
    verdict,
    write_seeds,
)
from benchmarks.lagged import LagProbe
from engine.config import load_config
from engine.output.checkpoint import FOLD_AT
from engine.output.state import STATE_FILE
from engine.pipeline.job import run_job
from engine.pipeline.preflight import PROBE_PROMPT
from engine.pipeline.stats import Stats
from engine.progress.display import count_units
from engine.testing.done_state import build_done
from engine.testing.simulator import running_simulator

TYPES = ["extractive_summary", "detailed_summary", "key_facts_to_qa", "document_based_qa"]
# The new units' fan-out: small, so that the run after the resume is short.
FAN_OUT = [
    "generation.extractive_summary.summaries=2",
    "generation.extractive_summary.questions_per_summary=1",
    "generation.detailed_summary.summaries=2",
    "generation.detailed_summary.questions_per_summary=1",
    "generation.key_facts_to_qa.max_facts=2",
    "generation.key_facts_to_qa.qa_per_fact=1",
    "generation.document_based_qa.questions=2",
    f"limits.requests_per_minute={NO_RPM_CAP}",
    "limits.max_concurrency=64",
]
RSS_1M, RSS_10M, START_1M, LAG = 1.2, 1.5, 10.0, 0.1


# --- seeds ---------------------------------------------------------------------------------


def short_rows(count: int, start: int = 0) -> Iterator[bytes]:
    """``count`` distinct seed rows of about 700 bytes (the sample rows, shortened)."""
    samples = [orjson.loads(line) for line in SAMPLE_SEEDS.read_bytes().splitlines() if line]
    for i in range(start, start + count):
        row = dict(samples[i % len(samples)])
        row["document"] = f"Section {i}. {row['document'][:300]}"
        row["icl_document"] = row["icl_document"][:200]
        yield orjson.dumps(row) + b"\n"


def write_rows(path: Path, count: int) -> Path:
    with path.open("wb") as f:
        for chunk in _chunks(short_rows(count), 10_000):
            f.write(b"".join(chunk))
    return path


def _chunks(items: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


# --- the done state, built by the engine's pipeline ------------------------------------------


def config_for(out: Path, seeds: Path, base_url: str = "http://127.0.0.1:9/v1") -> Any:
    overrides = [f'output.dir="{out}"', f'input.seeds="{seeds}"', *FAN_OUT]
    env = {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": MODEL}
    return load_config(DEFAULT_TOML, overrides, environ=env, dotenv_path=out)


# --- one resumed run, measured -----------------------------------------------------------------


def engine_command(config: Path, out: Path, seeds: Path) -> list[str]:
    sets = [f'output.dir="{out}"', f'input.seeds="{seeds}"', *FAN_OUT]
    return [
        sys.executable, "-m", "benchmarks.lagged", "run", str(config),
        *(arg for s in sets for arg in ("--set", s)),
    ]  # fmt: skip


async def measured_run(out: Path, seeds: Path) -> dict[str, Any]:
    """``python -m engine run`` (with the lag probe) over ``out``: its figures."""
    lag_file = out.parent / f"{out.name}.lag.json"
    rss_file = out.parent / f"{out.name}.rss.json"
    log_file = out.parent / f"{out.name}.log"
    async with running_simulator() as sim:
        env = {
            **os.environ,
            "TEACHER_MODEL_BASE_URL": sim.base_url,
            "TEACHER_MODEL_NAME": MODEL,
            "ENGINE_LAG_FILE": str(lag_file),
            "RSS_FILE": str(rss_file),
        }
        launch = [sys.executable, "-m", "benchmarks.launch"]
        with log_file.open("wb") as log:
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *launch,
                *engine_command(DEFAULT_TOML, out, seeds),
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            await proc.wait()
            ended = time.monotonic()
        new = [r for r in sim.state.requests if r.prompt_head != PROBE_PROMPT[:80]]
        first = min((r.arrival for r in new), default=float("nan"))
    lag = orjson.loads(lag_file.read_bytes()) if lag_file.exists() else {}
    rss = orjson.loads(rss_file.read_bytes())
    return {
        "exit": rss["exit"],
        "peak_rss_mib": rss["maxrss_kib"] / 1024,
        "first_request_s": first - started,
        "wall_s": ended - started,
        "requests": len(new),
        "max_lag_s": lag.get("max_lag_s", float("nan")),
        "p99_lag_s": lag.get("p99_lag_s", float("nan")),
        "worst_at_s": lag.get("worst_at_s", float("nan")),
        "lag_samples": lag.get("samples", 0),
        "log": str(log_file),
    }


def state_size(out: Path) -> dict[str, float]:
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    return {
        "state_mib": sizes.get("state.sqlite", 0) / 2**20,
        "log_mib": sizes.get("progress.jsonl", 0) / 2**20,
    }


async def resume_case(
    base: Path, units: int, new_rows: int, *, legacy: bool = False
) -> dict[str, Any]:
    """Build ``units`` done units, then measure the run that resumes them. ``legacy``: the
    directory as an engine from before state.sqlite left it (the whole log, no state, no
    watermark): the run folds the log and reads the seed file from the top, skipping the
    done units one by one: the slowest resume there is."""
    rows = units // len(TYPES)
    case = base / f"done-{units}"
    case.mkdir(parents=True)
    seeds = write_rows(case / "seeds.jsonl", rows + new_rows)
    out = case / "out"
    build_s = await build_done(config_for(out, seeds), rows, fold_at=10**12 if legacy else FOLD_AT)
    if legacy:
        (out / STATE_FILE).unlink()
    figures = {"units": units, "rows": rows, "build_s": build_s, **state_size(out)}
    figures.update(await measured_run(out, seeds))
    figures["seed_mib"] = seeds.stat().st_size / 2**20
    return figures


def resume_main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    base = Path(tempfile.mkdtemp(prefix="scale-", dir=args.dir))
    try:
        for units in sizes:
            figures = asyncio.run(resume_case(base, units, args.new, legacy=args.legacy))
            results.append(figures)
            print(
                f"{units:>10,} done units ({figures['rows']:,} rows"
                f"{', log only, from before state.sqlite' if args.legacy else ''}): build "
                f"{figures['build_s']:.0f}s, state.sqlite {figures['state_mib']:.1f} MiB, log "
                f"{figures['log_mib']:.1f} MiB | run: exit {figures['exit']}, peak RSS "
                f"{figures['peak_rss_mib']:.1f} MiB, first new request after "
                f"{figures['first_request_s']:.2f}s, wall {figures['wall_s']:.1f}s, "
                f"{figures['requests']} requests, max loop lag "
                f"{figures['max_lag_s'] * 1000:.1f} ms at {figures['worst_at_s']}s "
                f"(p99 {figures['p99_lag_s'] * 1000:.1f} of {figures['lag_samples']} samples)",
                flush=True,
            )
            if figures["exit"] != 0:
                print(Path(figures["log"]).read_text()[-2000:])
            shutil.rmtree(base / f"done-{units}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    command = engine_command(Path("config/default.toml"), Path("OUT"), Path("SEEDS"))
    print("command:", " ".join(command))
    by_units = {f["units"]: f for f in results}
    small = by_units[min(by_units)]
    for units, figures in sorted(by_units.items()):
        if units >= 1_000_000:
            limit = RSS_1M if units < 10_000_000 else RSS_10M
            ratio = figures["peak_rss_mib"] / small["peak_rss_mib"]
            name = f"peak RSS {units:,}/{small['units']:,} done units"
            verdict(name, ratio, f"<= {limit}", ratio <= limit)
            start = figures["first_request_s"]
            target = f"<= {START_1M}" if units == 1_000_000 else "(recorded)"
            ok = start <= START_1M or units != 1_000_000
            verdict(f"start to first new request at {units:,} (s)", start, target, ok, ".2f")
        lag = figures["max_lag_s"]
        verdict(f"max loop lag at {units:,} (s)", lag, f"< {LAG}", lag < LAG, ".4f")


# --- the loop under load, with the cache on ------------------------------------------------------


async def lagged_run(config: Any, *, cache: bool = True) -> tuple[Stats, LagProbe, float, Any]:
    """``run_job`` (no preflight) with the lag probe on its loop."""
    stats = Stats()
    probe = LagProbe()
    task = asyncio.create_task(probe.run())
    started = time.monotonic()
    try:
        await run_job(config, stats, preflight=False, cache=cache)
    finally:
        task.cancel()
    return stats, probe, time.monotonic() - started, stats.cache_at_end


def rate_main(args: argparse.Namespace) -> None:
    overrides = [
        f"limits.requests_per_minute={int(args.rate * 60)}",
        f"limits.max_concurrency={args.concurrency}",
    ]
    if args.questions:  # benchmarks.overhead's shape: one type, many questions a chunk
        docs = max(1, int(args.rate * args.seconds) // (args.questions + 1))
        overrides += [
            "generation.types=['document_based_qa']",
            f"generation.document_based_qa.questions={args.questions}",
        ]
        shape = f"document_based_qa questions={args.questions}"
    else:  # the default configuration's fan-out, all four types (about 640 requests a chunk)
        docs = args.docs
        shape = "the default fan-out, all four types"
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, simulator_process() as (url, _):
        seeds = write_seeds(Path(tmp) / "seeds.jsonl", docs)
        config = build_config(url, Path(tmp) / "out", seeds, overrides)
        stats, probe, wall, cache = asyncio.run(lagged_run(config, cache=not args.no_cache))
    lag = probe.summary()
    sent = stats.teacher.requests_sent
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    print(
        f"config: {docs} docs, {shape}, "
        f"concurrency={args.concurrency}, rpm={int(args.rate * 60)}, response cache "
        f"{'off' if args.no_cache else 'on'} "
        f"(simulator in its own process, zero latency)"
    )
    held = "" if cache is None else f"{cache.size_bytes / 1e6:.1f} MB, {cache.stored:,} stored"
    print(
        f"{sent:,} requests in {wall:.1f}s = {sent / wall:,.0f}/s; cache {held or 'off'}; lag p99 "
        f"{lag['p99_lag_s'] * 1000:.1f} ms of "
        f"{lag['samples']} samples, worst at {lag['worst_at_s']}s"
    )
    verdict("requests/s (about 2,000 wanted)", sent / wall, ">= 1,800", sent / wall >= 1800, ",.0f")
    worst = lag["max_lag_s"]
    name = f"max loop lag at ~2,000 req/s, cache {'off' if args.no_cache else 'on'} (s)"
    verdict(name, worst, f"< {LAG}", worst < LAG, ".4f")


# --- the seed passes over a large file -----------------------------------------------------------


def count_main(args: argparse.Namespace) -> None:
    """The progress display's count pass alone (run in a child, for its RSS)."""
    started = time.monotonic()
    totals = count_units(Path(args.seeds), 60_000, TYPES, lambda doc, gen_type: True)
    assert totals is not None
    print(orjson.dumps({"rows": totals.rows, "seconds": time.monotonic() - started}).decode())


def timed_child(command: list[str], rss_file: Path) -> dict[str, Any]:
    """Run ``command`` through ``benchmarks.launch``: wall seconds, exit, peak RSS, output."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.launch", *command],
        env={**os.environ, "RSS_FILE": str(rss_file)},
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    wall = time.monotonic() - started
    rss = orjson.loads(rss_file.read_bytes())
    output = (done.stdout + done.stderr).decode(errors="replace")
    return {"wall_s": wall, "exit": rss["exit"], "rss_mib": rss["maxrss_kib"] / 1024, "out": output}


def seeds_main(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="scale-seeds-", dir=args.dir))
    try:
        seeds = base / "seeds.jsonl"
        started = time.monotonic()
        write_rows(seeds, args.rows)
        size = seeds.stat().st_size
        took = time.monotonic() - started
        print(f"{args.rows:,} rows, {size / 2**30:.2f} GiB written in {took:.0f}s", flush=True)
        count = timed_child(
            [sys.executable, "-m", "benchmarks.scale", "count", str(seeds)], base / "count.json"
        )
        counted = orjson.loads(count["out"].strip().splitlines()[-1])
        sets = [f'input.seeds="{seeds}"', f'output.dir="{base / "out"}"']
        plan = timed_child(
            [sys.executable, "-m", "engine", "plan", str(DEFAULT_TOML),
             *(arg for s in sets for arg in ("--set", s))],
            base / "plan.json",
        )  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    print(
        f"count pass: {counted['rows']:,} rows in {counted['seconds']:.1f}s "
        f"({size / 2**20 / counted['seconds']:.0f} MiB/s), peak RSS {count['rss_mib']:.0f} MiB"
    )
    if plan["exit"] != 0:
        print(plan["out"][-2000:])
    print(
        f"plan: exit {plan['exit']}, {plan['wall_s']:.1f}s wall (process start to end), "
        f"peak RSS {plan['rss_mib']:.0f} MiB"
    )
    verdict("count pass over the seed file (s)", counted["seconds"], "(recorded)", True, ".1f")
    verdict("plan over the seed file (s)", plan["wall_s"], "(recorded)", plan["exit"] == 0, ".1f")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    resume = commands.add_parser("resume", help="resume over done units of several sizes")
    resume.add_argument("--sizes", default="10000,1000000", help="done units, comma-separated")
    resume.add_argument("--new", type=int, default=50, help="new rows run after the resume")
    resume.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    resume.add_argument(
        "--legacy",
        action="store_true",
        help="resume a directory from before state.sqlite (log only): fold, read from the top",
    )
    rate = commands.add_parser("rate", help="loop lag at about 2,000 requests/s, cache on")
    rate.add_argument("--rate", type=float, default=2000.0, help="requests per second (cap)")
    rate.add_argument("--seconds", type=float, default=20.0)
    rate.add_argument(
        "--questions", type=int, default=0, help="document_based_qa only, N questions a chunk"
    )
    rate.add_argument("--docs", type=int, default=60, help="chunks (default fan-out)")
    rate.add_argument("--no-cache", action="store_true", help="the same run without the cache")
    rate.add_argument("--concurrency", type=int, default=128)
    rate.add_argument("--dir", default=None)
    seeds = commands.add_parser("seeds", help="count pass and plan over a large seed file")
    seeds.add_argument("--rows", type=int, default=10_000_000)
    seeds.add_argument("--dir", default=None)
    count = commands.add_parser("count", help="(internal) the count pass over SEEDS")
    count.add_argument("seeds")
    return parser


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    args = _parser().parse_args()
    {"resume": resume_main, "rate": rate_main, "seeds": seeds_main, "count": count_main}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
