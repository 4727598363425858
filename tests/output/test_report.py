"""The run report: exact figures of a scripted run against the simulator, and a report after
every way a run ends (done, failed items, SIGINT, fatal error) but a refused configuration.

The script: a seed file of two good rows and one bad one; every document answer of the first
row is refused with a 400 (lost items, never retried); the first attempt of every fourth other
request fails with a 500 (retried once). Faults are chosen by arrival order among distinct
requests, never at random, so every count is exact.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine import cli
from engine.config import load_config
from engine.output import report
from engine.output.report import RunOutcome
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats, TeacherSnapshot
from engine.teacher.stats import RequestStats
from engine.testing.simulator import SimulatorConfig, running_simulator
from engine.text import normalise
from tests.support import faults
from tests.support.cli import (
    DEFAULT_TOML,
    engine_cli,
    finish,
    progress_lines,
    set_args,
    start_run,
    teacher_env,
    wait_for,
)
from tests.support.faults import FaultInjector, Plan, Seen
from tests.support.faults import Outcome as Reply
from tests.support.runs import (
    EXPECTED_PER_DOC,
    REPO,
    REQUESTS_PER_DOC,
    RETRY,
    SAMPLE_SEEDS,
    SMALL,
    D,
    F,
    N,
    Q,
    config_for,
    pipeline_requests,
)

GOOD = SAMPLE_SEEDS.read_bytes().splitlines()
FIRST_DOCUMENT = orjson.loads(GOOD[0])["document"]
TYPES = tuple(EXPECTED_PER_DOC)
KEY = "sk-report-test-0123456789-secret"
DISTINCT = 2 * REQUESTS_PER_DOC  # distinct requests for the two good rows
LOST = D  # the first row's document answers
RETRIED = math.ceil((DISTINCT - LOST) / 4)


def seeds_with_a_bad_row(path: Path) -> Path:
    path.write_bytes(b"\n".join([GOOD[0], b'{"document": "unterminated', GOOD[1]]) + b"\n")
    return path


def answers_first_document(seen: Seen) -> bool:
    prompt = seen.prompt
    return prompt.startswith("Answer the question below using the document.") and (
        f"<document>\n{FIRST_DOCUMENT}\n</document>" in prompt
    )


def scripted_plan() -> Plan:
    order: dict[str, int] = {}

    def plan(seen: Seen) -> Reply:
        if answers_first_document(seen):
            return faults.error(400, "maximum context length exceeded", kind="invalid_request")
        if seen.attempt == 1 and order.setdefault(seen.key, len(order)) % 4 == 0:
            return faults.error(500, "upstream trouble")
        return None

    return plan


def stored_usage(out: Path) -> tuple[int, int, int]:
    """Replies the run stored in its cache (each request answered once), and their tokens."""
    with contextlib.closing(sqlite3.connect(out / "cache.sqlite")) as conn:
        bodies = [orjson.loads(body) for (body,) in conn.execute("SELECT body FROM replies")]
    usage = [body["usage"] for body in bodies]
    return (
        len(bodies),
        sum(u["prompt_tokens"] for u in usage),
        sum(u["completion_tokens"] for u in usage),
    )


# Reply choices per stage of a type for the two good rows (every one accepted), before losses.
REPLIES = {
    "extractive_summary": {"summary": 2 * N, "questions": 2 * N, "answer": 2 * N * Q},
    "detailed_summary": {"summary": 2 * N, "questions": 2 * N, "answer": 2 * N * Q},
    "key_facts_to_qa": {"key_facts": 2, "qa": 2 * F},
    "document_based_qa": {"questions": 2, "answer": 2 * D},
}


def kept_means(out: Path, gen_type: str) -> dict[str, float | None]:
    """The report's measures of kept records, computed from the output file."""
    records = [
        orjson.loads(line) for line in (out / gen_type / "gen.jsonl").read_bytes().splitlines()
    ]
    by_unit: dict[str, set[str]] = {}
    for r in records:
        by_unit.setdefault(r["doc_id"], set()).add(normalise(r["question"]))
    summaries = {(r["doc_id"], r["document"]) for r in records}

    def mean(values: list[int]) -> float | None:
        return round(sum(values) / len(values), 1) if values else None

    return {
        "distinct_questions_per_unit": mean([len(q) for q in by_unit.values()]),
        "mean_question_chars": mean([len(r["question"]) for r in records]),
        "mean_answer_chars": mean([len(r["response"]) for r in records]),
        "mean_summary_chars": (
            mean([len(d) for _, d in summaries]) if gen_type.endswith("summary") else None
        ),
    }


def expected_quality(out: Path, gen_type: str, lost: int) -> dict[str, Any]:
    replies = dict(REPLIES[gen_type])
    if lost:
        replies["answer"] -= lost  # refused with 400: no reply to check
    return {
        "replies": sum(replies.values()),
        "rejected": 0,
        "rejection_rate": 0.0,
        "by_stage": {
            stage: {"replies": n, "rejected": 0, "rejected_by_check": {}}
            for stage, n in sorted(replies.items())
        },
        "kept": kept_means(out, gen_type),
    }


def expected_types(out: Path) -> dict[str, Any]:
    expected = {}
    for gen_type in TYPES:
        lost = LOST if gen_type == "document_based_qa" else 0
        expected[gen_type] = {
            "units_total": 2,
            "units_done": 2,
            "units_skipped": 0,
            "units_with_failed_items": 1 if lost else 0,
            "items_failed": lost,
            "judged_out": 0,
            "records_written": 2 * EXPECTED_PER_DOC[gen_type] - lost,
            "output_file": str(out / gen_type / "gen.jsonl"),
            "quality": expected_quality(out, gen_type, lost),
        }
    return expected


def read_report(out: Path) -> dict[str, Any]:
    content: dict[str, Any] = orjson.loads((out / report.REPORT_FILE).read_bytes())
    return content


async def test_report_figures_of_a_scripted_run(tmp_path: Path) -> None:
    seeds = seeds_with_a_bad_row(tmp_path / "seeds.jsonl")
    out = (tmp_path / "out").resolve()
    injector = FaultInjector(scripted_plan())
    async with running_simulator(SimulatorConfig(fault=injector)) as sim:
        config = config_for(sim.base_url, out, *RETRY, f'input.seeds="{seeds}"')
        stats = Stats()
        await run_job(config, stats, preflight=False)  # faults by arrival order: no probes
        received = sim.state.total_requests
    outcome = RunOutcome(3, "failed_items", "4 items failed")
    stats.started = time.monotonic() - 120  # a two-minute run, for rates that are exact
    report.write(out, report.build(config, stats, outcome, {"fresh": False}))
    got = read_report(out)

    assert received == DISTINCT + RETRIED
    answered, prompt_tokens, completion_tokens = stored_usage(out)
    assert answered == DISTINCT - LOST
    assert got["exit"] == {"code": 3, "status": "failed_items", "reason": "4 items failed"}
    assert got["types"] == expected_types(out)
    replies = sum(sum(stages.values()) for stages in REPLIES.values()) - LOST
    assert got["quality"] == {
        "checks_enabled": True,
        "replies": replies,
        "rejected": 0,
        "rejection_rate": 0.0,
        "rejected_by_check": {},
    }
    assert got["seed_file"] == {
        "path": str(seeds.resolve()),
        "valid_rows": 2,
        "rejected_rows": 1,
        "rejects_file": str(out / "rejects.jsonl"),
    }
    assert got["requests"] == {
        "sent": DISTINCT + RETRIED,
        "retried": RETRIED,
        "retries_by_reason": {"500": RETRIED},
        "from_cache": 0,
    }
    assert got["failed_items_by_kind"] == {"request_rejected": LOST}
    assert got["tokens"] == {
        "prompt": prompt_tokens,
        "completion": completion_tokens,
        "total": prompt_tokens + completion_tokens,
    }
    assert got["wall_time_s"] == pytest.approx(120, abs=0.5)
    rates = got["rates_per_minute"]
    assert rates["requests"] == pytest.approx((DISTINCT + RETRIED) / 2, rel=1e-3)
    assert rates["tokens"] == pytest.approx((prompt_tokens + completion_tokens) / 2, rel=1e-3)
    assert (rates["requests_cap"], rates["tokens_cap"]) == (100_000, None)
    assert got["files"] == {
        "output_dir": str(out),
        "failures": str(out / "failures.jsonl"),
        "rejects": str(out / "rejects.jsonl"),
        "progress": str(out / "progress.jsonl"),
        "report": str(out / "run_report.json"),
    }
    cap = config.limits.max_concurrency
    assert got["teacher"] == {
        "model": "sim-teacher",
        "endpoints": [sim.base_url],
        "by_endpoint": {sim.base_url: {"requests": DISTINCT + RETRIED, "outages": 0, "down": 0}},
        # 500s are retried but are not 429s: the concurrency was never cut.
        "concurrency": {"max": cap, "at_end": cap, "cuts_on_429": 0},
    }
    assert len((out / "failures.jsonl").read_bytes().splitlines()) == LOST
    assert not list(out.glob("*.tmp"))


async def cli_run(base_url: str, out: Path, seeds: Path) -> tuple[int, str]:
    sets = set_args(*SMALL, *RETRY, f'output.dir="{out}"', f'input.seeds="{seeds}"')
    return await engine_cli(
        "run", DEFAULT_TOML,
        "--no-preflight",  # faults by arrival order: no probes among them
        *sets, cwd=out.parent, env=teacher_env(base_url, key=KEY),
    )  # fmt: skip


async def test_cli_writes_the_report_and_prints_its_summary(tmp_path: Path) -> None:
    seeds = seeds_with_a_bad_row(tmp_path / "seeds.jsonl")
    out = (tmp_path / "out").resolve()
    sim_config = SimulatorConfig(fault=FaultInjector(scripted_plan()), api_key=KEY)
    async with running_simulator(sim_config) as sim:
        code, output = await cli_run(sim.base_url, out, seeds)
    assert code == cli.EXIT_FAILED_ITEMS, output
    got = read_report(out)
    assert got["exit"] == {"code": 3, "status": "failed_items", "reason": f"{LOST} items failed"}
    assert got["types"] == expected_types(out)
    replies = sum(sum(stages.values()) for stages in REPLIES.values()) - LOST
    assert got["quality"] == {
        "checks_enabled": True,
        "replies": replies,
        "rejected": 0,
        "rejection_rate": 0.0,
        "rejected_by_check": {},
    }
    assert got["requests"]["sent"] == DISTINCT + RETRIED
    assert got["requests"]["retries_by_reason"] == {"500": RETRIED}
    assert got["options"] == {
        "fresh": False,
        "force": False,
        "cache": True,
        "retry_failed": False,
        "preflight": False,
    }
    assert f"run failed_items (exit 3): {LOST} items failed" in output
    # Per type: replies checked, rejected (and the rate), then the kept records' measures.
    quality_rows = {
        line.split()[0]: line.split()[1:] for line in output.splitlines() if "(0.0%)" in line
    }
    qa = got["types"]["document_based_qa"]["quality"]
    assert quality_rows["document_based_qa"][:3] == [str(qa["replies"]), "0", "(0.0%)"]
    assert set(quality_rows) == set(TYPES)
    assert f"requests: {DISTINCT + RETRIED} sent, {RETRIED} retried (500: {RETRIED})" in output
    assert f"report: {out / 'run_report.json'}" in output
    assert "teacher: sim-teacher at 1 endpoint(s), 0 outage(s)" in output
    assert "Traceback" not in output
    assert KEY not in output and KEY.encode() not in (out / "run_report.json").read_bytes()


async def test_report_after_sigint(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(latency_mean_s=0.1)) as sim:
        proc = await start_run(sim.base_url, tmp_path, "limits.workers=2", "run.grace_s=20")
        await wait_for(lambda: progress_lines(tmp_path) >= 1, proc)
        proc.send_signal(signal.SIGINT)
        code, output = await finish(proc)
        received = len(pipeline_requests(sim))
    assert code == 130, output
    got = read_report(tmp_path)
    assert got["exit"]["code"] == 130 and got["exit"]["status"] == "interrupted"
    assert got["exit"]["reason"].startswith("SIGINT")
    done = sum(t["units_done"] for t in got["types"].values())
    assert 1 < done == progress_lines(tmp_path) < 3 * len(TYPES)
    assert got["requests"]["sent"] == received
    assert got["seed_file"]["valid_rows"] == 3
    # The endpoints and the limiter as the interrupted run left them.
    teacher = got["teacher"]
    assert teacher["by_endpoint"] == {sim.base_url: {"requests": received, "outages": 0, "down": 0}}
    assert teacher["concurrency"]["at_end"] == teacher["concurrency"]["max"]
    assert "run interrupted (exit 130)" in output and "Traceback" not in output


async def test_report_after_a_fatal_error_holds_no_key(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(api_key="sk-the-right-one")) as sim:
        seeds = tmp_path / "seeds.jsonl"
        seeds.write_bytes(SAMPLE_SEEDS.read_bytes())
        code, output = await cli_run(sim.base_url, (tmp_path / "out").resolve(), seeds)
    assert code == cli.EXIT_FATAL, output
    raw = (tmp_path / "out" / "run_report.json").read_bytes()
    got = orjson.loads(raw)
    assert got["exit"]["status"] == "fatal"
    # Every worker met the same 401: the reason says it once, and so does the log.
    assert got["exit"]["reason"].count("HTTP 401") == 1, got["exit"]["reason"]
    assert output.count("run stopped:") == 1, output
    assert output.count("HTTP 401") == 2, output  # the log line and the summary's reason
    assert sum(t["units_done"] for t in got["types"].values()) == 0
    assert KEY.encode() not in raw and KEY not in output


def short_run_report(tmp_path: Path, seconds: float) -> dict[str, Any]:
    config = load_config(
        REPO / "config" / "default.toml",
        [f'output.dir="{tmp_path}"'],
        environ={"TEACHER_MODEL_BASE_URL": "http://127.0.0.1:9/v1", "TEACHER_MODEL_NAME": "m"},
        dotenv_path=tmp_path,
    )
    stats = Stats(
        teacher=RequestStats(requests_sent=150, prompt_tokens=6000, completion_tokens=3000)
    )
    stats.started = time.monotonic() - seconds
    return report.build(config, stats, RunOutcome(0, "done", "every unit finished"), {})


def test_a_run_under_a_minute_gives_counts_and_its_span_not_per_minute_rates(
    tmp_path: Path,
) -> None:
    # 150 requests in 12 s would read as 750 a minute against a cap of 600: the start-up
    # burst of a paced limiter, not a broken cap.
    got = short_run_report(tmp_path, 12.0)
    assert got["rates_per_minute"] == {
        "requests": None,
        "tokens": None,
        "requests_cap": 600,
        "tokens_cap": None,
    }
    text = report.summary(got)
    assert "rates: 150 requests and 9000 tokens in 12.0 s (under a minute" in text
    assert "750" not in text and "per minute, over" not in text


def test_the_cap_on_requests_in_flight_is_the_one_the_run_used(tmp_path: Path) -> None:
    """The embedded demo runs with one request in flight; the summary said 32, the
    configured cap, as if the demo had been sent 32 at once."""
    config = load_config(
        REPO / "config" / "default.toml",
        [f'output.dir="{tmp_path}"'],
        environ={"TEACHER_MODEL_BASE_URL": "http://h/v1", "TEACHER_MODEL_NAME": "m"},
        dotenv_path=tmp_path,
    )
    stats = Stats()
    stats.teacher_at_end = TeacherSnapshot({}, 1, 0, concurrency_max=1)
    got = report.build(config, stats, RunOutcome(0, "done", "every unit finished"), {})
    assert config.limits.max_concurrency == 32
    assert got["teacher"]["concurrency"] == {"max": 1, "at_end": 1, "cuts_on_429": 0}
    assert "in flight at most 1, cut 0 time(s) on 429" in report.summary(got)


def test_a_run_of_a_minute_or_more_gives_rates_over_the_whole_run(tmp_path: Path) -> None:
    got = short_run_report(tmp_path, 90.0)
    rates = got["rates_per_minute"]
    assert rates["requests"] == pytest.approx(100.0, rel=1e-3)
    assert rates["tokens"] == pytest.approx(6000.0, rel=1e-3)
    text = report.summary(got)
    assert "per minute, over the whole run: 100 requests, 6000 tokens" in text
    assert "(cap 600 requests; tokens: no cap)" in text


def test_a_refused_run_leaves_the_last_report_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_report.json").write_bytes(b'{"from": "the last run"}\n')
    code = cli.main(
        [
            "run",
            str(REPO / "config" / "default.toml"),
            "--set",
            f'output.dir="{out}"',
            "--set",
            f'input.seeds="{tmp_path / "missing.jsonl"}"',
            "--set",
            'teacher.base_url="http://127.0.0.1:9/v1"',
            "--set",
            'teacher.model="m"',
        ]
    )
    assert code == cli.EXIT_CONFIG
    assert (out / "run_report.json").read_bytes() == b'{"from": "the last run"}\n'


def test_the_key_never_reaches_the_report(tmp_path: Path) -> None:
    # (Credentials or a query string in the URL are refused when the config loads:
    # tests/config/test_config.py.)
    config = load_config(
        REPO / "config" / "default.toml",
        [f'output.dir="{tmp_path}"', f'teacher.api_key="{KEY}"'],
        environ={
            "TEACHER_MODEL_BASE_URL": "https://api.example.com:8443/v1",
            "TEACHER_MODEL_NAME": "m",
        },
        dotenv_path=tmp_path,
    )
    outcome = RunOutcome(1, "fatal", f"the teacher said: bad key {KEY}")
    content = report.build(config, Stats(), outcome, {})
    path = report.write(tmp_path, content)
    raw = path.read_bytes()
    assert KEY.encode() not in raw
    got = orjson.loads(raw)
    assert got["teacher"]["endpoints"] == ["https://api.example.com:8443/v1"]
    assert got["exit"]["reason"] == "the teacher said: bad key [redacted]"
    assert got["types"]["document_based_qa"]["units_total"] is None  # never counted


def test_a_crash_is_described_briefly() -> None:
    same = [ValueError("bad state")] * 40
    err = ExceptionGroup("outer", [ExceptionGroup("inner", same), KeyError("k")])
    assert report.describe_crash(err) == "ValueError: bad state (x40); KeyError: 'k'"
