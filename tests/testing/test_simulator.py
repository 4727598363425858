from __future__ import annotations

import asyncio
import re
from typing import Any, Literal

import aiohttp
import orjson
import pytest
from aiohttp import web
from pydantic import BaseModel, Field

from engine.testing.schema_instance import instance_for_schema
from engine.testing.simulator import RunningSimulator, SimulatorConfig, running_simulator


class Source(BaseModel):
    title: str = Field(min_length=5, max_length=40)
    kind: Literal["book", "paper", "web"]


class QuestionSet(BaseModel):
    questions: list[str] = Field(min_length=1, max_length=4)
    source: Source
    sources: list[Source] = Field(min_length=2)
    tags: list[str]
    summary: str | None = None
    difficulty: int = Field(ge=1, le=5)
    confidence: float = Field(gt=0, lt=1)
    verified: bool
    version: Literal["v1"]


SCHEMA = QuestionSet.model_json_schema()
FENCED = re.compile(r"```json\n(.*?)\n```", re.DOTALL)


def chat_body(
    prompt: str = "Write questions about rivers.",
    *,
    response_format: dict[str, Any] | None = None,
    n: int = 1,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim-teacher",
        "messages": [
            {"role": "system", "content": "You are a teacher."},
            {"role": "user", "content": prompt},
        ],
        "temperature": 0.7,
        "max_tokens": 512,
        "n": n,
    }
    if response_format is not None:
        body["response_format"] = response_format
    return body


def body_for_mode(mode: str, n: int = 1) -> dict[str, Any]:
    if mode == "json_schema":
        rf = {"type": "json_schema", "json_schema": {"name": "qs", "schema": SCHEMA}}
        return chat_body(response_format=rf, n=n)
    if mode == "json_object":
        return chat_body(response_format={"type": "json_object", "schema": SCHEMA}, n=n)
    prompt = f"Write questions.\n<schema>{orjson.dumps(SCHEMA).decode()}</schema>"
    return chat_body(prompt, n=n)


async def post(
    sim: RunningSimulator, body: Any, *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sim.base_url}/chat/completions", data=data, headers=headers) as resp,
    ):
        return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


def contents(reply: dict[str, Any]) -> list[str]:
    return [c["message"]["content"] for c in reply["choices"]]


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "text"])
async def test_each_structured_mode_validates_against_the_schema(
    mode: str, sim: RunningSimulator
) -> None:
    status, reply, _ = await post(sim, body_for_mode(mode))
    assert status == 200
    content = contents(reply)[0]
    if mode == "text":
        assert content.startswith("Here is the result:")
        match = FENCED.search(content)
        assert match is not None
        content = match.group(1)
    parsed = QuestionSet.model_validate_json(content)
    assert len(parsed.questions) == 4  # maxItems wins over minItems
    assert len(parsed.sources) == 2  # minItems when there is no maxItems
    assert len(parsed.tags) == 3  # the default array_items
    assert all(q.endswith("?") for q in parsed.questions)
    assert parsed.summary is not None and parsed.summary.endswith(".")
    assert parsed.verified is True
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["finish_reason"] == "stop"


async def test_choices_differ_and_repeated_requests_are_identical(sim: RunningSimulator) -> None:
    _, first, _ = await post(sim, body_for_mode("json_schema", n=3))
    _, again, _ = await post(sim, body_for_mode("json_schema", n=3))
    _, other, _ = await post(sim, chat_body("Another prompt.", n=1))
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert len(set(contents(first))) == 3
    assert contents(first) == contents(again)
    assert contents(other)[0] not in contents(first)


async def test_without_n_support_one_choice_is_returned() -> None:
    async with running_simulator(SimulatorConfig(supports_n=False)) as sim:
        _, reply, _ = await post(sim, body_for_mode("json_object", n=3))
    assert len(reply["choices"]) == 1


async def test_text_without_schema_markers_is_plain_prose(sim: RunningSimulator) -> None:
    status, reply, _ = await post(sim, chat_body("Tell me about rivers."))
    content = contents(reply)[0]
    assert status == 200
    assert "```" not in content
    assert content.endswith(".")


async def test_api_key_is_required_when_configured() -> None:
    async with running_simulator(SimulatorConfig(api_key="sekrit")) as sim:
        missing, error, _ = await post(sim, chat_body())
        wrong, _, _ = await post(sim, chat_body(), headers={"Authorization": "Bearer nope"})
        right, _, _ = await post(sim, chat_body(), headers={"Authorization": "Bearer sekrit"})
    assert (missing, wrong, right) == (401, 401, 200)
    assert error["error"]["code"] == "invalid_api_key"
    assert error["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        {"model": "sim-teacher"},
        {"messages": []},
        chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        chat_body(response_format={"type": "grammar"}),
        chat_body(n=0),
    ],
)
async def test_malformed_bodies_get_400(body: Any, sim: RunningSimulator) -> None:
    status, reply, _ = await post(sim, body)
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["message"]


async def test_rpm_limit_answers_429_with_retry_after() -> None:
    async with running_simulator(SimulatorConfig(rpm_limit=2)) as sim:
        statuses = [(await post(sim, chat_body()))[0] for _ in range(2)]
        status, reply, headers = await post(sim, chat_body())
    assert statuses == [200, 200]
    assert status == 429
    assert reply["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60


async def test_models_lists_the_configured_model() -> None:
    async with (
        running_simulator(SimulatorConfig(model="teacher-x")) as sim,
        aiohttp.ClientSession() as session,
        session.get(f"{sim.base_url}/models") as resp,
    ):
        assert resp.status == 200
        listing = await resp.json()
    assert listing == {"object": "list", "data": [{"id": "teacher-x", "object": "model"}]}


async def test_usage_counts_tokens(sim: RunningSimulator) -> None:
    _, reply, _ = await post(sim, body_for_mode("json_schema", n=2))
    usage = reply["usage"]
    assert usage["prompt_tokens"] >= 1
    assert usage["completion_tokens"] >= sum(len(c) // 4 for c in contents(reply))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_latency_delays_each_reply_and_requests_overlap() -> None:
    waits: list[float] = []
    all_waiting = asyncio.Event()

    async def sleep(seconds: float) -> None:
        # Every reply waits out its latency, and none is sent before all three are waiting.
        waits.append(seconds)
        if len(waits) == 3:
            all_waiting.set()
        await all_waiting.wait()

    async with running_simulator(SimulatorConfig(latency_mean_s=0.05, sleep=sleep)) as sim:
        results = await asyncio.gather(*(post(sim, chat_body()) for _ in range(3)))
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert waits == [0.05, 0.05, 0.05]
    assert sim.state.peak_in_flight == 3
    assert sim.state.in_flight == 0


async def test_reasoning_field_is_added_when_configured() -> None:
    config = SimulatorConfig(reasoning_field="reasoning_content")
    async with running_simulator(config) as sim:
        _, reply, _ = await post(sim, body_for_mode("json_schema", n=2))
    for choice in reply["choices"]:
        assert choice["message"]["reasoning_content"]
        QuestionSet.model_validate_json(choice["message"]["content"])


def layout_config(layout: str, **extra: Any) -> SimulatorConfig:
    return SimulatorConfig(reasoning_layout=layout, **extra)  # type: ignore[arg-type]


class Questions(BaseModel):
    """A schema like the engine's own: strings constrained only to be there."""

    questions: list[str] = Field(min_length=1)


QUESTIONS = {"type": "json_schema", "json_schema": {"schema": Questions.model_json_schema()}}


async def reply_with(config: SimulatorConfig) -> dict[str, Any]:
    async with running_simulator(config) as sim:
        status, reply, _ = await post(sim, chat_body(response_format=QUESTIONS))
    assert status == 200
    (choice,) = reply["choices"]
    assert isinstance(choice, dict)
    return choice


async def test_reasoning_holds_a_draft_of_the_answer() -> None:
    choice = await reply_with(layout_config("field", reasoning_field="reasoning"))
    thinking = choice["message"]["reasoning"]
    draft = Questions.model_validate_json(thinking.split("A first draft: ", 1)[1])
    assert all(q.startswith("DRAFT ") for q in draft.questions)
    assert "DRAFT" not in choice["message"]["content"]
    Questions.model_validate_json(choice["message"]["content"])


async def test_answer_in_field_layout_is_vllm_16182() -> None:
    choice = await reply_with(layout_config("answer_in_field"))
    assert choice["message"]["content"] is None
    Questions.model_validate_json(choice["message"]["reasoning_content"])


async def test_thinking_blocks_layout() -> None:
    choice = await reply_with(layout_config("thinking_blocks"))
    thinking, text = choice["message"]["content"]
    assert thinking["type"] == "thinking" and "draft" in thinking["thinking"][0]["text"]
    Questions.model_validate_json(text["text"])


@pytest.mark.parametrize(
    ("layout", "tags", "pattern", "finish"),
    [
        ("inline", ("<think>", "</think>"), r"<think>Let me .*</think>\n\n\{.*\}", "stop"),
        ("inline", ("[THINK]", "[/THINK]"), r"\[THINK\]Let me .*\[/THINK\]\n\n\{.*\}", "stop"),
        ("template_opened", ("<think>", "</think>"), r"Let me .*\n</think>\n\n\{.*\}", "stop"),
        ("cut_off", ("<think>", "</think>"), r"<think>Let me .*draft: \{.*\}", "length"),
    ],
)
async def test_inline_layouts(
    layout: str, tags: tuple[str, str], pattern: str, finish: str
) -> None:
    choice = await reply_with(layout_config(layout, think_tags=tags))
    assert re.fullmatch(pattern, choice["message"]["content"], re.DOTALL)
    assert choice["finish_reason"] == finish
    assert "reasoning_content" not in choice["message"]


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="reasoning_layout"):
        layout_config("sideways")


async def test_state_records_each_request() -> None:
    async with running_simulator(SimulatorConfig(api_key="k")) as sim:
        auth = {"Authorization": "Bearer k"}
        await post(sim, body_for_mode("json_schema", n=2), headers=auth)
        await post(sim, chat_body("Plain question here."), headers=auth)
        await post(sim, chat_body())
    logs = sim.state.requests
    assert sim.state.total_requests == 3
    assert [log.status for log in logs] == [200, 200, 401]
    assert [log.response_format for log in logs[:2]] == ["json_schema", None]
    assert logs[0].n == 2
    assert logs[1].prompt_head == "Plain question here."
    assert all(log.finish is not None and log.finish >= log.arrival for log in logs)
    assert repr(sim.state) == "SimulatorState(requests=3, in_flight=0, peak_in_flight=1)"


async def test_fault_hook_can_replace_the_reply() -> None:
    seen: list[tuple[int, str]] = []

    async def fail_first(seq: int, body: dict[str, Any]) -> web.StreamResponse | None:
        seen.append((seq, body["model"]))
        return web.Response(status=503, text="overloaded") if seq == 0 else None

    async with running_simulator(SimulatorConfig(fault=fail_first)) as sim:
        async with aiohttp.ClientSession() as session:
            url = f"{sim.base_url}/chat/completions"
            async with session.post(url, json=chat_body()) as resp:
                assert resp.status == 503
        status, _, _ = await post(sim, chat_body())
    assert status == 200
    assert seen == [(0, "sim-teacher"), (1, "sim-teacher")]
    assert [log.status for log in sim.state.requests] == [503, 200]


# --- instance_for_schema directly ---------------------------------------------------


def test_anyof_picks_the_first_non_null_option() -> None:
    schema = {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 7, "maximum": 7}]}
    assert instance_for_schema(schema, "s") == 7
    assert instance_for_schema({"oneOf": [{"type": "null"}]}, "s") is None


def test_enum_and_const() -> None:
    assert instance_for_schema({"enum": ["a", "b"]}, "s") in {"a", "b"}
    assert instance_for_schema({"const": "fixed", "type": "string"}, "s") == "fixed"


def test_refs_into_defs_are_followed() -> None:
    schema = {
        "$defs": {"Leaf": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
        "type": "object",
        "properties": {"leaf": {"$ref": "#/$defs/Leaf"}},
    }
    assert instance_for_schema(schema, "s", boolean_value=False) == {"leaf": {"ok": False}}


def test_strings_respect_length_bounds_and_arrays_the_default_count() -> None:
    schema = {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 10}}
    values = instance_for_schema(schema, "s", array_items=5)
    assert len(values) == 5
    assert all(3 <= len(v) <= 10 for v in values)


def test_instances_depend_only_on_the_seed() -> None:
    assert instance_for_schema(SCHEMA, "a") == instance_for_schema(SCHEMA, "a")
    assert instance_for_schema(SCHEMA, "a") != instance_for_schema(SCHEMA, "b")
    QuestionSet.model_validate(instance_for_schema(SCHEMA, "b"))


def test_default_is_used_when_the_schema_has_no_type() -> None:
    schema = {"type": "object", "properties": {"anything": {"default": 42}}}
    assert instance_for_schema(schema, "s") == {"anything": 42}
