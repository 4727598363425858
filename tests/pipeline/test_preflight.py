"""The preflight: its decisions as tables, then against real local servers that misbehave the
way real ones do (the simulator with fault plans, and small servers started here)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from engine import cli
from engine.config import Config
from engine.errors import AuthError, PreflightFailed, Redirected
from engine.flows import StageSettings, stage_settings
from engine.output.manifest import MANIFEST_FILE
from engine.pipeline.job import probe_teacher, run_job
from engine.pipeline.preflight import (
    PROBE_PROMPT,
    Findings,
    context_length,
    probe_samples,
    probe_temperature,
    served_models,
    unfit_stages,
    url_alternatives,
    verdict,
)
from engine.pipeline.stats import Stats
from engine.plan import stage_prompts
from engine.teacher.wire import ProbeReply
from engine.testing.simulator import RunningSimulator, SimulatorConfig, running_simulator
from tests.support import faults
from tests.support.cli import DEFAULT_TOML, engine_cli
from tests.support.faults import FaultInjector, Plan, Seen
from tests.support.runs import (
    SAMPLE_SEEDS,
    assert_complete,
    config_for,
    corpus,
    pipeline_requests,
)
from tests.support.servers import redirecting_to, serving

CHAT = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "OK"}}]}


def reply(status: int | None, body: Any = b"", headers: dict[str, str] | None = None) -> ProbeReply:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return ProbeReply(
        "http://h/v1", status, headers or {}, raw, "refused" if status is None else ""
    )


# --- decisions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        (reply(200, CHAT), "ok"),
        (reply(200, {"choices": []}), "not_chat"),
        (reply(200, b"<html>Sign in</html>"), "not_chat"),
        (reply(301, headers={"Location": "https://h/v1"}), "redirect"),
        (reply(308), "redirect"),
        (reply(401), "auth"),
        (reply(403), "auth"),
        (reply(429), "transient"),
        (reply(503), "transient"),
        (reply(400, {"error": {"message": "bad"}}), "refused"),
        (reply(404), "refused"),
        (reply(500), "refused"),
        (reply(None), "unreachable"),
    ],
)
def test_verdict(probe: ProbeReply, expected: str) -> None:
    assert verdict(probe) == expected


LLAMA = "meta-llama/Llama-3.3-70B-Instruct"
VLLM_MODELS = {
    "object": "list",
    "data": [
        {"id": LLAMA, "object": "model", "max_model_len": 8192},
        {"id": "lora-a", "object": "model", "max_model_len": 8192},
    ],
}


@pytest.mark.parametrize(
    ("body", "model", "models", "context"),
    [
        (VLLM_MODELS, LLAMA, [LLAMA, "lora-a"], 8192),
        (VLLM_MODELS, "other", [LLAMA, "lora-a"], None),
        ({"data": [{"id": "gpt-4o", "object": "model"}]}, "gpt-4o", ["gpt-4o"], None),
        ({"data": [{"id": "m", "context_length": 32768}]}, "m", ["m"], 32768),
        ({"data": [{"id": "m", "max_model_len": True}]}, "m", ["m"], None),
        ({"data": [{"id": "m", "max_model_len": -1}]}, "m", ["m"], None),
        ({"detail": "Not Found"}, "m", None, None),
        ([1, 2], "m", None, None),
    ],
)
def test_models_and_context_from_a_models_answer(
    body: Any, model: str, models: list[str] | None, context: int | None
) -> None:
    assert served_models(body) == models
    assert context_length(body, model) == context


@pytest.mark.parametrize(
    ("url", "alternatives"),
    [
        ("http://h:8000", ["http://h:8000/v1"]),
        ("http://h:8000/v1", []),
        ("http://h:8000/v1/chat/completions", ["http://h:8000/v1"]),
        ("https://api.example.com/openai", ["https://api.example.com/openai/v1"]),
    ],
)
def test_url_alternatives(url: str, alternatives: list[str]) -> None:
    assert url_alternatives(url) == alternatives


def settings(
    max_tokens: int, key: str = "generation.t.max_tokens", samples: int = 1
) -> StageSettings:
    return StageSettings(key, max_tokens, key.replace("max_tokens", "temperature"), 0.7, samples)


def test_unfit_stages_count_the_stage_s_own_prompt() -> None:
    stages = {
        "t/summary": settings(2048),
        "t/answer": settings(1024, "generation.t.qa_max_tokens"),
        "t/questions": settings(1024, "generation.t.qa_max_tokens"),
        "u/judge": settings(1900, "generation.judge_max_tokens"),
    }
    prompts = {"t/summary": 300, "t/answer": 400, "t/questions": 500, "u/judge": 200}
    assert unfit_stages(stages, prompts, 4096) == []
    assert unfit_stages(stages, prompts, 2048) == [
        "generation.t.max_tokens = 2048 (its prompt alone is about 300 tokens)",
        "generation.judge_max_tokens = 1900 (its prompt alone is about 200 tokens)",
    ]
    # A key shared by two stages is named once.
    assert len(unfit_stages(stages, prompts, 1200)) == 3


def test_the_probe_uses_the_run_s_largest_n_and_a_temperature_other_than_1() -> None:
    stages = {"a": settings(10, samples=50), "b": settings(10, samples=1)}
    assert probe_samples(stages) == 50
    ones = {k: StageSettings(s.max_tokens_key, 10, "t", 1.0, 1) for k, s in stages.items()}
    assert probe_temperature(ones) == 1.0
    assert probe_temperature({**ones, "c": StageSettings("k", 10, "t", 0.3, 1)}) == 0.3


def test_stage_prompts_are_the_instructions_alone() -> None:
    config = config_for("http://h/v1", Path("/nonexistent"), "generation.judge=true")
    prompts = stage_prompts(config)
    assert set(prompts) == set(stage_settings(config))
    assert all(50 < tokens < 1000 for tokens in prompts.values()), prompts


# --- against local servers --------------------------------------------------------------


async def probe(config: Config) -> tuple[Findings | Exception, Stats]:
    stats = Stats()
    try:
        return await probe_teacher(config, stats), stats
    except (PreflightFailed, Redirected, AuthError) as err:
        return err, stats


def sim_config(sim: RunningSimulator, out: Path, *extra: str, base: str = "") -> Config:
    return config_for(base or sim.base_url, out, *extra)


def chat_probes(sim: RunningSimulator) -> int:
    return len(sim.state.requests) - len(pipeline_requests(sim))


async def test_a_healthy_teacher_passes_in_four_requests(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(max_model_len=32768)) as sim:
        found, stats = await probe(sim_config(sim, tmp_path))
        http = list(sim.state.http)
    assert isinstance(found, Findings), found
    assert found.context == 32768 and found.adapted == [] and found.notes == []
    assert found.summary() == [
        "context 32768 tokens",
        "every request feature the run uses is accepted",
    ]
    # /models, a minimal request, the run's shape; the context came from /models.
    assert stats.teacher.preflight_requests == len(http) == 3
    assert [(m, p) for m, p, _s in http] == [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
    ]
    shape = sim.state.requests[-1]
    assert (shape.n, shape.response_format) == (3, "json_schema")  # the run's n and mode


async def test_an_unreachable_endpoint_is_one_line(tmp_path: Path) -> None:
    found, stats = await probe(config_for("http://127.0.0.1:9/v1", tmp_path))
    assert isinstance(found, PreflightFailed)
    assert str(found).startswith("cannot reach the teacher at http://127.0.0.1:9/v1: ")
    assert "check TEACHER_MODEL_BASE_URL (host and port) and that the server is running" in str(
        found
    )
    assert stats.teacher.preflight_requests == 1


async def test_a_base_url_without_v1_names_the_url_that_works(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(prefixes=("/v1",))) as sim:
        bare = sim.base_url.removesuffix("/v1")
        found, stats = await probe(sim_config(sim, tmp_path, base=bare))
    assert isinstance(found, PreflightFailed)
    assert str(found).endswith(f"TEACHER_MODEL_BASE_URL should end in /v1: use {sim.base_url}")
    assert stats.teacher.preflight_requests == 3  # /models, the chat path, the chat path with /v1


async def test_a_pasted_chat_completions_url_names_the_base(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(prefixes=("/v1",))) as sim:
        pasted = sim.base_url + "/chat/completions"
        found, _stats = await probe(sim_config(sim, tmp_path, base=pasted))
    assert isinstance(found, PreflightFailed)
    assert str(found).endswith(f"TEACHER_MODEL_BASE_URL should be {sim.base_url}")


async def test_a_model_not_served_lists_what_is(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(model="served-model", strict_model=True)) as sim:
        found, stats = await probe(sim_config(sim, tmp_path))
    assert isinstance(found, PreflightFailed)
    assert f"the teacher at {sim.base_url} does not serve the model 'sim-teacher'" in str(found)
    assert "it serves: served-model: set TEACHER_MODEL_NAME to one of them" in str(found)
    assert stats.teacher.preflight_requests == 2


@pytest.mark.parametrize("reported", [True, False], ids=["in_models", "from_the_error"])
async def test_max_tokens_over_the_context_names_each_key(tmp_path: Path, reported: bool) -> None:
    simulated = SimulatorConfig(max_model_len=2048, report_context=reported)
    async with running_simulator(simulated) as sim:
        found, stats = await probe(sim_config(sim, tmp_path))
    assert isinstance(found, PreflightFailed)
    text = str(found)
    assert text.startswith("the model's context is 2048 tokens (")
    for gen_type in (
        "extractive_summary",
        "detailed_summary",
        "key_facts_to_qa",
        "document_based_qa",
    ):
        assert f"generation.{gen_type}.max_tokens = 2048 (its prompt alone is about " in text
    assert "qa_max_tokens" not in text  # 1024 fits
    assert ("/v1/models" in text) == reported
    assert stats.teacher.preflight_requests == (3 if reported else 4)


def refuses(
    condition: Callable[[dict[str, Any]], bool], response: Callable[[], web.Response]
) -> Plan:
    def plan(seen: Seen) -> faults.Outcome:
        return response() if condition(seen.body) else None

    return plan


async def run_against(
    plan: Plan, out: Path, *extra: str, simulated: SimulatorConfig | None = None
) -> tuple[Stats, RunningSimulator]:
    """A whole run (the sample seeds) against the simulator with ``plan``; returns its stats."""
    injector = FaultInjector(plan)
    base = simulated or SimulatorConfig()
    async with running_simulator(SimulatorConfig(**{**base.__dict__, "fault": injector})) as sim:
        stats = Stats()
        await run_job(config_for(sim.base_url, out, *extra), stats)
    return stats, sim


N_REFUSED = refuses(
    lambda body: body.get("n", 1) > 1,
    lambda: faults.error(400, "'n' must be 1 when using this model", code="invalid_value"),
)


async def test_a_refused_n_is_asked_as_single_requests_for_the_whole_run(tmp_path: Path) -> None:
    stats, sim = await run_against(N_REFUSED, tmp_path)
    assert_complete(tmp_path, docs=3)
    assert {log.n for log in pipeline_requests(sim)} == {1}
    assert stats.adapted == [
        "the server does not take n > 1 (it refuses n=3: HTTP 400: 'n' must be 1 when using "
        "this model): asking for each sample as its own request for the whole run"
    ]
    manifest = orjson.loads((tmp_path / MANIFEST_FILE).read_bytes())
    assert manifest["adapted_to_server"] == stats.adapted
    assert manifest["settings"]["extractive_summary"]["summaries"] == 3  # the settings stand
    # Found again on a resume, and not a change of settings.
    stats, _sim = await run_against(N_REFUSED, tmp_path, "generation.document_based_qa.questions=4")
    assert stats.preflight_ran is False  # nothing left to do: nothing sent at all


async def test_a_server_that_ignores_n_is_asked_single_requests(tmp_path: Path) -> None:
    """llama.cpp answers one choice whatever n asks for."""
    stats, sim = await run_against(
        lambda _seen: None, tmp_path, simulated=SimulatorConfig(supports_n=False)
    )
    assert_complete(tmp_path, docs=3)
    assert {log.n for log in pipeline_requests(sim)} == {1}
    assert "it answered 1 of n=3 choices" in stats.adapted[0]


LLAMA_CPP_SCHEMA = refuses(
    lambda body: (body.get("response_format") or {}).get("type") == "json_schema",
    lambda: faults.error(
        500,
        "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  Input "
        "should be 'text' or 'json_object'",
    ),
)


async def test_a_refused_structured_output_mode_names_the_one_that_works(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(fault=FaultInjector(LLAMA_CPP_SCHEMA))) as sim:
        found, _stats = await probe(sim_config(sim, tmp_path))
    assert isinstance(found, PreflightFailed)
    text = str(found)
    assert text.startswith('the server refuses teacher.structured_output = "json_schema" (HTTP 500')
    assert text.endswith(
        'set it to "json_object", which it accepts '
        "(--set 'teacher.structured_output=\"json_object\"')"
    )


def refused_max_tokens() -> web.Response:
    """OpenAI's answer to max_tokens from a reasoning model."""
    return faults.error(
        400,
        "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
        "'max_completion_tokens' instead.",
        code="unsupported_parameter",
        kind="invalid_request_error",
    )


def refused_temperature() -> web.Response:
    return faults.error(
        400,
        "Unsupported value: 'temperature' does not support 0.3 with this model. Only the "
        "default (1) value is supported.",
        code="unsupported_value",
        kind="invalid_request_error",
    )


async def test_a_reasoning_model_gets_max_completion_tokens_and_no_temperature(
    tmp_path: Path,
) -> None:
    """OpenAI's reasoning models refuse both; the run adapts, says so once, and completes."""

    def plan(seen: Seen) -> faults.Outcome:
        if "max_tokens" in seen.body:
            return refused_max_tokens()
        return refused_temperature() if seen.body.get("temperature", 1) != 1 else None

    stats, sim = await run_against(plan, tmp_path)
    assert_complete(tmp_path, docs=3)
    assert stats.adapted[0].startswith("the server refuses max_tokens and asks for max_completion")
    assert stats.adapted[1].startswith("the server refuses temperature=0.3 (HTTP 400: Unsupported")
    assert len(stats.adapted) == 2
    sent = pipeline_requests(sim)
    assert sent and stats.failures.total() == 0
    manifest = orjson.loads((tmp_path / MANIFEST_FILE).read_bytes())
    assert manifest["adapted_to_server"] == stats.adapted


async def test_a_redirect_is_reported_with_the_final_url(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig()) as sim, redirecting_to(sim.base_url) as moved:
        old, seen = moved
        found, stats = await probe(sim_config(sim, tmp_path, base=old))
        assert sim.state.http == []
    assert isinstance(found, Redirected)
    assert seen == ["GET /v1/models"] and stats.teacher.preflight_requests == 1
    assert f"set TEACHER_MODEL_BASE_URL to the final URL, {sim.base_url}" in str(found)


async def test_rejected_credentials_stop_at_the_first_probe(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(api_key="sk-right")) as sim:
        found, stats = await probe(sim_config(sim, tmp_path, 'teacher.api_key="sk-wrong-key"'))
    assert isinstance(found, AuthError) and "HTTP 401" in str(found)
    assert "sk-wrong-key" not in str(found)
    assert stats.teacher.preflight_requests == 1


async def test_a_login_page_with_status_200_is_named(tmp_path: Path) -> None:
    page = "<html><title>Sign in - Corporate SSO</title></html>"
    plan = refuses(lambda _body: True, lambda: faults.text(page, content_type="text/html"))
    async with running_simulator(SimulatorConfig(fault=FaultInjector(plan))) as sim:
        found, _stats = await probe(sim_config(sim, tmp_path))
    assert isinstance(found, PreflightFailed)
    assert "answers HTTP 200 with something that is not a chat completion" in str(found)
    assert "Sign in - Corporate SSO" in str(found)


async def test_a_busy_server_is_asked_again_not_failed(tmp_path: Path) -> None:
    def plan(seen: Seen) -> faults.Outcome:
        busy = seen.attempt < 3 and seen.index == 0
        return faults.error(503, "loading", headers={"retry-after": "0"}) if busy else None

    async with running_simulator(SimulatorConfig(fault=FaultInjector(plan))) as sim:
        found, stats = await probe(sim_config(sim, tmp_path, "retry.backoff_base_s=0.01"))
    assert isinstance(found, Findings), found
    # /models, the minimal request 3 times, shape, context
    assert stats.teacher.preflight_requests == 6


async def test_a_dead_replica_is_noted_and_the_others_carry_on(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        urls = f'teacher.base_url=["{sim.base_url}", "http://127.0.0.1:9/v1"]'
        found, _stats = await probe(sim_config(sim, tmp_path, urls))
    assert isinstance(found, Findings), found
    assert found.notes[0].startswith("replica http://127.0.0.1:9/v1 does not answer (")


# --- the command line -------------------------------------------------------------------


def env_for(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
    return env | {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": "sim-teacher"}


async def test_validate_probe_sends_only_the_preflight(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(max_model_len=32768)) as sim:
        code, output = await engine_cli(
            "validate", DEFAULT_TOML, "--probe", "--set", f'output.dir="{tmp_path / "out"}"',
            "--set", f'input.seeds="{SAMPLE_SEEDS}"', cwd=tmp_path, env=env_for(sim.base_url),
        )  # fmt: skip
        assert len(sim.state.http) == 3 and chat_probes(sim) == 2
    assert code == cli.EXIT_OK, output
    assert (
        "teacher OK (3 requests): context 32768 tokens; every request feature the run uses is "
        "accepted"
    ) in output


async def test_validate_probe_exits_1_with_the_fix(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig(prefixes=("/v1",))) as sim:
        bare = sim.base_url.removesuffix("/v1")
        code, output = await engine_cli(
            "validate", DEFAULT_TOML, "--probe", "--set", f'output.dir="{tmp_path / "out"}"',
            "--set", f'input.seeds="{SAMPLE_SEEDS}"', cwd=tmp_path, env=env_for(bare),
        )  # fmt: skip
    assert code == cli.EXIT_FATAL, output
    assert f"teacher check failed (3 requests): {bare}/chat/completions answers HTTP 404" in output
    assert f"TEACHER_MODEL_BASE_URL should end in /v1: use {sim.base_url}" in output


async def test_run_stops_on_the_preflight_before_any_seed_row(tmp_path: Path) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    async with running_simulator(SimulatorConfig(max_model_len=2048)) as sim:
        code, output = await engine_cli(
            "run", DEFAULT_TOML, "--set", f'output.dir="{out}"', "--set", f'input.seeds="{seeds}"',
            cwd=tmp_path, env=env_for(sim.base_url),
        )  # fmt: skip
        assert pipeline_requests(sim) == []  # only probes went out
    assert code == cli.EXIT_FATAL, output
    assert output.count("the model's context is 2048 tokens") == 2  # the log line, the summary
    got = orjson.loads((out / "run_report.json").read_bytes())
    assert got["preflight"] == {"requests": 3, "adapted": []}
    assert got["exit"]["status"] == "fatal"


async def test_no_preflight_sends_no_probe(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        stats = Stats()
        await run_job(config_for(sim.base_url, tmp_path), stats, preflight=False)
        assert chat_probes(sim) == 0 and not any(
            p.endswith("/models") for _m, p, _s in sim.state.http
        )
    assert (stats.preflight_ran, stats.teacher.preflight_requests) == (False, 0)
    assert "preflight" not in orjson.dumps(stats.adapted).decode()


async def test_the_probe_prompt_is_what_the_probes_send(tmp_path: Path) -> None:
    bodies: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        if request.method == "POST":
            bodies.append(await request.json())
        return web.json_response(CHAT if request.method == "POST" else {"data": []})

    async with serving(handler) as url:
        found, _stats = await probe(config_for(url, tmp_path))
    assert isinstance(found, Findings)
    assert all(body["messages"] == [{"role": "user", "content": PROBE_PROMPT}] for body in bodies)
    assert (
        "/models does not list 'sim-teacher' ((none)), but the server answers for it"
        in (found.notes[0])
    )
