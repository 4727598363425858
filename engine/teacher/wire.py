"""What the teacher's answers mean, read from their bytes: pure functions, no I/O.

An answer is an HTTP status, its headers and its raw body (``engine.teacher.transport``
fetches them). A 2xx body is a chat completion (``parse_chat_completion``); any other
status becomes the engine error that says what the caller can do about it
(``error_for_status``). Bodies quoted in errors are cut short and have the API key taken
out (``excerpt``): a gateway may echo the Authorization header. The preflight's answers are
``ProbeReply`` values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urljoin

import orjson

from engine.config.secrets import redact
from engine.errors import (
    AuthError,
    EngineError,
    MalformedResponse,
    Redirected,
    RequestRejected,
    TeacherHTTPError,
)
from engine.teacher.network import Proxy, proxy_failure
from engine.teacher.protocol import ChatReply, Choice, Usage
from engine.teacher.retry import classify, retry_after

# Characters of a body quoted in an error message.
EXCERPT_CHARS = 300
# Where servers put the reasoning they set apart: vLLM has used both names across releases.
_REASONING_FIELDS = ("reasoning_content", "reasoning")


def parse_chat_completion(raw: bytes, secret: str | None = None) -> ChatReply:
    """A 200 body (an OpenAI ``chat.completion`` object, JSON) as a ``ChatReply``.

    Each choice's ``message.content`` may be a string, null ("") or a list of typed blocks
    (``text`` blocks are the content, ``thinking`` blocks reasoning); reasoning set apart in
    ``reasoning_content`` or ``reasoning`` is kept with the field it came from. A missing or
    odd ``usage`` counts as 0 tokens, a missing ``model`` as "". Raises
    ``MalformedResponse`` (status 200, the body's excerpt) when the body is not JSON, has no
    choices, or a choice has no message or content that is not text; ``secret`` (the API key,
    should a gateway echo it in a body that is not a completion) is taken out of its message.
    """
    try:
        return _parse_chat_completion(raw)
    except MalformedResponse as err:
        if secret is None or secret not in str(err):
            raise
        said = redact(err.body, secret)
        raise MalformedResponse(redact(str(err), secret), status=200, body=said) from None


def _parse_chat_completion(raw: bytes) -> ChatReply:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise _malformed("the body is not JSON", raw) from err
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise _malformed("the body has no choices", raw)
    parsed = tuple(_choice(item, raw) for item in choices)
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    model = data.get("model")
    return ChatReply(
        choices=parsed,
        model=model if isinstance(model, str) else "",
        usage=Usage(
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
        ),
    )


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    raw: bytes,
    *,
    base_url: str,
    url: str,
    proxy: Proxy | None = None,
    secret: str | None = None,
) -> EngineError:
    """The engine error for a non-2xx ``status`` answered to a request to ``url``, sent to
    the endpoint ``base_url`` (through ``proxy``, if any), with ``headers`` and body ``raw``.

    ``AuthError`` for 401/403; ``Redirected`` for 3xx (never followed); the proxy's refusal
    for a 407 through a proxy (``engine.teacher.network.proxy_failure``); ``RequestRejected``
    for the other 4xx; ``TeacherHTTPError`` (retryable, with the Retry-After in seconds) for
    408, 409, 429 and 5xx. Quoted bodies are cut to ``EXCERPT_CHARS`` with ``secret`` taken
    out. Raises ``ValueError`` for a 2xx status, which is no error.
    """
    decision = classify(status)
    if decision == "ok":
        raise ValueError(f"HTTP {status} is a success, not an error")
    if decision == "auth":
        return AuthError(base_url, status)
    if decision == "redirect":
        return redirected(base_url, url, status, headers)
    if status == HTTPStatus.PROXY_AUTHENTICATION_REQUIRED and proxy is not None:
        return proxy_failure(url, proxy, status, "Proxy Authentication Required")
    quoted = excerpt(raw, secret)
    if decision == "reject":
        return RequestRejected(
            f"the teacher rejected the request: HTTP {status}: {quoted}",
            status=status,
            body=quoted,
        )
    return TeacherHTTPError(
        f"HTTP {status}: {quoted}",
        status=status,
        retry_after=retry_after(headers),
        body=quoted,
    )


def redirected(base_url: str, url: str, status: int, headers: Mapping[str, str]) -> Redirected:
    """The error for a redirect of a request to ``url`` (under ``base_url``): where it points,
    and the base URL to use instead when the target is the same path elsewhere."""
    location = next((v for k, v in headers.items() if k.lower() == "location"), "")
    target = urljoin(url, location) if location else ""
    suffix = url[len(base_url) :] if url.startswith(base_url) else ""
    suggestion = ""
    if target and suffix and target.split("?")[0].rstrip("/").endswith(suffix):
        suggestion = target.split("?")[0].rstrip("/")[: -len(suffix)]
    return Redirected(url, status, target, suggestion)


def excerpt(raw: bytes, secret: str | None = None) -> str:
    """The start of a body (at most ``EXCERPT_CHARS`` characters), on one line, decoded as
    UTF-8 (bad bytes replaced); ``secret`` (the API key, if the server echoed it) is taken
    out first."""
    text = redact(raw.decode("utf-8", errors="replace"), secret)
    return " ".join(text.split())[:EXCERPT_CHARS]


@dataclass(frozen=True, slots=True)
class ProbeReply:
    """What one preflight request to ``url`` got: the status, headers and body of the
    answer, or (with ``status`` None) in ``error``, why there was none."""

    url: str
    status: int | None
    headers: Mapping[str, str]
    body: bytes
    error: str = ""

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None

    @property
    def excerpt(self) -> str:
        """The server's words: an OpenAI-style error's message when the body is one, else
        the start of the body (or, with no answer, why)."""
        if self.status is None:
            return self.error
        body = self.json()
        error = body.get("error", body) if isinstance(body, dict) else None
        message = error.get("message") or error.get("detail") if isinstance(error, dict) else None
        return excerpt(message.encode()) if isinstance(message, str) else excerpt(self.body)


def _choice(item: Any, raw: bytes) -> Choice:
    message = item.get("message") if isinstance(item, dict) else None
    if not isinstance(message, dict):
        raise _malformed("a choice has no message", raw)
    content, thinking = _content(message.get("content"), raw)
    field, reasoning = next(
        (
            (name, value)
            for name in _REASONING_FIELDS
            if isinstance(value := message.get(name), str) and value
        ),
        (None, ""),
    )
    if thinking:
        reasoning = "\n\n".join(part for part in (reasoning, thinking) if part)
        field = f"{field} and thinking blocks" if field else "thinking blocks of content"
    finish = item.get("finish_reason")
    return Choice(
        content=content,
        reasoning=reasoning or None,
        finish_reason=finish if isinstance(finish, str) else None,
        reasoning_field=field or "reasoning",
    )


def _content(value: Any, raw: bytes) -> tuple[str, str]:
    """A message's content as (text, thinking): a string, null, or a list of typed blocks,
    where ``thinking`` blocks hold reasoning (Mistral's API for its reasoning models)."""
    if value is None:
        return "", ""
    if isinstance(value, str):
        return value, ""
    if not isinstance(value, list) or not all(isinstance(block, dict) for block in value):
        raise _malformed("a message's content is not text", raw)
    text = "".join(_block_text(b) for b in value if b.get("type") == "text")
    thinking = "".join(_block_text(b, "thinking") for b in value if b.get("type") == "thinking")
    return text, thinking


def _block_text(block: dict[str, Any], key: str = "text") -> str:
    """The text of a content block, whose ``key`` is a string or a list of text blocks."""
    value = block.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_block_text(b) for b in value if isinstance(b, dict))
    return ""


def _count(value: Any) -> int:
    """A token count from ``usage``: a non-negative int, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _malformed(problem: str, raw: bytes) -> MalformedResponse:
    quoted = excerpt(raw)
    return MalformedResponse(f"HTTP 200 but {problem}: {quoted}", status=200, body=quoted)
