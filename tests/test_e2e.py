"""End to end: the whole engine against a real local OpenAI-compatible server over HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.testing.simulator import (
    SimulatorConfig,
    running_simulator,
)
from tests.support.cli import (
    DEFAULT_TOML,
    engine_cli,
    set_args,
    teacher_env,
)
from tests.support.runs import (
    EXPECTED_PER_DOC,
    REQUESTS_PER_DOC,
    SMALL,
    assert_complete_output,
    config_for,
    pipeline_requests,
    read_gen,
    seed_count,
)


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
    assert sent == stats.teacher.requests_sent == seed_count() * REQUESTS_PER_DOC
    assert formats == ({None} if mode == "text" else {mode})
    assert sum(stats.failures.values()) == 0
    # The preflight: GET /models, a minimal request, the run's shape, the largest max_tokens.
    assert (stats.teacher.preflight_requests, probes) == (4, 3)


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
        code, text = await engine_cli(
            "run", "config/default.toml", *set_args(*SMALL, f'output.dir="{tmp_path}"'), env=env
        )
    assert code == 0, text
    assert "sk-test-key" not in text
    assert_complete_output(tmp_path)
    for path in tmp_path.rglob("*.jsonl"):
        assert b"sk-test-key" not in path.read_bytes()


async def test_cli_config_error_exits_2_before_any_request(tmp_path: Path) -> None:
    code, text = await engine_cli(
        "run", DEFAULT_TOML,
        *set_args("limits.max_concurrency=-1", "limits.typo=1", 'teacher.backend="http"'),
        cwd=tmp_path, env=teacher_env(),
    )  # fmt: skip
    assert code == 2
    for expected in ("TEACHER_MODEL_BASE_URL", "limits.max_concurrency", "limits.typo"):
        assert expected in text
