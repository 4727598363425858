from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import BaseModel

from engine.errors import InvalidReply
from engine.flows.structured import (
    Answer,
    Mode,
    Questions,
    Verdict,
    key_facts_model,
    parse_reply,
    qa_pairs_model,
    questions_model,
    response_format,
    schema_instructions,
)

Q3 = questions_model(3)


@pytest.mark.parametrize(
    ("text", "model", "expected"),
    [
        ('{"answer": "42"}', Answer, {"answer": "42"}),
        ('  \n\t{"answer": "42"}  ', Answer, {"answer": "42"}),
        ('```json\n{"answer": "42"}\n```', Answer, {"answer": "42"}),
        ('```\n{"answer": "42"}\n```', Answer, {"answer": "42"}),
        ('Sure! Here it is:\n{"answer": "42"}\nHope this helps.', Answer, {"answer": "42"}),
        ('{"answer": "a {nested} brace } and ] in a string"}', Answer, None),
        ('Use {braces} carefully. {"answer": "x"}', Answer, {"answer": "x"}),
        ('See [1] and [2]. {"questions": ["Why?"]}', Q3, {"questions": ["Why?"]}),
        ('["What is a?", "What is b?"]', Q3, {"questions": ["What is a?", "What is b?"]}),
        ('{"answer": "first"} {"answer": "second"}', Answer, {"answer": "first"}),
        ('{"faithful": false, "reason": "adds a date"}', Verdict, None),
        ('{"answer": "  padded  "}', Answer, {"answer": "padded"}),
        ('{"questions": ["a", "b", "c", "d", "e"]}', Q3, {"questions": ["a", "b", "c"]}),
        ('{"answer": "x", "extra": 1}', Answer, {"answer": "x"}),
        # A raw newline or tab inside a string, as small models write them.
        ('{"answer": "line one\nline two\tend"}', Answer, {"answer": "line one\nline two\tend"}),
    ],
)
def test_parse_reply_finds_the_first_valid_json(
    text: str, model: type[BaseModel], expected: dict[str, Any] | None
) -> None:
    parsed = parse_reply(text, model)
    want = expected if expected is not None else json.loads(text)
    assert parsed.model_dump() == want


@pytest.mark.parametrize(
    ("text", "model", "reason", "check"),
    [
        ("", Answer, "no JSON value", "no_json"),
        ("I cannot answer that.", Answer, "no JSON value", "no_json"),
        ('{"answer": "unterminated', Answer, "no JSON value", "no_json"),
        ('```json\n{"answer": }\n```', Answer, "no JSON value", "no_json"),
        ('{"answer": ""}', Answer, "answer", "blank"),
        ('{"answer": "   "}', Answer, "answer", "blank"),
        ('{"response": "42"}', Answer, "answer", "schema"),
        ('{"questions": []}', Q3, "questions", "schema"),
        ('{"questions": ["ok", ""]}', Q3, "questions.1", "blank"),
        ('{"faithful": "maybe", "reason": "x"}', Verdict, "faithful", "schema"),
        ("[1, 2]", Answer, "does not match Answer", "schema"),
    ],
)
def test_parse_reply_rejects(text: str, model: type[BaseModel], reason: str, check: str) -> None:
    with pytest.raises(InvalidReply) as caught:
        parse_reply(text, model)
    assert reason in str(caught.value)
    assert caught.value.kind == "invalid_reply"
    assert caught.value.body == text[:300]
    # The stable code the failure is counted and grouped by: an empty string is "blank", the
    # content check's name for it.
    assert caught.value.check == check


def test_invalid_reply_body_is_a_short_excerpt() -> None:
    text = "no json here " * 100
    with pytest.raises(InvalidReply) as caught:
        parse_reply(text, Answer)
    assert caught.value.body == text[:300]


@pytest.mark.parametrize("garbage", ["[" * 100_000, "{" * 100_000, "[{" * 50_000, "[ " * 50_000])
def test_degenerate_brackets_are_invalid_quickly(garbage: str) -> None:
    # A model stuck repeating brackets must not block the event loop (no quadratic rescans).
    with pytest.raises(InvalidReply):
        parse_reply(garbage, Answer)


def test_response_format_json_schema() -> None:
    fmt = response_format(Q3, "json_schema")
    assert fmt == {
        "type": "json_schema",
        "json_schema": {"name": "Questions", "schema": Q3.model_json_schema(), "strict": False},
    }


def test_response_format_json_object_carries_the_schema() -> None:
    assert response_format(Answer, "json_object") == {
        "type": "json_object",
        "schema": {k: v for k, v in Answer.model_json_schema().items() if k != "description"},
    }


def test_response_format_text_is_none() -> None:
    assert response_format(Answer, "text") is None


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "text"])
def test_instructions_ask_for_json_only(mode: Mode) -> None:
    text = schema_instructions(Answer, mode)
    assert text.startswith("Answer with")
    assert "JSON only" in text or "and nothing else" in text
    assert '"answer"' in text  # the shape is spelled out in every mode


def test_text_mode_puts_the_schema_between_markers() -> None:
    text = schema_instructions(Q3, "text")
    match = re.search(r"<schema>(.*?)</schema>", text, re.DOTALL)
    assert match is not None
    assert json.loads(match.group(1)) == Q3.model_json_schema()


@pytest.mark.parametrize("mode", ["json_schema", "json_object"])
def test_non_text_modes_have_no_markers(mode: Mode) -> None:
    assert "<schema>" not in schema_instructions(Q3, mode)


def _array(schema: dict[str, Any], field: str) -> dict[str, Any]:
    prop: dict[str, Any] = schema["properties"][field]
    return prop


@pytest.mark.parametrize("count", [1, 5, 30])
def test_questions_model_bounds(count: int) -> None:
    schema = questions_model(count).model_json_schema()
    array = _array(schema, "questions")
    assert (array["minItems"], array["maxItems"]) == (1, count)
    assert array["items"] == {"type": "string", "minLength": 1}
    assert schema["required"] == ["questions"]


def test_key_facts_and_pairs_bounds() -> None:
    facts = key_facts_model(30).model_json_schema()
    assert (_array(facts, "facts")["minItems"], _array(facts, "facts")["maxItems"]) == (1, 30)
    fact = facts["$defs"]["KeyFact"]
    assert fact["required"] == ["fact", "context"]
    assert fact["properties"]["fact"]["minLength"] == 1
    pairs = qa_pairs_model(4).model_json_schema()
    assert (_array(pairs, "pairs")["minItems"], _array(pairs, "pairs")["maxItems"]) == (1, 4)
    assert pairs["$defs"]["QAPair"]["required"] == ["question", "answer"]


def test_factories_are_cached_and_typed() -> None:
    assert questions_model(5) is questions_model(5)
    assert questions_model(5) is not questions_model(6)
    assert issubclass(questions_model(5), Questions)
    assert key_facts_model(3) is key_facts_model(3)
    assert qa_pairs_model(3) is qa_pairs_model(3)


def test_verdict_schema() -> None:
    schema = Verdict.model_json_schema()
    assert schema["properties"]["faithful"]["type"] == "boolean"
    assert schema["required"] == ["faithful", "reason"]


@pytest.mark.parametrize(
    "model",
    [Answer, Verdict, Questions, questions_model(3), key_facts_model(2), qa_pairs_model(2)],
    ids=lambda m: m.__name__,
)
@pytest.mark.parametrize("mode", ["json_schema", "json_object", "text"])
def test_the_teacher_is_not_shown_the_code_s_docstrings(model: type[BaseModel], mode: Mode) -> None:
    # pydantic turns a model's docstring into its schema's description: notes for this code's
    # readers ("bounded by ``questions_model``") that a small model copies as its reply.
    shown = json.dumps(response_format(model, mode)) + schema_instructions(model, mode)
    assert "description" not in shown
    for line in (model.__doc__ or "").splitlines():
        if line.strip():
            assert line.strip() not in shown
