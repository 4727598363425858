"""Shared test doubles: a scripted fake teacher, a fake transport, reply builders, seed rows.

``FakeTeacher(script)`` implements the ``Teacher`` protocol. ``script(request)`` returns a
``ChatReply`` (or an awaitable of one), raises to simulate a lost request, or returns None
to get the default reply: a valid JSON instance of the request's schema (taken from
``response_format`` or from ``<schema>`` markers), one per choice asked, arrays filled to
``maxItems``, strings distinct across the whole fake's lifetime.

``FakeTransport(exchange)`` implements the ``Transport`` under a real ``HTTPTeacher``
(``make_teacher``): the client's routing, limiting and retries against scripted answers.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from engine.config import Config, RetryConfig, TeacherConfig
from engine.seeds import SeedRow, doc_id_for
from engine.teacher.client import HTTPTeacher
from engine.teacher.limits import RequestLimiter
from engine.teacher.protocol import ChatReply, ChatRequest, Choice
from engine.teacher.stats import RequestStats
from engine.teacher.transport import Response

Script = Callable[[ChatRequest], ChatReply | Awaitable[ChatReply | None] | None]
_SCHEMA_MARKERS = re.compile(r"<schema>\n?(.*?)\n?</schema>", re.DOTALL)


def reply(
    *values: Any,
    model: str = "",
    reasoning: str | None = None,
    finish_reason: str = "stop",
) -> ChatReply:
    """A reply with one choice per value, each the value as JSON text."""
    return text_reply(
        *(json.dumps(v) for v in values),
        model=model,
        reasoning=reasoning,
        finish_reason=finish_reason,
    )


def text_reply(
    *texts: str,
    model: str = "",
    reasoning: str | None = None,
    finish_reason: str = "stop",
) -> ChatReply:
    """A reply with one choice per text, verbatim."""
    return ChatReply(
        choices=tuple(Choice(t, reasoning=reasoning, finish_reason=finish_reason) for t in texts),
        model=model,
    )


def request_schema(request: ChatRequest) -> dict[str, Any] | None:
    """The JSON schema the request asks for, wherever it put it."""
    fmt = request.response_format
    if fmt is not None and fmt.get("type") == "json_schema":
        schema: dict[str, Any] = fmt["json_schema"]["schema"]
        return schema
    if fmt is not None and "schema" in fmt:
        schema = fmt["schema"]
        return schema
    match = _SCHEMA_MARKERS.search(request.messages[-1].content)
    return json.loads(match.group(1)) if match else None


def instance(schema: dict[str, Any], tag: str, root: dict[str, Any] | None = None) -> Any:
    """A value valid for ``schema`` (the subset pydantic emits); strings contain ``tag``."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return instance(root["$defs"][name], tag, root)
    kind = schema.get("type")
    if kind == "object":
        return {k: instance(v, f"{tag}.{k}", root) for k, v in schema["properties"].items()}
    if kind == "array":
        count = schema.get("maxItems", schema.get("minItems", 2))
        return [instance(schema["items"], f"{tag}[{i}]", root) for i in range(count)]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return 1
    return f"text {tag}"


class FakeTeacher:
    """A ``Teacher`` that answers from a script and records every request it got."""

    def __init__(self, script: Script | None = None, model: str = "fake-teacher") -> None:
        self.script = script
        self.model = model
        self.requests: list[ChatRequest] = []
        self.forgotten: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> ChatReply:
        self.requests.append(request)
        result: Any = self.script(request) if self.script is not None else None
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            result = self.auto_reply(request)
        assert isinstance(result, ChatReply)
        return result

    def forget(self, request: ChatRequest) -> None:
        self.forgotten.append(request)

    def auto_reply(self, request: ChatRequest) -> ChatReply:
        """One schema instance per asked choice, unique to this request."""
        schema = request_schema(request)
        if schema is None:
            return text_reply(*(f"plain text r{len(self.requests)}" for _ in range(request.n)))
        seq = len(self.requests)
        return reply(*(instance(schema, f"r{seq}c{i}") for i in range(request.n)))

    def sent(self, stage: str) -> list[ChatRequest]:
        """The requests whose stage ends with ``stage`` (e.g. "summary" or "x/summary")."""
        return [r for r in self.requests if r.stage.endswith(stage)]

    def __repr__(self) -> str:
        return f"<FakeTeacher {self.model} requests={len(self.requests)}>"


def make_seed(document: str = "Photosynthesis turns light into sugar.", **fields: str) -> SeedRow:
    """A valid seed row; any field can be overridden."""
    values = {
        "document_outline": "Photosynthesis",
        "domain": "biology",
        "icl_document": "Mitochondria make ATP.",
        "icl_query_1": "What do mitochondria make?",
        "icl_query_2": "Why do cells need ATP?",
        "icl_query_3": "Where is ATP made?",
        **fields,
    }
    return SeedRow(doc_id=doc_id_for(document), line_no=1, document=document, **values)


def last_user_text(request: ChatRequest) -> str:
    return request.messages[-1].content


Exchange = Callable[[str, bytes | None], Awaitable[Response]]


class FakeTransport:
    """A ``Transport`` whose every exchange is ``exchange(url, body)``: it returns the
    ``Response`` or raises what a real transport raises (``TeacherConnectionError``,
    ``TeacherTimeout``...). Records each request as (method, url, body) and counts closes."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.sent: list[tuple[str, str, bytes | None]] = []
        self.closed = 0

    async def send(self, method: str, url: str, body: bytes | None) -> Response:
        self.sent.append((method, url, body))
        return await self.exchange(url, body)

    async def close(self) -> None:
        self.closed += 1

    def __repr__(self) -> str:
        return f"<FakeTransport sent={len(self.sent)} closed={self.closed}>"


def make_teacher(
    exchange: Exchange,
    base_url: str | list[str] = "http://teacher.test/v1",
    concurrency: int = 32,
    limiter: RequestLimiter | None = None,
    **retry: float,
) -> tuple[HTTPTeacher, RequestStats]:
    """A real client over a ``FakeTransport`` of ``exchange`` (enter it before use), with a
    limiter that never paces (``concurrency`` in flight) unless ``limiter`` is given."""
    stats = RequestStats()
    config = RetryConfig.model_validate(
        {
            "max_attempts": 4,
            "backoff_base_s": 0.5,
            "backoff_max_s": 8,
            "outage_threshold": 5,
            "outage_probe_base_s": 1,
            "outage_probe_max_s": 30,
            "outage_max_s": 3600,
            **retry,
        }
    )
    if limiter is None:
        limiter = RequestLimiter(requests_per_minute=1_000_000, max_concurrency=concurrency)
    teacher = HTTPTeacher(
        TeacherConfig(base_url=base_url, model="m"),
        config,
        limiter,
        stats=stats,
        transport=FakeTransport(exchange),
    )
    return teacher, stats


def make_config(
    *, teacher: dict[str, Any] | None = None, retry: dict[str, Any] | None = None, **gen: Any
) -> Config:
    return Config.model_validate(
        {
            "teacher": {"base_url": "http://x/v1", "model": "m", **(teacher or {})},
            "retry": retry or {},
            "generation": gen,
        }
    )


def seed(text: str, line_no: int = 1) -> SeedRow:
    return SeedRow(
        doc_id=doc_id_for(text),
        line_no=line_no,
        document=text,
        document_outline="Outline",
        domain="d",
        icl_document="icl",
        icl_query_1="q1",
        icl_query_2="q2",
        icl_query_3="q3",
    )


def completion_body(*contents: Any, **extra: Any) -> dict[str, Any]:
    """A chat-completion body as a server sends it, one choice per content (``"ok"`` when
    none is given), with usage; ``extra`` keys replace or add top-level fields."""
    body: dict[str, Any] = {
        "id": "cmpl-1",
        "model": "m",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
            for i, c in enumerate(contents or ("ok",))
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }
    body.update(extra)
    return body
