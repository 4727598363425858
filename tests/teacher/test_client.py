from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aioresponses import aioresponses
from yarl import URL

from engine.config import RetryConfig, TeacherConfig
from engine.errors import (
    AuthError,
    MalformedResponse,
    Redirected,
    RequestRejected,
    RetriesExhausted,
    TeacherConnectionError,
    TeacherHTTPError,
    TeacherTimeout,
)
from engine.teacher.client import HTTPTeacher
from engine.teacher.limits import RequestLimiter
from engine.teacher.protocol import ChatRequest, Message
from engine.teacher.retry import backoff
from engine.teacher.stats import RequestStats
from tests.support.fakes import completion_body
from tests.support.servers import serving

KEY = "sk-secret-123"
BASE = "http://teacher.test/v1"
ENDPOINT = BASE + "/chat/completions"
SEED = 20250301
REQUEST = ChatRequest(messages=(Message("user", "Summarise this."),), stage="summary")


class RecordingSleep:
    """Stands in for asyncio.sleep: records each delay (and whether a slot was held)."""

    def __init__(self, limiter: RequestLimiter) -> None:
        self.limiter = limiter
        self.delays: list[float] = []
        self.in_flight_while_sleeping: list[int] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.in_flight_while_sleeping.append(self.limiter.in_flight)


@pytest.fixture
def teacher_config() -> TeacherConfig:
    return TeacherConfig(base_url=BASE, model="m", api_key=KEY)


@pytest.fixture
def retry_config() -> RetryConfig:
    return RetryConfig(max_attempts=4)


async def _no_quiet(seconds: float) -> None:
    """The limiter's pause after a 429, skipped: these tests check the client, not the wait."""


@pytest.fixture
def stats() -> RequestStats:
    """The client's counters, empty."""
    return RequestStats()


@pytest.fixture
def limiter() -> RequestLimiter:
    return RequestLimiter(requests_per_minute=100000, max_concurrency=4, sleep=_no_quiet)


@pytest.fixture
def sleep(limiter: RequestLimiter) -> RecordingSleep:
    return RecordingSleep(limiter)


@pytest.fixture
async def client(
    mocked: aioresponses,
    teacher_config: TeacherConfig,
    retry_config: RetryConfig,
    limiter: RequestLimiter,
    stats: RequestStats,
    sleep: RecordingSleep,
) -> AsyncIterator[HTTPTeacher]:
    teacher = HTTPTeacher(
        teacher_config, retry_config, limiter, stats=stats, sleep=sleep, rng=random.Random(SEED)
    )
    async with teacher:
        yield teacher


def sent(mocked: aioresponses, url: str = ENDPOINT) -> list[Any]:
    return mocked.requests.get(("POST", URL(url)), [])


def assert_no_key(err: BaseException) -> None:
    """Neither the error nor anything it was raised from shows the key."""
    seen: BaseException | None = err
    while seen is not None:
        assert KEY not in str(seen)
        assert KEY not in repr(seen)
        seen = seen.__cause__ or seen.__context__


# --- success ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", [42, {"text": "x"}, ["x"]])
async def test_content_that_is_not_text_is_malformed(
    client: HTTPTeacher, mocked: aioresponses, sleep: RecordingSleep, content: object
) -> None:
    mocked.post(ENDPOINT, payload=completion_body(content), repeat=True)
    with pytest.raises(RetriesExhausted, match="content is not text"):
        await client.complete(REQUEST)


async def test_sends_the_payload_and_the_bearer_key(
    client: HTTPTeacher, mocked: aioresponses
) -> None:
    mocked.post(ENDPOINT, payload=completion_body("a", "b"))
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}
    request = ChatRequest(
        messages=(Message("system", "Be brief."), Message("user", "Hi")),
        temperature=0.2,
        max_tokens=321,
        n=2,
        response_format=schema,
    )

    await client.complete(request)

    (call,) = sent(mocked)
    assert orjson.loads(call.kwargs["data"]) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "temperature": 0.2,
        "max_tokens": 321,
        "n": 2,
        "response_format": schema,
    }
    headers = call.kwargs["headers"]
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Content-Type"] == "application/json"


async def test_no_authorization_header_without_a_key(
    mocked: aioresponses, limiter: RequestLimiter, stats: RequestStats, sleep: RecordingSleep
) -> None:
    mocked.post(ENDPOINT, payload=completion_body())
    config = TeacherConfig(base_url=BASE, model="m")

    async with HTTPTeacher(config, RetryConfig(), limiter, stats=stats, sleep=sleep) as teacher:
        await teacher.complete(REQUEST)

    (call,) = sent(mocked)
    assert "Authorization" not in call.kwargs["headers"]


async def test_trailing_slash_in_base_url(
    mocked: aioresponses, limiter: RequestLimiter, stats: RequestStats, sleep: RecordingSleep
) -> None:
    mocked.post(ENDPOINT, payload=completion_body())
    config = TeacherConfig(base_url=BASE + "/", model="m")

    async with HTTPTeacher(config, RetryConfig(), limiter, stats=stats, sleep=sleep) as teacher:
        await teacher.complete(REQUEST)

    assert len(sent(mocked)) == 1


async def test_complete_outside_the_context_manager_is_an_error(
    teacher_config: TeacherConfig, limiter: RequestLimiter, stats: RequestStats
) -> None:
    teacher = HTTPTeacher(teacher_config, RetryConfig(), limiter, stats=stats)
    with pytest.raises(RuntimeError, match="async with"):
        await teacher.complete(REQUEST)


# --- retries -----------------------------------------------------------------------------


async def test_429_waits_retry_after_then_succeeds(
    client: HTTPTeacher, mocked: aioresponses, sleep: RecordingSleep
) -> None:
    mocked.post(ENDPOINT, status=429, headers={"Retry-After": "3"}, body='{"error": "slow"}')
    mocked.post(ENDPOINT, payload=completion_body("done"))

    got = await client.complete(REQUEST)

    assert got.choices[0].content == "done"
    (delay,) = sleep.delays
    assert 3.0 <= delay <= 3.3
    assert len(sent(mocked)) == 2


async def test_429_cuts_the_concurrency_and_success_grows_it_back(
    client: HTTPTeacher, mocked: aioresponses, limiter: RequestLimiter
) -> None:
    mocked.post(ENDPOINT, status=429, body='{"error": "slow down"}')
    mocked.post(ENDPOINT, payload=completion_body("done"))
    mocked.post(ENDPOINT, payload=completion_body("again"))

    await client.complete(REQUEST)
    assert (limiter.concurrency, limiter.adaptive.decreases) == (2, 1)  # halved from 4
    await client.complete(REQUEST)  # two successes at a limit of 2: one step back up

    assert limiter.concurrency == 3


async def test_429_with_retry_after_asks_the_limiter_for_quiet(
    client: HTTPTeacher, mocked: aioresponses, limiter: RequestLimiter
) -> None:
    mocked.post(ENDPOINT, status=429, headers={"Retry-After": "7"})
    mocked.post(ENDPOINT, status=429, headers={"Retry-After": "7200"})  # capped: 120 s
    mocked.post(ENDPOINT, payload=completion_body())
    loop = asyncio.get_running_loop()
    before = loop.time()

    await client.complete(REQUEST)

    assert before + 120 <= limiter.resume_at <= loop.time() + 120


async def test_other_errors_leave_the_concurrency_alone(
    client: HTTPTeacher, mocked: aioresponses, limiter: RequestLimiter
) -> None:
    for status in (500, 503, 408):
        mocked.post(ENDPOINT, status=status)
    mocked.post(ENDPOINT, payload=completion_body())

    await client.complete(REQUEST)

    assert (limiter.concurrency, limiter.adaptive.decreases) == (4, 0)


async def test_token_cap_settles_the_reservation_from_usage(
    mocked: aioresponses,
    teacher_config: TeacherConfig,
    retry_config: RetryConfig,
    stats: RequestStats,
) -> None:
    limiter = RequestLimiter(100_000, 4, tokens_per_minute=600_000)  # bucket: 5,000 tokens
    mocked.post(ENDPOINT, payload=completion_body("ok"))  # usage: 18 tokens
    request = ChatRequest(messages=(Message("user", "x" * 400),), max_tokens=1_000)
    async with HTTPTeacher(teacher_config, retry_config, limiter, stats=stats) as teacher:
        await teacher.complete(request)
    assert limiter.tokens is not None
    # Reserved 104 prompt + 1,000 completion tokens; 18 used: the rest is credit.
    assert request.token_budget() == 1_104
    assert limiter.tokens.balance == 1_104 - 18


async def test_429_with_retry_after_ms(
    client: HTTPTeacher, mocked: aioresponses, sleep: RecordingSleep
) -> None:
    mocked.post(ENDPOINT, status=429, headers={"retry-after-ms": "1500", "retry-after": "9"})
    mocked.post(ENDPOINT, payload=completion_body())

    await client.complete(REQUEST)

    (delay,) = sleep.delays
    assert 1.5 <= delay <= 1.65


async def test_retry_after_is_capped(
    mocked: aioresponses,
    teacher_config: TeacherConfig,
    limiter: RequestLimiter,
    stats: RequestStats,
    sleep: RecordingSleep,
) -> None:
    mocked.post(ENDPOINT, status=503, headers={"retry-after": "3600"})
    mocked.post(ENDPOINT, payload=completion_body())
    retry = RetryConfig(max_attempts=2, retry_after_max_s=5)

    async with HTTPTeacher(teacher_config, retry, limiter, stats=stats, sleep=sleep) as teacher:
        await teacher.complete(REQUEST)

    (delay,) = sleep.delays
    assert 5.0 <= delay <= 5.5


async def test_503_backs_off_with_seeded_full_jitter(
    client: HTTPTeacher,
    mocked: aioresponses,
    sleep: RecordingSleep,
    retry_config: RetryConfig,
) -> None:
    for _ in range(3):
        mocked.post(ENDPOINT, status=503, body="overloaded")
    mocked.post(ENDPOINT, payload=completion_body("finally"))

    got = await client.complete(REQUEST)

    assert got.choices[0].content == "finally"
    base = retry_config.backoff_base_s
    assert len(sleep.delays) == 3
    for attempt, delay in enumerate(sleep.delays, start=1):
        assert 0.0 <= delay <= base * 2 ** (attempt - 1)
    rng = random.Random(SEED)
    expected = [
        backoff(a, None, base=base, cap=30.0, retry_after_cap=120.0, rng=rng) for a in (1, 2, 3)
    ]
    assert sleep.delays == pytest.approx(expected)
    # Backing off happens outside the limiter's slot.
    assert sleep.in_flight_while_sleeping == [0, 0, 0]


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientConnectionError("reset"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ClientPayloadError("truncated body"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_connection_error_then_success(
    client: HTTPTeacher,
    mocked: aioresponses,
    sleep: RecordingSleep,
    stats: RequestStats,
    exc: Exception,
) -> None:
    mocked.post(ENDPOINT, exception=exc)
    mocked.post(ENDPOINT, payload=completion_body("back"))

    got = await client.complete(REQUEST)

    assert got.choices[0].content == "back"
    assert len(sleep.delays) == 1
    assert stats.retries == {"connection": 1}


@pytest.mark.parametrize(
    "exc", [TimeoutError(), aiohttp.ServerTimeoutError("read timed out")], ids=repr
)
async def test_timeout_then_success(
    client: HTTPTeacher, mocked: aioresponses, stats: RequestStats, exc: Exception
) -> None:
    mocked.post(ENDPOINT, exception=exc)
    mocked.post(ENDPOINT, payload=completion_body("late"))

    got = await client.complete(REQUEST)

    assert got.choices[0].content == "late"
    assert stats.retries == {"timeout": 1}


@pytest.mark.parametrize(
    "body",
    [
        "<html>502 Bad Gateway</html>",
        '{"error": "no choices here"}',
        '{"choices": []}',
        '{"choices": [{"index": 0}]}',
        "[1, 2]",
    ],
)
async def test_malformed_200_is_retried(
    client: HTTPTeacher, mocked: aioresponses, stats: RequestStats, body: str
) -> None:
    mocked.post(ENDPOINT, status=200, body=body)
    mocked.post(ENDPOINT, payload=completion_body("fine"))

    got = await client.complete(REQUEST)

    assert got.choices[0].content == "fine"
    assert stats.retries == {"malformed_response": 1}
    assert stats.requests_sent == 2


async def test_retries_exhausted(
    client: HTTPTeacher, mocked: aioresponses, sleep: RecordingSleep, stats: RequestStats
) -> None:
    mocked.post(ENDPOINT, status=503, body="still overloaded", repeat=True)

    with pytest.raises(RetriesExhausted) as info:
        await client.complete(REQUEST)

    err = info.value
    assert err.attempts == 4
    assert err.status == 503
    assert err.body == "still overloaded"
    assert "503" in str(err)
    assert isinstance(err.__cause__, TeacherHTTPError)
    assert len(sleep.delays) == 3
    assert stats.requests_sent == 4
    assert stats.retries == {"503": 3}
    assert_no_key(err)


async def test_retries_exhausted_on_malformed_replies_keeps_the_body(
    client: HTTPTeacher, mocked: aioresponses
) -> None:
    mocked.post(ENDPOINT, status=200, body="not json", repeat=True)

    with pytest.raises(RetriesExhausted) as info:
        await client.complete(REQUEST)

    assert info.value.status == 200
    assert info.value.body == "not json"
    assert isinstance(info.value.__cause__, MalformedResponse)


async def test_retries_exhausted_on_timeouts_has_no_status(
    client: HTTPTeacher, mocked: aioresponses
) -> None:
    mocked.post(ENDPOINT, exception=TimeoutError(), repeat=True)

    with pytest.raises(RetriesExhausted) as info:
        await client.complete(REQUEST)

    assert info.value.status is None
    assert info.value.attempts == 4
    assert isinstance(info.value.__cause__, TeacherTimeout)


async def test_single_attempt_means_no_retry(
    mocked: aioresponses,
    teacher_config: TeacherConfig,
    limiter: RequestLimiter,
    stats: RequestStats,
    sleep: RecordingSleep,
) -> None:
    mocked.post(ENDPOINT, exception=aiohttp.ServerDisconnectedError(), repeat=True)
    retry = RetryConfig(max_attempts=1)

    async with HTTPTeacher(teacher_config, retry, limiter, stats=stats, sleep=sleep) as teacher:
        with pytest.raises(RetriesExhausted) as info:
            await teacher.complete(REQUEST)

    assert info.value.attempts == 1
    assert isinstance(info.value.__cause__, TeacherConnectionError)
    assert sleep.delays == []


async def test_stats_count_every_attempt_retry_and_token(
    client: HTTPTeacher, mocked: aioresponses, stats: RequestStats
) -> None:
    mocked.post(ENDPOINT, status=429, headers={"retry-after": "1"})
    mocked.post(ENDPOINT, status=503)
    mocked.post(ENDPOINT, exception=TimeoutError())
    mocked.post(ENDPOINT, payload=completion_body("x"))
    mocked.post(ENDPOINT, payload=completion_body("y"))

    await client.complete(REQUEST)
    await client.complete(REQUEST)

    assert stats.requests_sent == 5
    assert stats.retries == {"429": 1, "503": 1, "timeout": 1}
    assert (stats.prompt_tokens, stats.completion_tokens) == (22, 14)


async def test_each_retry_logs_a_warning_without_the_key(
    client: HTTPTeacher, mocked: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    mocked.post(ENDPOINT, status=502, body="bad gateway")
    mocked.post(ENDPOINT, payload=completion_body())

    with caplog.at_level(logging.WARNING, logger="engine.teacher.client"):
        await client.complete(REQUEST)

    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "attempt 1/4" in record.getMessage()
    assert "502" in record.getMessage()
    assert KEY not in caplog.text


# --- no retry ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 413, 422, 418])
async def test_rejected_request_is_not_retried(
    client: HTTPTeacher,
    mocked: aioresponses,
    sleep: RecordingSleep,
    stats: RequestStats,
    status: int,
) -> None:
    error = '{"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}'
    mocked.post(ENDPOINT, status=status, body=error)

    with pytest.raises(RequestRejected) as info:
        await client.complete(REQUEST)

    assert info.value.status == status
    assert "max_tokens is too large" in info.value.body
    assert "max_tokens is too large" in str(info.value)
    assert stats.requests_sent == 1
    assert sleep.delays == []
    assert_no_key(info.value)


async def test_rejection_body_is_cut_short(client: HTTPTeacher, mocked: aioresponses) -> None:
    mocked.post(ENDPOINT, status=400, body="x" * 5000)

    with pytest.raises(RequestRejected) as info:
        await client.complete(REQUEST)

    assert info.value.body == "x" * 300


async def test_rejection_after_a_retry_reports_its_attempt(
    client: HTTPTeacher, mocked: aioresponses
) -> None:
    mocked.post(ENDPOINT, status=503)
    mocked.post(ENDPOINT, status=400, body="bad")

    with pytest.raises(RequestRejected) as info:
        await client.complete(REQUEST)

    assert info.value.attempts == 2


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failure_stops_at_once_without_the_key(
    client: HTTPTeacher,
    mocked: aioresponses,
    sleep: RecordingSleep,
    stats: RequestStats,
    status: int,
) -> None:
    mocked.post(ENDPOINT, status=status, body=f'{{"error": "bad key {KEY[:5]}..."}}')

    with pytest.raises(AuthError) as info:
        await client.complete(REQUEST)

    err = info.value
    assert err.status == status
    assert err.endpoint == BASE
    assert BASE in str(err)
    assert str(status) in str(err)
    assert_no_key(err)
    assert stats.requests_sent == 1
    assert sleep.delays == []


# --- secrets -----------------------------------------------------------------------------


def test_repr_shows_endpoint_and_model_but_not_the_key(
    teacher_config: TeacherConfig, limiter: RequestLimiter, stats: RequestStats
) -> None:
    teacher = HTTPTeacher(teacher_config, RetryConfig(), limiter, stats=stats)
    assert repr(teacher) == "<HTTPTeacher http://teacher.test/v1 model=m>"
    assert KEY not in repr(teacher)
    assert teacher.model == "m"


@pytest.mark.parametrize(
    "mock",
    [
        {"status": 500, "body": "boom"},
        {"status": 429},
        {"exception": TimeoutError()},
        {"exception": aiohttp.ClientConnectionError("reset")},
        {"status": 200, "body": "not json"},
    ],
    ids=lambda m: str(m.get("status") or type(m["exception"]).__name__),
)
async def test_key_never_appears_in_exhausted_errors(
    client: HTTPTeacher, mocked: aioresponses, mock: dict[str, Any]
) -> None:
    mocked.post(ENDPOINT, repeat=True, **mock)

    with pytest.raises(RetriesExhausted) as info:
        await client.complete(REQUEST)

    assert_no_key(info.value)


# --- redirects are never followed -----------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirected_post_stops_the_run_and_is_never_resent(
    status: int, teacher_config: TeacherConfig, retry_config: RetryConfig
) -> None:
    """A real server: aiohttp would follow a 301/302 by re-sending the POST as a GET."""
    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(
            status=status, headers={"Location": "https://new.test/v1/chat/completions"}
        )

    stats = RequestStats()
    async with serving(moved) as base:
        config = teacher_config.model_copy(update={"base_url": base})
        async with HTTPTeacher(
            config, retry_config, RequestLimiter(600, 4), stats=stats
        ) as teacher:
            with pytest.raises(Redirected) as raised:
                await teacher.complete(REQUEST)
            probed = await teacher.probe(base + "/models")
    assert seen == ["POST /v1/chat/completions", "GET /v1/models"]
    assert raised.value.status == status
    assert "set TEACHER_MODEL_BASE_URL to the final URL, https://new.test/v1" in str(raised.value)
    assert KEY not in str(raised.value)
    assert probed.status == status and probed.headers["Location"].startswith("https://new.test")
    assert stats.requests_sent == 1 and stats.preflight_requests == 1
    assert stats.retries.total() == 0
