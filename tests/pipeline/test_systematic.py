"""Faults that hit every request, against real local servers: the run stops early with the fix
named, and a plain re-run after the fix completes the output.

Each case is one the issue reproduced on a run that walked the whole corpus: a base URL
without /v1, a server refusing n > 1, a context too small for max_tokens, a redirect. Each is
run with the preflight off (the breaker must stop it) and, in test_preflight.py, with it on.
Requests are counted at the server; nothing is timed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine import cli
from engine.output.checkpoint import load_checkpoint
from engine.testing.simulator import RunningSimulator, SimulatorConfig, running_simulator
from tests.support import faults
from tests.support.cli import DEFAULT_TOML, engine_cli
from tests.support.faults import FaultInjector, Seen
from tests.support.runs import (
    DOCS,
    EXPECTED_PER_DOC,
    SMALL,
    assert_complete,
    corpus,
    pipeline_requests,
    records,
)
from tests.support.servers import redirecting_to

# Slow: whole CLI runs over a 40-document corpus, each twice (broken, then fixed).
pytestmark = pytest.mark.slow

FAST_RETRY = ["retry.backoff_base_s=0.01", "retry.backoff_max_s=0.05"]
# Requests a fully broken run may send before it stops, unpaced: the first wave (a request
# per unit in flight, max_concurrency = 32 by default) and at most one more per loss until
# five documents lost items in one stage (4 stages x 4 documents + 1); once tripped, nothing
# more is sent. Paced at the default 600 requests a minute, the five documents come first.
BOUND = 32 + 4 * 5
PACED = 4 * 5 + 5


async def run_cli(
    base_url: str,
    out: Path,
    seeds: Path,
    *flags: str,
    sets: tuple[str, ...] = (),
    paced: bool = False,
) -> tuple[int, str]:
    """``python -m engine run`` as a user runs it: the default concurrency (32), the small
    fan-out of the e2e tests, and no pacing to wait for (``paced``: the default 600 a minute)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
    env |= {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": "sim-teacher"}
    small = [s for s in SMALL if not (paced and s.startswith("limits."))]
    all_sets = [*small, *FAST_RETRY, f'output.dir="{out}"', f'input.seeds="{seeds}"', *sets]
    args = [a for s in all_sets for a in ("--set", s)]
    return await engine_cli("run", DEFAULT_TOML, *flags, *args, cwd=out.parent, env=env)


def chat_requests(sim: RunningSimulator) -> int:
    """Every request the server got on a chat path, answered or not (404s included)."""
    return sum(1 for _method, path, _status in sim.state.http if path.endswith("/completions"))


def report(out: Path) -> dict[str, Any]:
    content: dict[str, Any] = orjson.loads((out / "run_report.json").read_bytes())
    return content


# --- 1. a base URL without /v1 ----------------------------------------------------------


async def test_404_without_v1_stops_the_run_and_the_fixed_url_completes_it(tmp_path: Path) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    async with running_simulator(SimulatorConfig(prefixes=("/v1",))) as sim:
        bare = sim.base_url.removesuffix("/v1")
        code, output = await run_cli(bare, out, seeds, "--no-preflight", paced=True)
        sent = chat_requests(sim)
        assert code == cli.EXIT_FATAL, output
        assert 5 <= sent <= PACED, sent
        assert f"TEACHER_MODEL_BASE_URL should probably end in /v1: try {bare}/v1" in output
        assert "HTTP 404" in output
        assert output.count("ERROR engine: run stopped:") == 1  # one message, not one per unit
        assert "run the same command: it runs again what was lost too" in output
        assert report(out)["exit"]["status"] == "fatal"

        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight")
    assert code == cli.EXIT_OK, output
    assert_complete(out)
    lost = report(out)["lost_items"]
    assert lost["still_failing"] == 0 and lost["recovered"] == lost["before"]


# --- 2. a server that refuses n > 1 -----------------------------------------------------


def refuses_n(seen: Seen) -> faults.Outcome:
    if seen.body.get("n", 1) > 1:
        return faults.error(400, "n > 1 is not supported", kind="invalid_request_error")
    return None


async def test_refused_n_stops_the_run_and_supports_n_false_completes_it(tmp_path: Path) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    async with running_simulator(SimulatorConfig(fault=FaultInjector(refuses_n))) as sim:
        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight")
        refused = sum(1 for log in sim.state.requests if log.n > 1)
        assert code == cli.EXIT_FATAL, output
        assert 5 <= refused <= BOUND, refused
        assert "set teacher.supports_n = false" in output
        assert "summary items the same way (HTTP 400 (request_rejected))" in output

        sets = ("teacher.supports_n=false",)
        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight", sets=sets)
    assert code == cli.EXIT_OK, output
    assert_complete(out)


# --- 3. a context too small for max_tokens ----------------------------------------------


async def test_context_overflow_stops_the_run_naming_the_keys_and_lower_max_tokens_completes(
    tmp_path: Path,
) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    async with running_simulator(SimulatorConfig(max_model_len=2048)) as sim:
        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight")
        sent = chat_requests(sim)
        assert code == cli.EXIT_FATAL, output
        assert 5 <= sent <= BOUND, sent
        assert "maximum context length is 2048 tokens" in output
        assert "max_tokens (now 2048) (and as large: " in output

        lower = tuple(f"generation.{t}.max_tokens=1024" for t in EXPECTED_PER_DOC)
        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight", sets=lower)
    assert code == cli.EXIT_OK, output  # not refused as changed settings: nothing was written
    assert_complete(out)


# --- 4. a redirect (http -> https, old host -> new) -------------------------------------


async def test_a_redirect_stops_the_run_at_once_and_the_final_url_completes_it(
    tmp_path: Path,
) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    async with running_simulator(SimulatorConfig()) as sim, redirecting_to(sim.base_url) as moved:
        old, seen = moved
        code, output = await run_cli(old, out, seeds, "--no-preflight")
        assert code == cli.EXIT_FATAL, output
        assert 1 <= len(seen) <= 32 and {s.split()[0] for s in seen} == {"POST"}
        assert sim.state.http == []  # nothing followed the redirect, as a GET or otherwise
        assert "answered HTTP 301, a redirect to " in output
        assert f"set TEACHER_MODEL_BASE_URL to the final URL, {sim.base_url}" in output

        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight")
    assert code == cli.EXIT_OK, output
    assert_complete(out)


# --- one bad chunk stops nothing --------------------------------------------------------


async def test_one_chunk_over_the_context_fails_only_its_own_units(tmp_path: Path) -> None:
    seeds = corpus(tmp_path / "seeds.jsonl")
    rows = [orjson.loads(line) for line in seeds.read_bytes().splitlines()]
    rows[4]["document"] = "A very long chunk. " * 2000  # ~9,500 tokens: over any request
    seeds.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(max_model_len=8192)) as sim:
        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight")
        assert sim.state.total_requests > DOCS * 10
    assert code == cli.EXIT_FAILED_ITEMS, output
    lost = [orjson.loads(line) for line in (out / "failures.jsonl").read_bytes().splitlines()]
    assert {(f["doc_id"], f["status"]) for f in lost} == {(lost[0]["doc_id"], 400)}
    assert {f["gen_type"] for f in lost} == set(EXPECTED_PER_DOC)  # its four units, each
    for gen_type, per_doc in EXPECTED_PER_DOC.items():
        assert len(records(out, gen_type)) == (DOCS - 1) * per_doc
    assert "run stopped" not in output and "different documents lost" not in output


# --- the same cases with the preflight on (the default): stopped before any seed row ------


def data_requests(sim: RunningSimulator) -> int:
    """Chat requests other than the preflight's probes."""
    return len(pipeline_requests(sim))


async def test_preflight_names_v1_before_any_seed_row(tmp_path: Path) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    async with running_simulator(SimulatorConfig(prefixes=("/v1",))) as sim:
        bare = sim.base_url.removesuffix("/v1")
        code, output = await run_cli(bare, out, seeds)
        assert code == cli.EXIT_FATAL, output
        assert len(sim.state.http) == 3  # GET /models, POST the chat path, POST it under /v1
        assert f"TEACHER_MODEL_BASE_URL should end in /v1: use {sim.base_url}" in output
        code, output = await run_cli(sim.base_url, out, seeds)
    assert code == cli.EXIT_OK, output
    assert_complete(out)


async def test_preflight_adapts_to_a_refused_n_and_the_run_completes(tmp_path: Path) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    async with running_simulator(SimulatorConfig(fault=FaultInjector(refuses_n))) as sim:
        code, output = await run_cli(sim.base_url, out, seeds)
        refused = [log for log in sim.state.requests if log.n > 1]
    assert code == cli.EXIT_OK, output
    assert len(refused) == 2  # the run's shape, then n alone: the probes only
    # Said once as it is found, and in the run's summary.
    assert (
        output.count("WARNING engine.pipeline.preflight: preflight: the server does not take n > 1")
        == 1
    )
    assert output.count("the server does not take n > 1") == 2
    assert report(out)["preflight"]["adapted"][0].startswith("the server does not take n > 1")
    assert_complete(out)


async def test_preflight_names_the_max_tokens_keys_before_any_seed_row(tmp_path: Path) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    async with running_simulator(SimulatorConfig(max_model_len=2048)) as sim:
        code, output = await run_cli(sim.base_url, out, seeds)
        assert code == cli.EXIT_FATAL, output
        assert data_requests(sim) == 0 and len(sim.state.http) == 3
        for gen_type in EXPECTED_PER_DOC:
            assert f"generation.{gen_type}.max_tokens = 2048" in output
        lower = tuple(f"generation.{t}.max_tokens=1024" for t in EXPECTED_PER_DOC)
        code, output = await run_cli(sim.base_url, out, seeds, sets=lower)
    assert code == cli.EXIT_OK, output
    assert_complete(out)


async def test_preflight_names_the_final_url_of_a_redirect(tmp_path: Path) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    async with running_simulator(SimulatorConfig()) as sim, redirecting_to(sim.base_url) as moved:
        old, seen = moved
        code, output = await run_cli(old, out, seeds)
        assert code == cli.EXIT_FATAL, output
        assert seen == ["GET /v1/models"] and sim.state.http == []
        assert f"set TEACHER_MODEL_BASE_URL to the final URL, {sim.base_url}" in output
        code, output = await run_cli(sim.base_url, out, seeds)
    assert code == cli.EXIT_OK, output
    assert_complete(out)


# --- a run that breaks halfway ----------------------------------------------------------


async def test_a_run_that_breaks_halfway_stops_on_the_share_and_a_rerun_completes(
    tmp_path: Path,
) -> None:
    """After 200 good requests every answer is refused (a gateway's quota, say): each stage
    has succeeded before, so the share of its recent items stops the run."""
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    broken = {"after": 200}

    def plan(seen: Seen) -> faults.Outcome:
        if seen.seq < broken["after"]:
            return None
        return faults.error(422, "quota exceeded for this project", code="quota")

    async with running_simulator(SimulatorConfig(fault=FaultInjector(plan))) as sim:
        sets = ("retry.breaker_window=10",)
        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight", sets=sets)
        assert code == cli.EXIT_FATAL, output
        assert "of the last 10 " in output and "lost the same way (HTTP 422" in output
        assert sim.state.total_requests < DOCS * 29  # well short of the whole corpus
        done_before = len(load_checkpoint(out).done)
        assert 0 < done_before < DOCS * 4
        broken["after"] = 10**9
        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight", sets=sets)
    assert code == cli.EXIT_OK, output
    assert_complete(out)


# --- a teacher whose replies are mostly junk --------------------------------------------


def junk_answers(seen: Seen) -> faults.Outcome:
    """Every answer's first two tries are the schema's field name (the quality gates reject
    it); the third try is answered properly, so no item is ever lost."""
    if seen.prompt.startswith("Answer the question") and "(Try 3" not in seen.prompt:
        return faults.completion('{"answer": "Answer"}')
    return None


async def test_mostly_junk_replies_stop_the_run_though_no_item_is_lost(tmp_path: Path) -> None:
    """Two of every three answer replies are junk: each item is won on its third try, so
    nothing is lost, but the stage's rejection rate is far above normal and stops the run."""
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    junk = FaultInjector(junk_answers)
    async with running_simulator(SimulatorConfig(fault=junk)) as sim:
        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight")
        sent = sim.state.total_requests
        assert code == cli.EXIT_FATAL, output
        assert "replies were rejected by the reply checks (field_name " in output
        assert "Likely fix: the teacher's replies are junk by the quality gates" in output
        # A window of 50 answer replies (the default) and the requests in flight, far short
        # of the corpus (DOCS x 29 requests, and twice as many again for the junk).
        assert sent < DOCS * 29 / 2, sent
        assert not (out / "failures.jsonl").exists() or (out / "failures.jsonl").read_bytes() == b""
        junk.plan = lambda seen: None  # the teacher is fixed
        code, output = await run_cli(sim.base_url, out, seeds, "--no-preflight")
    assert code == cli.EXIT_OK, output
    assert_complete(out)
