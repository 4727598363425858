"""End to end: the whole engine against a real local OpenAI-compatible server over HTTP."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.config import Config, load_config
from engine.output.records import record_fields
from engine.pipeline.job import run_job
from engine.pipeline.preflight import PROBE_PROMPT
from engine.pipeline.stats import Stats
from engine.testing.simulator import (
    RequestLog,
    RunningSimulator,
    SimulatorConfig,
    running_simulator,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SEEDS = REPO / "config" / "sample_seeds.jsonl"
TEXT_FIELDS = ("question", "response", "document", "document_outline", "domain")
# Where the raw chunk is: Module 4 renames base_document to raw_document for document QA only.
CHUNK_FIELD = {"document_based_qa": "base_document"}
# Small fan-out: N summaries, Q questions each, F facts x P pairs, D document questions.
N, Q, F, P, D = 3, 2, 2, 3, 4
EXPECTED_PER_DOC = {
    "extractive_summary": N * Q,
    "detailed_summary": N * Q,
    "key_facts_to_qa": F * P,
    "document_based_qa": D,
}
# Requests per document: one summary request (n=N) + N question requests + N*Q answers per
# summary type; one key-facts request + F pair requests; one question request + D answers.
REQUESTS_PER_DOC = 2 * (1 + N + N * Q) + (1 + F) + (1 + D)
SMALL = [
    f"generation.extractive_summary.summaries={N}",
    f"generation.extractive_summary.questions_per_summary={Q}",
    f"generation.detailed_summary.summaries={N}",
    f"generation.detailed_summary.questions_per_summary={Q}",
    f"generation.key_facts_to_qa.max_facts={F}",
    f"generation.key_facts_to_qa.qa_per_fact={P}",
    f"generation.document_based_qa.questions={D}",
    "limits.requests_per_minute=100000",
]


async def engine_cli(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """``python -m engine ARGS`` as a user runs it: its exit code and everything it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", *args,
        cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, output.decode()


def config_for(base_url: str, out: Path, *extra: str) -> Config:
    overrides = [*SMALL, f'output.dir="{out}"', f'input.seeds="{SAMPLE_SEEDS}"', *extra]
    env = {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": "sim-teacher"}
    return load_config(REPO / "config" / "default.toml", overrides, environ=env, dotenv_path=out)


def pipeline_requests(sim: RunningSimulator) -> list[RequestLog]:
    """The chat requests the server got for the data, without the preflight's probes."""
    return [log for log in sim.state.requests if log.prompt_head != PROBE_PROMPT]


def read_gen(out: Path, gen_type: str) -> list[dict[str, Any]]:
    path = out / gen_type / "gen.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def seed_count() -> int:
    return len(SAMPLE_SEEDS.read_bytes().splitlines())


def assert_record_shape(record: dict[str, Any], gen_type: str) -> None:
    """Every field of the type, in order, and the texts Module 4 reads not empty."""
    assert list(record) == list(record_fields(gen_type)), gen_type
    for field in (*TEXT_FIELDS, CHUNK_FIELD.get(gen_type, "raw_document"), "id", "doc_id"):
        assert isinstance(record[field], str) and record[field].strip(), (gen_type, field)


def assert_complete_output(out: Path) -> None:
    docs = seed_count()
    for gen_type, per_doc in EXPECTED_PER_DOC.items():
        records = read_gen(out, gen_type)
        assert len(records) == docs * per_doc, gen_type
        assert len({r["id"] for r in records}) == len(records), gen_type
        for record in records:
            assert record["gen_type"] == gen_type
            assert_record_shape(record, gen_type)
        if gen_type.endswith("summary"):
            per_doc_documents: dict[str, set[str]] = {}
            for record in records:
                per_doc_documents.setdefault(record["doc_id"], set()).add(record["document"])
            assert all(len(d) == N for d in per_doc_documents.values()), gen_type
        if gen_type == "key_facts_to_qa":
            assert all(r["key_fact"].strip() for r in records)
    assert not (out / "failures.jsonl").exists() or (out / "failures.jsonl").stat().st_size == 0


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "text"])
async def test_all_four_types_in_every_structured_mode(tmp_path: Path, mode: str) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        config = config_for(sim.base_url, tmp_path, f'teacher.structured_output="{mode}"')
        stats = Stats()
        await run_job(config, stats)
        formats = {log.response_format for log in pipeline_requests(sim)}
        sent = len(pipeline_requests(sim))
        probes = sim.state.total_requests - sent
    assert_complete_output(tmp_path)
    assert sent == stats.requests_sent == seed_count() * REQUESTS_PER_DOC
    assert formats == ({None} if mode == "text" else {mode})
    assert sum(stats.failures.values()) == 0
    # The preflight: GET /models, a minimal request, the run's shape, the largest max_tokens.
    assert (stats.preflight_requests, probes) == (4, 3)


async def test_without_n_support_each_summary_is_its_own_request(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(supports_n=False)) as sim:
        config = config_for(sim.base_url, tmp_path, "teacher.supports_n=false")
        await run_job(config, Stats())
        assert all(log.n == 1 for log in sim.state.requests)
    assert_complete_output(tmp_path)


async def test_judge_and_reasoning(tmp_path: Path) -> None:
    sim_config = SimulatorConfig(reasoning_field="reasoning_content")
    async with running_simulator(sim_config) as sim:
        config = config_for(sim.base_url, tmp_path, "generation.judge=true")
        stats = Stats()
        await run_job(config, stats)
        sent = len(pipeline_requests(sim))
    assert_complete_output(tmp_path)
    assert all(r.get("reasoning") for r in read_gen(tmp_path, "document_based_qa"))
    assert sum(stats.judged_out.values()) == 0
    # One judge request per pair, on top of the generation requests.
    assert sent == seed_count() * (REQUESTS_PER_DOC + sum(EXPECTED_PER_DOC.values()))


async def test_rerun_resumes_without_sending_anything(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        config = config_for(sim.base_url, tmp_path)
        await run_job(config, Stats())
        sent = sim.state.total_requests
        again = Stats()
        await run_job(config, again)
        assert sim.state.total_requests == sent
    assert sum(again.units_skipped.values()) == seed_count() * 4
    assert_complete_output(tmp_path)


async def test_cli_run_as_a_user_would(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(api_key="sk-test-key")) as sim:
        env = {
            **os.environ,
            "TEACHER_MODEL_BASE_URL": sim.base_url,
            "TEACHER_MODEL_NAME": "sim-teacher",
            "TEACHER_MODEL_API_KEY": "sk-test-key",
        }
        sets = [a for s in [*SMALL, f'output.dir="{tmp_path}"'] for a in ("--set", s)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine", "run", "config/default.toml", *sets,
            cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await proc.communicate()
    text = output.decode()
    assert proc.returncode == 0, text
    assert "sk-test-key" not in text
    assert_complete_output(tmp_path)
    for path in tmp_path.rglob("*.jsonl"):
        assert b"sk-test-key" not in path.read_bytes()


async def test_cli_config_error_exits_2_before_any_request(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", "run", str(REPO / "config" / "default.toml"),
        "--set", "limits.max_concurrency=-1", "--set", "limits.typo=1",
        "--set", 'teacher.backend="http"',
        cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await proc.communicate()
    text = output.decode()
    assert proc.returncode == 2
    for expected in ("TEACHER_MODEL_BASE_URL", "limits.max_concurrency", "limits.typo"):
        assert expected in text
