"""Structured teacher replies: the reply models, how to ask for them, and a lenient parser.

Every stage asks for JSON. How depends on the server (``teacher.structured_output``):
``json_schema`` (vLLM, OpenAI: enforced by guided decoding), ``json_object`` with a
``schema`` (llama.cpp), or ``text`` (the schema goes into the prompt). Replies are parsed
the same way in every mode, because servers sometimes wrap JSON in prose or code fences.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    StringConstraints,
    ValidationError,
    create_model,
)

from engine.errors import InvalidReply

Mode = Literal["json_schema", "json_object", "text"]
T = TypeVar("T", bound=BaseModel)
EXCERPT_CHARS = 300
# Brackets that start no JSON value, tried before giving up on a reply: a real reply has its
# JSON near the start, a degenerate one ("{{{{...") would otherwise take quadratic time.
MAX_FAILED_STARTS = 1000

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class Summary(BaseModel):
    """The summary stage's reply: one summary of the chunk."""

    summary: Text


class Answer(BaseModel):
    """The answer stage's reply: one answer to one question."""

    answer: Text


class Verdict(BaseModel):
    """The judge's reply: whether an answer is faithful to its document, and why."""

    faithful: bool
    reason: str


class KeyFact(BaseModel):
    """One key fact of a chunk, with the sentences of the chunk it comes from."""

    fact: Text
    context: Text


class QAPair(BaseModel):
    """One question/answer pair about a key fact."""

    question: Text
    answer: Text


# Unbounded bases give flows typed attribute access; the factories below subclass them with
# the configured array bounds, which is what guided decoding (and the test server) obey.
class Questions(BaseModel):
    """The questions stage's reply (bounded to the count asked by ``questions_model``)."""

    questions: list[Text]


class KeyFacts(BaseModel):
    """The key-facts stage's reply (bounded by ``key_facts_model``)."""

    facts: list[KeyFact]


class QAPairs(BaseModel):
    """The pairs-per-fact stage's reply (bounded by ``qa_pairs_model``)."""

    pairs: list[QAPair]


def _bounded(item: Any, count: int) -> Any:
    """A list of 1..count items; a longer list is cut to ``count`` rather than rejected."""

    def cut(value: Any) -> Any:
        return value[:count] if isinstance(value, list) else value

    return Annotated[list[item], Field(min_length=1, max_length=count), BeforeValidator(cut)]


@cache
def questions_model(count: int) -> type[Questions]:
    """``{"questions": [str, ...]}`` with at most ``count`` questions."""
    return create_model("Questions", __base__=Questions, questions=(_bounded(Text, count), ...))


@cache
def key_facts_model(max_facts: int) -> type[KeyFacts]:
    """``{"facts": [{"fact", "context"}, ...]}`` with at most ``max_facts`` facts."""
    return create_model("KeyFacts", __base__=KeyFacts, facts=(_bounded(KeyFact, max_facts), ...))


@cache
def qa_pairs_model(count: int) -> type[QAPairs]:
    """``{"pairs": [{"question", "answer"}, ...]}`` with at most ``count`` pairs."""
    return create_model("QAPairs", __base__=QAPairs, pairs=(_bounded(QAPair, count), ...))


@cache
def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema the teacher is given for ``model``: without the descriptions pydantic
    takes from the models' docstrings, which are notes for this code's readers (a small model
    copies "The answer stage's reply: ..." as its answer). Cached and shared by every request
    of a stage: treat as read-only."""
    schema = model.model_json_schema()
    for node in (schema, *schema.get("$defs", {}).values()):
        node.pop("description", None)
    return schema


@cache
def _schema_text(model: type[BaseModel]) -> str:
    return json.dumps(_schema(model), ensure_ascii=False)


def response_format(model: type[BaseModel], mode: Mode) -> dict[str, Any] | None:
    """The request's ``response_format`` for ``model`` in ``mode`` (None in text mode)."""
    if mode == "text":
        return None
    if mode == "json_object":
        return {"type": "json_object", "schema": _schema(model)}
    return {
        "type": "json_schema",
        "json_schema": {"name": model.__name__, "schema": _schema(model), "strict": False},
    }


def schema_instructions(model: type[BaseModel], mode: Mode) -> str:
    """Text appended to the last user message: answer with JSON only, and its shape.

    In text mode nothing else tells the server the schema, so it goes between ``<schema>``
    markers (which the project's simulated server reads).
    """
    if mode == "text":
        return (
            "Answer with one JSON value matching this JSON schema, and nothing else "
            f"(no prose, no code fences):\n<schema>\n{_schema_text(model)}\n</schema>"
        )
    return (
        "Answer with JSON only, no other text. The JSON must match this schema:\n"
        f"{_schema_text(model)}"
    )


# strict=False: a raw newline or tab inside a string is accepted. Models write them (small
# ones often, large ones now and then) and the meaning is plain; rejecting them loses the item.
_decoder = json.JSONDecoder(strict=False)
_OPENERS = re.compile(r"[\[{]")
_RUN_OF_OPENERS = re.compile(r"[\[{\s]+")


def parse_reply(text: str, model: type[T]) -> T:
    """The first JSON value in ``text`` that validates as ``model``.

    Skips prose, code fences and bracketed text that is not JSON. A bare array is accepted
    for a model with a single field. Raises ``InvalidReply`` when nothing validates.
    """
    return find_reply(text, model)[0]


def find_reply(text: str, model: type[T], *, last: bool = False) -> tuple[T, int, int]:
    """Like ``parse_reply``, with where the value is: ``(value, start, end)`` (characters).

    ``last``: the last value that validates instead of the first (an answer written after
    drafts, as in reasoning text).
    """
    first_error: ValidationError | None = None
    found: tuple[T, int, int] | None = None
    for value, start, end in _json_values(text):
        try:
            found = (model.model_validate(_fit(value, model)), start, end)
        except ValidationError as err:
            first_error = first_error or err
            continue
        if not last:
            return found
    if found is not None:
        return found
    excerpt = text[:EXCERPT_CHARS]
    if first_error is None:
        raise InvalidReply(
            f"no JSON value in the reply ({len(text)} chars)", check="no_json", body=excerpt
        )
    # Empty strings (or only spacing, stripped) are what the content checks call "blank".
    blank = all(e["type"] == "string_too_short" for e in first_error.errors())
    raise InvalidReply(
        f"reply does not match {model.__name__}: {_describe(first_error)}",
        check="blank" if blank else "schema",
        body=excerpt,
    )


def _json_values(text: str) -> Iterator[tuple[Any, int, int]]:
    """Each JSON object or array in ``text`` with its start and end, left to right, not
    looking inside those found."""
    pos = 0
    failures = 0
    while failures < MAX_FAILED_STARTS and (match := _OPENERS.search(text, pos)):
        try:
            value, end = _decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            # Each failure costs O(position) (the error counts lines), hence the cap.
            failures += 1
            pos = match.start() + 1
            continue
        except RecursionError:
            # A run of brackets nested too deep (a model stuck repeating "[["): retrying at
            # each of them would take quadratic time, so skip the whole run.
            run = _RUN_OF_OPENERS.match(text, match.start())
            pos = run.end() if run else match.start() + 1
            continue
        yield value, match.start(), end
        pos = end


def _fit(value: Any, model: type[BaseModel]) -> Any:
    fields = list(model.model_fields)
    if isinstance(value, list) and len(fields) == 1:
        return {fields[0]: value}
    return value


def _describe(err: ValidationError) -> str:
    errors = err.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "reply"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"
