"""``engine.teacher.transport``: the aiohttp transport's session, and aiohttp's failures as
engine errors. (Proxies, TLS and DNS against real local servers: ``test_network.py``; the
client over a fake transport: ``test_health.py``, ``test_endpoints.py``.)"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses

from engine.config import RetryConfig, TeacherConfig
from engine.errors import ConfigError, EngineError, TeacherConnectionError, TeacherTimeout
from engine.teacher.client import HTTPTeacher
from engine.teacher.limits import RequestLimiter
from engine.teacher.network import Proxies
from engine.teacher.protocol import ChatRequest, Message
from engine.teacher.stats import RequestStats
from engine.teacher.transport import SPARE_CONNECTIONS, AiohttpTransport, Response
from tests.support.fakes import FakeTransport
from tests.support.servers import serving

KEY = "sk-secret-123"
BASE = "http://teacher.test/v1"
ENDPOINT = BASE + "/chat/completions"
REQUEST = ChatRequest(messages=(Message("user", "Summarise this."),), stage="summary")
OK = b'{"model": "m", "choices": [{"message": {"content": "ok"}}]}'


@pytest.fixture
def teacher_config() -> TeacherConfig:
    return TeacherConfig(base_url=BASE, model="m", api_key=KEY)


def transport_for(config: TeacherConfig, max_concurrency: int = 4) -> AiohttpTransport:
    return AiohttpTransport(config, Proxies(config.urls), max_concurrency=max_concurrency)


async def test_session_is_sized_to_the_limiter_and_closed_on_exit(
    mocked: aioresponses, teacher_config: TeacherConfig
) -> None:
    mocked.post(ENDPOINT, body=OK)
    limiter = RequestLimiter(requests_per_minute=600, max_concurrency=300)
    teacher = HTTPTeacher(teacher_config, RetryConfig(), limiter, stats=RequestStats())
    transport = teacher.transport
    assert isinstance(transport, AiohttpTransport)
    async with teacher:
        await teacher.complete(REQUEST)  # the session opens with the first request
        session = transport.session
        assert session is not None
        # aiohttp's default of 100 connections would cap us below max_concurrency.
        assert session.connector is not None
        assert session.connector.limit == 308 == 300 + SPARE_CONNECTIONS
        assert session.connector.limit_per_host == 0
        assert session.timeout.total == teacher_config.timeout_s
        assert session.timeout.sock_connect == teacher_config.connect_timeout_s
    assert session.closed
    assert transport.session is None


async def test_any_status_comes_back_as_it_is(
    mocked: aioresponses, teacher_config: TeacherConfig
) -> None:
    mocked.post(ENDPOINT, status=503, body=b"busy", headers={"Retry-After": "2"})
    transport = transport_for(teacher_config)
    try:
        got = await transport.send("POST", ENDPOINT, b"{}")
    finally:
        await transport.close()
    assert (got.status, got.body) == (503, b"busy")
    assert got.headers["retry-after"] == "2"  # case-insensitive, as aiohttp's


@pytest.mark.parametrize(
    ("exc", "kind", "says"),
    [
        (TimeoutError(), TeacherTimeout, f"no reply from {ENDPOINT} in time"),
        (aiohttp.ServerTimeoutError("read timed out"), TeacherTimeout, "no reply from"),
        (
            aiohttp.ClientConnectionError("reset"),
            TeacherConnectionError,
            f"connection to {ENDPOINT} failed: ClientConnectionError: reset",
        ),
        (aiohttp.ServerDisconnectedError(), TeacherConnectionError, "ServerDisconnectedError"),
        (
            aiohttp.ClientOSError(104, "Connection reset by peer"),
            TeacherConnectionError,
            "Connection reset by peer",
        ),
        (aiohttp.ClientPayloadError("truncated body"), TeacherConnectionError, "truncated body"),
        (aiohttp.InvalidURL("http://x:y/"), ConfigError, "teacher.base_url is not a usable URL"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
async def test_aiohttp_failures_become_engine_errors(
    mocked: aioresponses,
    teacher_config: TeacherConfig,
    exc: Exception,
    kind: type[EngineError],
    says: str,
) -> None:
    mocked.post(ENDPOINT, exception=exc)
    transport = transport_for(teacher_config)
    try:
        with pytest.raises(kind) as info:
            await transport.send("POST", ENDPOINT, b"{}")
    finally:
        await transport.close()
    assert says in str(info.value)
    assert info.value.__cause__ is exc
    assert KEY not in f"{info.value} {info.value!r} {transport!r}"


async def test_a_redirect_is_returned_not_followed() -> None:
    """A real server: aiohttp would follow a 302 by re-sending the POST as a GET."""
    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async with serving(moved) as base:
        transport = transport_for(TeacherConfig(base_url=base, model="m"))
        try:
            got = await transport.send("POST", f"{base}/chat/completions", b"{}")
        finally:
            await transport.close()
    assert (got.status, got.headers["Location"]) == (302, "/elsewhere")
    assert seen == ["POST /v1/chat/completions"]


# --- the client over an injected transport --------------------------------------------------


async def test_the_client_sends_through_its_transport_and_closes_it() -> None:
    async def answer(url: str, body: bytes | None) -> Response:
        await asyncio.sleep(0)
        return Response(200, {}, OK)

    fake = FakeTransport(answer)
    config = TeacherConfig(base_url=BASE, model="m")
    teacher = HTTPTeacher(config, RetryConfig(), RequestLimiter(600, 4), transport=fake)
    async with teacher:
        got = await teacher.complete(REQUEST)
        probed = await teacher.probe(BASE + "/models")
    assert got.choices[0].content == "ok" and probed.status == 200
    assert [(method, url) for method, url, _ in fake.sent] == [
        ("POST", ENDPOINT),
        ("GET", BASE + "/models"),
    ]
    body: Any = fake.sent[0][2]
    assert b'"model":"m"' in body
    assert fake.closed == 1
    assert (teacher.stats.requests_sent, teacher.stats.preflight_requests) == (1, 1)
    with pytest.raises(RuntimeError, match="async with"):
        await teacher.complete(REQUEST)  # closed
