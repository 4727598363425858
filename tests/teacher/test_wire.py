"""``engine.teacher.wire``: answers read from their bytes, as tables of bodies and statuses."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from engine.errors import (
    AuthError,
    EngineError,
    MalformedResponse,
    ProxyRefused,
    Redirected,
    RequestRejected,
    TeacherHTTPError,
)
from engine.teacher.network import Proxy
from engine.teacher.wire import (
    EXCERPT_CHARS,
    ProbeReply,
    error_for_status,
    excerpt,
    parse_chat_completion,
    redirected,
)
from tests.support.fakes import completion_body

KEY = "sk-secret-123"
BASE = "http://teacher.test/v1"
ENDPOINT = BASE + "/chat/completions"


def parse(body: dict[str, Any]) -> Any:
    return parse_chat_completion(orjson.dumps(body))


# --- chat completions -------------------------------------------------------------------------


def test_parses_a_reply_with_several_choices() -> None:
    body = completion_body("one", None, "three")
    body["choices"][0]["message"]["reasoning_content"] = "thought (older vLLM)"
    body["choices"][1]["message"]["reasoning"] = "thought (newer vLLM)"
    body["choices"][2]["finish_reason"] = "length"

    got = parse(body)

    assert [c.content for c in got.choices] == ["one", "", "three"]
    assert [c.reasoning for c in got.choices] == [
        "thought (older vLLM)",
        "thought (newer vLLM)",
        None,
    ]
    assert [c.finish_reason for c in got.choices] == ["stop", "stop", "length"]
    assert got.model == "m"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (11, 7)


def test_reasoning_says_where_the_server_put_it() -> None:
    body = completion_body("one", "two", "three")
    body["choices"][0]["message"]["reasoning_content"] = "older"
    body["choices"][1]["message"]["reasoning"] = "newer"
    body["choices"][2]["message"]["reasoning_content"] = None  # vLLM sends null when none

    got = parse(body)

    assert [(c.reasoning, c.reasoning_field) for c in got.choices][:2] == [
        ("older", "reasoning_content"),
        ("newer", "reasoning"),
    ]
    assert got.choices[2].reasoning is None


def test_content_blocks_with_thinking_are_read() -> None:
    # Mistral's API for its reasoning models: content is a list of typed blocks.
    blocks = [
        {
            "type": "thinking",
            "thinking": [{"type": "text", "text": "Let me "}, {"type": "text", "text": "see."}],
        },
        {"type": "text", "text": '{"answer": '},
        {"type": "reference", "reference_ids": [1]},
        {"type": "text", "text": '"42"}'},
    ]

    (choice,) = parse(completion_body(blocks)).choices

    assert (choice.content, choice.reasoning) == ('{"answer": "42"}', "Let me see.")
    assert choice.reasoning_field == "thinking blocks of content"


def test_thinking_blocks_join_a_reasoning_field() -> None:
    body = completion_body(
        [{"type": "thinking", "thinking": "second"}, {"type": "text", "text": "x"}]
    )
    body["choices"][0]["message"]["reasoning_content"] = "first"

    (choice,) = parse(body).choices

    assert (choice.content, choice.reasoning) == ("x", "first\n\nsecond")
    assert choice.reasoning_field == "reasoning_content and thinking blocks"


def test_missing_usage_counts_as_zero() -> None:
    body = completion_body("x")
    del body["usage"]

    got = parse(body)

    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (0, 0)


@pytest.mark.parametrize("count", [-1, True, "12", 1.5, None])
def test_a_token_count_that_is_not_a_count_is_zero(count: object) -> None:
    got = parse(completion_body("x", usage={"prompt_tokens": count, "completion_tokens": 3}))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (0, 3)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>502 Bad Gateway</html>", "the body is not JSON"),
        (b'{"error": "no choices here"}', "the body has no choices"),
        (b'{"choices": []}', "the body has no choices"),
        (b"[1, 2]", "the body has no choices"),
        (b'{"choices": [{"index": 0}]}', "a choice has no message"),
        (b'{"choices": ["text"]}', "a choice has no message"),
        (b'{"choices": [{"message": {"content": 42}}]}', "a message's content is not text"),
        (b'{"choices": [{"message": {"content": ["x"]}}]}', "a message's content is not text"),
        (
            b'{"choices": [{"message": {"content": {"text": "x"}}}]}',
            "a message's content is not text",
        ),
    ],
)
def test_a_body_that_is_not_a_chat_completion_is_malformed(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedResponse) as info:
        parse_chat_completion(body)
    assert str(info.value).startswith(f"HTTP 200 but {problem}")
    assert info.value.status == 200
    assert info.value.body == excerpt(body)


def test_a_key_echoed_in_a_body_that_is_not_a_completion_is_taken_out() -> None:
    """A gateway's login page quoting the request's credentials, answered with 200."""
    key = "sk-echoed-0123456789abcdef"
    body = f"<html>Sign in. Your request had: Authorization: Bearer {key}</html>".encode()
    with pytest.raises(MalformedResponse) as info:
        parse_chat_completion(body, secret=key)
    assert key not in f"{info.value} {info.value.body}"
    assert "Bearer [redacted]" in str(info.value) and "Bearer [redacted]" in info.value.body
    assert str(info.value).startswith("HTTP 200 but the body is not JSON")


# --- statuses ---------------------------------------------------------------------------------

PROXY = Proxy("http://proxy.corp:3128", "HTTP_PROXY")


def error(status: int, body: bytes = b"", **kwargs: Any) -> EngineError:
    headers = kwargs.pop("headers", {})
    return error_for_status(status, headers, body, base_url=BASE, url=ENDPOINT, **kwargs)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, AuthError),
        (403, AuthError),
        (301, Redirected),
        (308, Redirected),
        (400, RequestRejected),
        (404, RequestRejected),
        (407, RequestRejected),  # no proxy: the server itself said it
        (413, RequestRejected),
        (418, RequestRejected),
        (422, RequestRejected),
        (408, TeacherHTTPError),
        (409, TeacherHTTPError),
        (429, TeacherHTTPError),
        (500, TeacherHTTPError),
        (503, TeacherHTTPError),
    ],
)
def test_each_status_is_the_error_that_says_what_to_do(status: int, kind: type) -> None:
    err = error(status, b"said")
    assert type(err) is kind
    assert getattr(err, "status", None) == status


def test_a_407_through_a_proxy_is_the_proxy_refusing() -> None:
    err = error(407, proxy=PROXY)
    assert isinstance(err, ProxyRefused)
    assert err.proxy == "http://proxy.corp:3128"


def test_a_retryable_status_carries_the_retry_after_and_the_body() -> None:
    err = error(429, b'{"error": "slow down"}', headers={"Retry-After": "7"})
    assert isinstance(err, TeacherHTTPError)
    assert (err.retry_after, err.body) == (7.0, '{"error": "slow down"}')
    assert str(err) == 'HTTP 429: {"error": "slow down"}'


def test_a_rejection_quotes_the_body_without_the_key() -> None:
    err = error(400, f"bad request from key {KEY}\n  (echoed)".encode(), secret=KEY)
    assert isinstance(err, RequestRejected)
    assert err.body == "bad request from key [redacted] (echoed)"
    assert KEY not in str(err)
    assert str(err).startswith("the teacher rejected the request: HTTP 400: ")


def test_a_success_is_no_error() -> None:
    with pytest.raises(ValueError, match="success"):
        error(200)


def test_an_excerpt_is_one_short_line() -> None:
    assert excerpt(b"x" * 5000) == "x" * EXCERPT_CHARS == "x" * 300
    assert excerpt(b"a\n\tb  c\xff") == "a b c\ufffd"
    assert excerpt(f"key={KEY}".encode(), KEY) == "key=[redacted]"


# --- redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "target", "suggestion"),
    [
        # http -> https, the same path: the base URL to use instead.
        (
            "https://teacher.test/v1/chat/completions",
            "https://teacher.test/v1/chat/completions",
            "https://teacher.test/v1",
        ),
        # Relative to the request, to another prefix.
        (
            "/api/v1/chat/completions",
            "http://teacher.test/api/v1/chat/completions",
            ("http://teacher.test/api/v1"),
        ),
        # Somewhere else entirely (a login page): the target, no base to suggest.
        ("https://sso.test/login?next=x", "https://sso.test/login?next=x", ""),
        ("", "", ""),
    ],
)
def test_a_redirect_names_its_target_and_the_base_url_to_use(
    location: str, target: str, suggestion: str
) -> None:
    headers = {"Location": location} if location else {}
    err = redirected(BASE, ENDPOINT, 301, headers)
    assert (err.location, err.suggestion) == (target, suggestion)
    assert f"the teacher at {ENDPOINT} answered HTTP 301" in str(err)
    assert "a POST would become a GET" in str(err)
    if suggestion:
        assert str(err).endswith(f"set TEACHER_MODEL_BASE_URL to the final URL, {suggestion}")


# --- the preflight's answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"error": {"message": "model not found", "type": "x"}}', "model not found"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b'{"error": "flat"}', '{"error": "flat"}'),
        (b"<html>\n<h1>Login</h1>", "<html> <h1>Login</h1>"),
    ],
)
def test_a_probe_reply_quotes_the_servers_words(body: bytes, said: str) -> None:
    assert ProbeReply(ENDPOINT, 404, {}, body).excerpt == said


def test_a_probe_without_an_answer_says_why() -> None:
    got = ProbeReply(ENDPOINT, None, {}, b"", "connection refused")
    assert (got.excerpt, got.json()) == ("connection refused", None)
