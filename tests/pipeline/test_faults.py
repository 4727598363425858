"""Faults of a real endpoint, injected into a real local server, through the whole engine.

Each test runs the engine (``run_job`` or the CLI) against the simulator with a fault hook
(``tests/faults.py``). Faults are chosen by the order in which distinct requests arrive and by
attempt number, never at random, so every count below is exact: a clean run sends
``TOTAL`` distinct requests, and each transient fault costs exactly one more.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from engine import cli
from engine.errors import AuthError, FatalRunError
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.seeds import doc_id_for
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support import faults
from tests.support.cli import engine_cli
from tests.support.faults import FaultInjector, Outcome, Plan, Seen
from tests.support.runs import (
    EXPECTED_PER_DOC,
    MAX_ATTEMPTS,
    REPO,
    RETRY,
    SAMPLE_SEEDS,
    SEED_DOCUMENTS,
    SMALL,
    TOTAL,
    D,
    Run,
    assert_complete_output,
    config_for,
    failure_lines,
    faulted_run,
    is_document_answer,
    leaves,
    read_gen,
    seed_count,
)

KEY = "sk-test-0123456789abcdef-secret"


async def cli_run(base_url: str, out: Path, *flags: str, key: str | None = None) -> tuple[int, str]:
    """``python -m engine run`` as a user runs it: its exit code and everything it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
    env |= {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": "sim-teacher"}
    if key is not None:
        env["TEACHER_MODEL_API_KEY"] = key
    sets = [*SMALL, *RETRY, f'output.dir="{out}"', f'input.seeds="{SAMPLE_SEEDS}"']
    args = [a for s in sets for a in ("--set", s)]
    return await engine_cli(
        "run", str(REPO / "config" / "default.toml"), *flags, *args, cwd=out, env=env
    )


def first_attempt_of_every(k: int, fault: Callable[[Seen], web.StreamResponse]) -> Plan:
    """Fail the first attempt of every ``k``-th distinct request with ``fault(seen)``."""

    def plan(seen: Seen) -> Outcome:
        return fault(seen) if seen.attempt == 1 and seen.index % k == 0 else None

    return plan


def faulted_count(k: int) -> int:
    return math.ceil(TOTAL / k)


def assert_types_complete(out: Path, *gen_types: str) -> None:
    for gen_type in gen_types:
        records = read_gen(out, gen_type)
        assert len(records) == seed_count() * EXPECTED_PER_DOC[gen_type], gen_type
        assert len({r["id"] for r in records}) == len(records), gen_type


def assert_recovered(run: Run, out: Path, retries: Counter[str]) -> None:
    """Transient faults only: each cost one retry, counted by reason on both sides, and the
    output is complete with nothing failed."""
    assert run.stats.teacher.retries == retries
    assert run.stats.teacher.requests_sent == run.server.total_requests == TOTAL + retries.total()
    assert sum(run.stats.failures.values()) == 0
    assert_one_clean_retry_each(run)
    assert_complete_output(out)


def assert_one_clean_retry_each(run: Run) -> None:
    """Every faulted request came back exactly once more, and that attempt was answered."""
    for seen, _status in run.injector.injected:
        attempts = run.injector.attempts(seen.key)
        assert [a.attempt for a in attempts] == [1, 2]
        assert run.server.requests[attempts[1].seq].status == 200


def file_bytes(out: Path) -> Iterator[tuple[Path, bytes]]:
    for path in sorted(out.rglob("*")):
        if path.is_file():
            yield path, path.read_bytes()


# --- transient faults: the run completes as if nothing happened -------------------------


async def test_429_with_retry_after_ms_is_waited_out(tmp_path: Path) -> None:
    delay_ms = 40  # well above the first back-off (<= backoff_base_s = 10 ms)
    plan = first_attempt_of_every(
        5,
        lambda _seen: faults.error(
            429,
            "Rate limit reached for requests",
            code="rate_limit_exceeded",
            kind="requests",
            headers={"retry-after-ms": str(delay_ms)},
        ),
    )
    run = await faulted_run(tmp_path, plan)
    injected = faulted_count(5)
    assert run.injector.statuses() == {429: injected}
    assert_recovered(run, tmp_path, Counter({"429": injected}))
    for seen, _status in run.injector.injected:
        first, again = run.injector.attempts(seen.key)
        # 1 ms of slack for timer granularity; the back-off alone would be <= 10 ms.
        assert again.arrival - first.arrival >= delay_ms / 1000 - 0.001


async def test_429_with_only_an_openai_error_body_is_retried(tmp_path: Path) -> None:
    plan = first_attempt_of_every(
        3,
        lambda _seen: faults.error(
            429,
            "Rate limit reached for gpt-x in organization org-1 on requests per min (RPM).",
            code="rate_limit_exceeded",
            kind="requests",
        ),
    )
    run = await faulted_run(tmp_path, plan)
    injected = faulted_count(3)
    assert_recovered(run, tmp_path, Counter({"429": injected}))


async def test_5xx_on_every_first_attempt_is_retried_by_status(tmp_path: Path) -> None:
    statuses = (500, 502, 503)
    plan = first_attempt_of_every(
        1, lambda seen: faults.error(statuses[seen.index % 3], "upstream trouble")
    )
    run = await faulted_run(tmp_path, plan)
    per_status = TOTAL // 3
    assert TOTAL % 3 == 0
    assert run.injector.statuses() == dict.fromkeys(statuses, per_status)
    assert_recovered(run, tmp_path, Counter({str(s): per_status for s in statuses}))


@pytest.mark.parametrize(
    "partial", [b"", b'{"id": "chatcmpl-1", "choices": [{"index'], ids=["before_reply", "mid_body"]
)
async def test_connection_reset_is_retried(tmp_path: Path, partial: bytes) -> None:
    """Dropped before any reply, or in the middle of the body."""
    plan = first_attempt_of_every(4, lambda _seen: faults.reset(partial))
    run = await faulted_run(tmp_path, plan)
    injected = faulted_count(4)
    assert run.injector.statuses() == {0: injected}
    assert_recovered(run, tmp_path, Counter({"connection": injected}))


MALFORMED = {
    "not_json": lambda: faults.text("<html><body>502 Bad Gateway</body></html>"),
    "no_choices": lambda: faults.payload({"id": "chatcmpl-1", "object": "chat.completion"}),
    "empty_choices": lambda: faults.payload({"id": "chatcmpl-1", "choices": []}),
    "choice_without_message": lambda: faults.payload({"choices": [{"index": 0}]}),
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
async def test_malformed_200_is_retried(tmp_path: Path, shape: str) -> None:
    plan = first_attempt_of_every(4, lambda _seen: MALFORMED[shape]())
    run = await faulted_run(tmp_path, plan)
    injected = faulted_count(4)
    assert run.injector.statuses() == {200: injected}
    assert_recovered(run, tmp_path, Counter({"malformed_response": injected}))


async def test_a_hung_request_times_out_without_stalling_the_rest(tmp_path: Path) -> None:
    hang = faults.Hang(seconds=2.0)
    hung = 3

    def plan(seen: Seen) -> Awaitable[Outcome] | None:
        return hang() if seen.attempt == 1 and seen.index < hung else None

    run = await faulted_run(tmp_path, plan, "teacher.timeout_s=0.3", release=hang.release)
    assert len(run.injector.injected) == hung
    assert run.stats.teacher.retries == Counter({"timeout": hung})
    assert run.stats.teacher.requests_sent == run.server.total_requests == TOTAL + hung
    assert sum(run.stats.failures.values()) == 0
    # Waiting out even one hang would take 2 s; the hangs run alongside everything else.
    assert run.elapsed < hang.seconds
    assert_complete_output(tmp_path)


# --- persistent faults: the item is lost and logged, the rest completes -----------------


def context_length() -> web.Response:
    """A fresh one each time: an aiohttp response can be sent only once."""
    return faults.error(
        400,
        "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.",
        code="context_length_exceeded",
        kind="invalid_request_error",
    )


async def test_persistent_400_loses_only_that_stage_without_retry(tmp_path: Path) -> None:
    def plan(seen: Seen) -> Outcome:
        return context_length() if is_document_answer(seen) else None

    run = await faulted_run(tmp_path, plan)
    lost = seed_count() * D
    assert run.injector.statuses() == {400: lost}
    assert all(seen.attempt == 1 for seen, _ in run.injector.injected)  # no retry
    assert len({seen.key for seen, _ in run.injector.injected}) == lost
    assert run.stats.teacher.retries == Counter()
    assert run.stats.failures == Counter({"request_rejected": lost})
    assert run.stats.teacher.requests_sent == run.server.total_requests == TOTAL

    lines = failure_lines(tmp_path)
    assert len(lines) == lost
    assert {(f["doc_id"], f["item"]) for f in lines} == {
        (doc_id_for(doc), f"q{j:03d}") for doc in SEED_DOCUMENTS for j in range(D)
    }
    for line in lines:
        assert line["gen_type"] == "document_based_qa"
        assert line["stage"] == "document_based_qa/answer"
        assert line["kind"] == "request_rejected"
        assert line["status"] == 400
        assert line["attempts"] == 1
        assert "maximum context length is 4096 tokens" in line["body_excerpt"]
        assert "context_length_exceeded" in line["body_excerpt"]
    assert read_gen(tmp_path, "document_based_qa") == []
    assert_types_complete(tmp_path, "extractive_summary", "detailed_summary", "key_facts_to_qa")


async def test_cli_exits_3_when_items_failed(tmp_path: Path) -> None:
    injector = FaultInjector(lambda seen: context_length() if is_document_answer(seen) else None)
    async with running_simulator(SimulatorConfig(fault=injector)) as sim:
        code, output = await cli_run(sim.base_url, tmp_path)
    assert code == cli.EXIT_FAILED_ITEMS == 3, output
    assert f"{seed_count() * D} items failed" in output
    assert len(failure_lines(tmp_path)) == seed_count() * D
    assert_types_complete(tmp_path, "extractive_summary", "detailed_summary", "key_facts_to_qa")


async def test_persistent_500_uses_every_attempt_then_logs_the_item(tmp_path: Path) -> None:
    doomed: list[str] = []

    def plan(seen: Seen) -> Outcome:
        if not doomed and is_document_answer(seen):
            doomed.append(seen.key)
        return faults.error(500, "CUDA out of memory") if seen.key in doomed else None

    run = await faulted_run(tmp_path, plan)
    attempts = run.injector.attempts(doomed[0])
    assert [a.attempt for a in attempts] == list(range(1, MAX_ATTEMPTS + 1))
    assert [run.server.requests[a.seq].status for a in attempts] == [500] * MAX_ATTEMPTS
    assert run.stats.teacher.retries == Counter({"500": MAX_ATTEMPTS - 1})
    assert run.stats.failures == Counter({"retries_exhausted": 1})
    assert run.stats.teacher.requests_sent == run.server.total_requests == TOTAL + MAX_ATTEMPTS - 1

    [line] = failure_lines(tmp_path)
    assert line["kind"] == "retries_exhausted"
    assert line["status"] == 500
    assert line["attempts"] == MAX_ATTEMPTS
    assert line["stage"] == "document_based_qa/answer"
    assert "CUDA out of memory" in line["body_excerpt"]
    records = read_gen(tmp_path, "document_based_qa")
    assert len(records) == seed_count() * D - 1
    missing = f"{line['doc_id']}-document_based_qa-{line['item']}"
    assert missing not in {r["id"] for r in records}
    assert_types_complete(tmp_path, "extractive_summary", "detailed_summary", "key_facts_to_qa")


@pytest.mark.parametrize("fault", ["503", "timeout"])
async def test_one_poisonous_request_alone_is_lost_not_taken_for_an_outage(
    tmp_path: Path, fault: str
) -> None:
    # One document, one type: the key-facts request is the only request in flight.
    seeds = tmp_path / "one_seed.jsonl"
    seeds.write_bytes(SAMPLE_SEEDS.read_bytes().splitlines()[0] + b"\n")
    hang = faults.Hang(seconds=2.0)

    def plan(seen: Seen) -> Outcome | Awaitable[Outcome]:
        if not seen.prompt.startswith("Extract the key facts"):
            return None
        return faults.error(503, "poison") if fault == "503" else hang()

    run = await faulted_run(
        tmp_path / "out",
        plan,
        f'input.seeds="{seeds}"',
        'generation.types=["key_facts_to_qa"]',
        "retry.max_attempts=6",  # the defaults
        "retry.outage_threshold=5",
        "retry.outage_max_s=0.5",  # how long the bug stalls before it stops the run
        # Long enough that an attempt reaches the server on a loaded machine before its
        # timeout (at 0.1 s one attempt sometimes timed out unseen), short beside the hang.
        "teacher.timeout_s=0.4",
        release=hang.release,
    )
    assert [seen.attempt for seen in run.injector.seen] == list(range(1, 7))
    assert run.stats.failures == Counter({"retries_exhausted": 1})
    [line] = failure_lines(tmp_path / "out")
    assert (line["stage"], line["attempts"]) == ("key_facts_to_qa/key_facts", 6)


# --- rejected credentials stop the run; the key is never written or logged --------------


WRONG_KEY = "sk-wrong-9f8e7d6c5b4a-secret"


async def test_401_stops_the_run_at_once_without_failures(tmp_path: Path) -> None:
    stats = Stats()
    async with running_simulator(SimulatorConfig(api_key=KEY)) as sim:
        config = config_for(sim.base_url, tmp_path, *RETRY, f'teacher.api_key="{WRONG_KEY}"')
        with pytest.raises((FatalRunError, BaseExceptionGroup)) as raised:
            await run_job(config, stats, preflight=False)  # the pipeline's own handling
    errors = leaves(raised.value)
    assert errors and all(isinstance(err, AuthError) for err in errors)
    for err in errors:
        assert sim.base_url in str(err)
        assert "401" in str(err)
        assert WRONG_KEY not in f"{err} {err!r}"
    # Only first-stage requests can have gone out, one per (document, type) unit at most.
    assert 1 <= sim.state.total_requests <= seed_count() * len(EXPECTED_PER_DOC)
    assert {log.status for log in sim.state.requests} == {401}
    # At once: nothing retried (no back-off waited out), no item recorded as lost.
    assert stats.teacher.retries == Counter()
    assert stats.failures == Counter()
    assert failure_lines(tmp_path) == []
    assert (tmp_path / "progress.jsonl").read_bytes() == b""


async def test_cli_exits_1_on_401_and_never_shows_the_key(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(api_key=KEY)) as sim:
        code, output = await cli_run(sim.base_url, tmp_path, "--verbose", key=WRONG_KEY)
    assert code == cli.EXIT_FATAL == 1, output
    assert "HTTP 401" in output and sim.base_url in output
    assert "DEBUG" in output  # the most talkative level still keeps the key to itself
    assert WRONG_KEY not in output
    for path, content in file_bytes(tmp_path):
        assert WRONG_KEY.encode() not in content, path
    assert failure_lines(tmp_path) == []


async def test_the_key_is_never_written_or_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    doomed: list[str] = []
    transient: tuple[Callable[[], web.StreamResponse], ...] = (
        lambda: faults.error(503, "overloaded"),
        lambda: faults.error(429, "slow down", code="rate_limit_exceeded"),
        faults.reset,
        lambda: faults.text("not json"),
    )

    def plan(seen: Seen) -> Outcome:
        if not doomed and is_document_answer(seen):
            doomed.append(seen.key)
        if seen.key in doomed:
            return context_length()  # one item lost, so failures.jsonl has a line to inspect
        if seen.attempt > 1 or seen.index % 5 == 4:
            return None
        return transient[seen.index % 5]()

    run = await faulted_run(tmp_path, plan, server_key=KEY, key=KEY)
    assert run.server.total_requests > TOTAL
    assert {log.status for log in run.server.requests} <= {200, 400, 429, 503}  # never a 401
    assert set(run.stats.teacher.retries) == {"503", "429", "connection", "malformed_response"}
    assert run.stats.failures == Counter({"request_rejected": 1})
    assert KEY not in caplog.text
    for record in caplog.records:
        assert KEY not in repr(record.args), record.name
    files = list(file_bytes(tmp_path))
    assert any(path.name == "failures.jsonl" for path, _ in files)
    for path, content in files:
        assert KEY.encode() not in content, path
