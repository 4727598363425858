"""The table of known causes: for how items were lost and what the server said, the fix."""

from __future__ import annotations

import pytest

from engine.config import load_config
from engine.flows import stage_settings
from engine.pipeline.breaker import Signature
from engine.pipeline.causes import RunSettings, likely_fix
from tests.support.runs import REPO

CONFIG = load_config(
    REPO / "config" / "default.toml",
    ["generation.judge=true"],
    environ={"TEACHER_MODEL_BASE_URL": "http://h:8000/v1", "TEACHER_MODEL_NAME": "m"},
    dotenv_path=REPO / "no.env",
)
RUN = RunSettings(stage_settings(CONFIG), "json_schema", True, "m", ("http://h:8000",))

VLLM_CONTEXT = (
    "This model's maximum context length is 2048 tokens. However, you requested 2410 tokens "
    "(362 in the messages, 2048 in the completion)."
)
OPENAI_MAX_TOKENS = (
    "Unsupported parameter: 'max_tokens' is not supported with this model. "
    "Use 'max_completion_tokens' instead."
)
OPENAI_TEMPERATURE = (
    "Unsupported value: 'temperature' does not support 0.3 with this model. "
    "Only the default (1) value is supported."
)
LLAMA_CPP_SCHEMA = (
    "1 validation error for CreateChatCompletionRequest response_format.type Input should be "
    "'text' or 'json_object'"
)


def rejected(stage: str, status: int) -> Signature:
    return Signature(stage, "request_rejected", status=status)


CASES = [
    (
        rejected("extractive_summary/summary", 400),
        VLLM_CONTEXT,
        "lower generation.extractive_summary.max_tokens (now 2048)",
    ),
    (
        rejected("key_facts_to_qa/qa", 400),
        "context_length_exceeded",
        "lower generation.key_facts_to_qa.qa_max_tokens (now 1024)",
    ),
    (
        rejected("document_based_qa/judge", 400),
        VLLM_CONTEXT,
        "lower generation.judge_max_tokens (now 512)",
    ),
    (rejected("document_based_qa/questions", 400), OPENAI_MAX_TOKENS, "max_completion_tokens"),
    (
        rejected("document_based_qa/answer", 400),
        OPENAI_TEMPERATURE,
        "or set generation.document_based_qa.qa_temperature to 1",
    ),
    (
        Signature("key_facts_to_qa/key_facts", "retries_exhausted", status=500),
        LLAMA_CPP_SCHEMA,
        'set it to "json_object"',
    ),
    (
        rejected("detailed_summary/summary", 400),
        "'n' must be 1 for this model",
        "set teacher.supports_n = false",
    ),
    (
        rejected("detailed_summary/summary", 400),
        "n > 1 is not supported",
        "set teacher.supports_n = false",
    ),
    (
        rejected("document_based_qa/questions", 404),
        "Not Found",
        "TEACHER_MODEL_BASE_URL should probably end in /v1: try http://h:8000/v1",
    ),
    (
        rejected("document_based_qa/questions", 404),
        "The model `m` does not exist.",
        "does not serve TEACHER_MODEL_NAME = 'm'",
    ),
    (rejected("document_based_qa/questions", 405), "Method Not Allowed", "does not take a POST"),
    (rejected("document_based_qa/questions", 413), "Request Entity Too Large", "too large"),
    (
        Signature("document_based_qa/answer", "retries_exhausted", status=200),
        "HTTP 200 but the body is not JSON: <html>",
        "login page",
    ),
    (
        Signature("document_based_qa/answer", "retries_exhausted", status=503),
        "CUDA out of memory",
        "fails these requests with HTTP 503",
    ),
    (rejected("document_based_qa/answer", 422), "bad thing", "refuses these requests (HTTP 422)"),
    (
        Signature("detailed_summary/summary", "invalid_reply", check="cut_off"),
        "cut off at max_tokens=2048",
        "raise generation.detailed_summary.max_tokens (now 2048)",
    ),
    (
        Signature("document_based_qa/questions", "invalid_reply", check="no_json"),
        "no JSON value in the reply",
        "does not answer with JSON",
    ),
    (
        Signature("document_based_qa/questions", "invalid_reply", check="schema"),
        "reply does not match",
        "do not match the stage's JSON schema",
    ),
    (
        Signature("extractive_summary/summary", "invalid_reply", check="duplicate"),
        "the same text as an earlier sample",
        "raise generation.extractive_summary.temperature",
    ),
    (
        Signature("extractive_summary/summary", "retries_exhausted", check="timeout"),
        "no reply in time",
        "raise teacher.timeout_s",
    ),
    (
        Signature("extractive_summary/answer", "invalid_reply", check="too_short"),
        "answer too short",
        "keep failing the 'too_short' check",
    ),
]


@pytest.mark.parametrize(("signature", "said", "fix"), CASES)
def test_likely_fix(signature: Signature, said: str, fix: str) -> None:
    assert fix in likely_fix(signature, said, RUN)


def test_a_context_fix_names_every_key_as_large() -> None:
    fix = likely_fix(rejected("extractive_summary/summary", 400), VLLM_CONTEXT, RUN)
    assert (
        "lower generation.extractive_summary.max_tokens (now 2048) (and as large: "
        "generation.detailed_summary.max_tokens, generation.document_based_qa.max_tokens, "
        "generation.key_facts_to_qa.max_tokens)"
    ) in fix


def test_a_structured_output_fix_names_the_other_modes() -> None:
    run = RunSettings(RUN.stages, "json_object", True, "m")
    fix = likely_fix(rejected("t/s", 400), "response_format json_object is not supported", run)
    assert 'set it to "json_schema"' in fix and '"text"' in fix


def test_n_is_blamed_only_where_the_run_asks_for_several_samples() -> None:
    said = "n must be 1"
    single = RunSettings(RUN.stages, "json_schema", False, "m")
    assert "supports_n" not in likely_fix(rejected("extractive_summary/summary", 400), said, single)
    assert "supports_n" not in likely_fix(rejected("document_based_qa/answer", 400), said, RUN)


def test_a_404_with_v1_already_asks_for_the_api_base() -> None:
    run = RunSettings(RUN.stages, "json_schema", True, "m", ("http://h:8000/v1",))
    fix = likely_fix(rejected("t/s", 404), "Not Found", run)
    assert fix.startswith("check TEACHER_MODEL_BASE_URL: it must be the API base")


def test_every_cause_gets_some_advice() -> None:
    assert "failures.jsonl" in likely_fix(Signature("t/s", "item"), "", RUN)
