"""``HTTPTeacher``: the teacher behind an OpenAI-compatible ``/chat/completions`` endpoint.

The only module that imports aiohttp. Every aiohttp failure is translated here into
``engine.errors`` and retried per ``engine.teacher.retry``; callers see ``ChatReply`` or an
engine error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson

from engine.config import RetryConfig, TeacherConfig
from engine.config.secrets import redact
from engine.errors import (
    AuthError,
    ConfigError,
    EngineError,
    ItemError,
    MalformedResponse,
    Redirected,
    RequestRejected,
    RetriesExhausted,
    RetryableError,
    TeacherConnectionError,
    TeacherHTTPError,
    TeacherTimeout,
)
from engine.teacher.cache import ResponseCache, canonical_body, request_key
from engine.teacher.endpoints import Endpoint, EndpointPool, Passage
from engine.teacher.health import AttemptOutcome, answered_outcome, unreachable
from engine.teacher.limits import Lease, RequestLimiter
from engine.teacher.network import (
    Proxy,
    cert_env_problems,
    dns_failure,
    proxies_for,
    proxy_failure,
    proxy_for,
    tls_context,
    tls_failure,
)
from engine.teacher.protocol import ChatReply, ChatRequest, Choice, Usage, Wire
from engine.teacher.retry import backoff, classify, retry_after, retry_reason
from engine.teacher.stats import RequestStats

log = logging.getLogger(__name__)

# Connections beyond the concurrency cap, so a connection being closed never blocks a new one.
_SPARE_CONNECTIONS = 8
_EXCERPT_CHARS = 300


class HTTPTeacher:
    """Sends chat requests through ``limiter``, retrying transient failures with back-off.

    Use as ``async with HTTPTeacher(...) as teacher:``; one session is shared by all requests.
    With a ``cache``, a request answered before is answered from it: nothing is sent, and no
    rate budget or concurrency slot is used.
    """

    def __init__(
        self,
        teacher: TeacherConfig,
        retry: RetryConfig,
        limiter: RequestLimiter,
        *,
        stats: RequestStats | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.model = teacher.model
        self.base_url = ", ".join(teacher.urls)
        self._config = teacher
        self._retry = retry
        self._limiter = limiter
        # Its own counters, unless the run gives it the ones it reports.
        self.stats = stats if stats is not None else RequestStats()
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._cache = cache
        # How requests are written for this server (set from the preflight's findings).
        self.wire = Wire()
        self._session: aiohttp.ClientSession | None = None
        key = teacher.api_key
        self._secret = key.get_secret_value() if key is not None else None
        # Decided once per origin, from the environment (engine.teacher.network); ConfigError if an
        # endpoint's proxy is unusable.
        self._proxies: dict[str, Proxy | None] = dict.fromkeys(map(_origin, teacher.urls))
        self._proxies.update((_origin(url), p) for url, p in proxies_for(teacher.urls).items())
        self.endpoints = EndpointPool(
            teacher.urls,
            threshold=retry.outage_threshold,
            probe_base_s=retry.outage_probe_base_s,
            probe_max_s=retry.outage_probe_max_s,
            give_up_s=retry.outage_max_s,
        )

    async def __aenter__(self) -> Self:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._secret is not None:
            headers["Authorization"] = f"Bearer {self._secret}"
        # aiohttp's default connector limit (100) would silently cap concurrency below ours.
        connector = aiohttp.TCPConnector(
            limit=self._limiter.max_concurrency + _SPARE_CONNECTIONS,
            limit_per_host=0,
            ssl=self._tls_context(),
        )
        timeout = aiohttp.ClientTimeout(
            total=self._config.timeout_s, sock_connect=self._config.connect_timeout_s
        )
        # trust_env stays off: proxies are chosen per request (engine.teacher.network), and
        # aiohttp's trust_env would also read ~/.netrc and clash with our Authorization header.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, trust_env=False
        )
        return self

    def _tls_context(self) -> ssl.SSLContext:
        """The certificates to trust; SSL_CERT_FILE/DIR naming nothing is an error when TLS is
        used (OpenSSL would ignore them and every handshake would fail verification)."""
        tls_used = any(url.startswith("https:") for url in self._config.urls) or any(
            proxy.url.startswith("https:") for proxy in self._proxies.values() if proxy
        )
        if tls_used and (problems := cert_env_problems()):
            raise ConfigError(problems)
        return tls_context(self._config.ca_bundle)

    def _proxy(self, url: str) -> Proxy | None:
        """The proxy for a request to ``url``: decided per origin, like NO_PROXY."""
        origin = _origin(url)
        if origin not in self._proxies:
            self._proxies[origin] = proxy_for(url)
        return self._proxies[origin]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def complete(self, request: ChatRequest) -> ChatReply:
        """Send ``request``; retry timeouts, resets, 408/409/429/5xx and malformed replies.

        Attempts that fail on an endpoint that is down (see ``engine.teacher.endpoints``) do not
        count against ``retry.max_attempts``. Raises ``RequestRejected`` (other 4xx),
        ``RetriesExhausted`` (attempts used up), ``AuthError`` (401/403) or ``EndpointDown``
        (both fatal for the run).
        """
        body = canonical_body(request.payload(self.model, self.wire))
        # Looked up before the limiter and the endpoints: a hit spends neither.
        key = request_key(body) if self._cache is not None else None
        if key is not None and (cached := self._cached(key)) is not None:
            return cached
        budget = request.token_budget()
        attempt = 0
        token = object()  # this request, to the endpoints' health, across its attempts
        while True:
            try:
                reply = await self._attempt(token, body, budget)
            except _EndpointDown:
                continue  # routed elsewhere, or paced by the probes; the budget is untouched
            except ItemError as err:
                err.attempts = attempt + 1
                raise
            except RetryableError as err:
                attempt += 1
                await self._wait(attempt, err, request.stage)
                continue
            if key is not None and self._cache is not None:
                self._cache.put(key, reply.raw)  # only a valid chat completion gets here
            return reply.value

    def forget(self, request: ChatRequest) -> None:
        if self._cache is not None:
            body = canonical_body(request.payload(self.model, self.wire))
            self._cache.discard(request_key(body))

    async def _wait(self, attempt: int, err: RetryableError, stage: str) -> None:
        """Back off before attempt ``attempt + 1``, or give up: ``RetriesExhausted``."""
        if attempt == self._retry.max_attempts:
            raise RetriesExhausted(
                f"gave up after {attempt} attempts: {err}",
                status=err.status,
                body=err.body,
                attempts=attempt,
            ) from err
        # Outside the limiter's slot: a request backing off must not hold concurrency.
        reason = retry_reason(err)
        self.stats.retries[reason] += 1
        delay = backoff(
            attempt,
            err.retry_after,
            base=self._retry.backoff_base_s,
            cap=self._retry.backoff_max_s,
            retry_after_cap=self._retry.retry_after_max_s,
            rng=self._rng,
        )
        log.warning(
            "teacher request failed (stage %s, attempt %d/%d, %s): %s; retrying in %.2fs",
            stage or "-",
            attempt,
            self._retry.max_attempts,
            reason,
            err,
            delay,
        )
        await self._sleep(delay)

    def _cached(self, key: bytes) -> ChatReply | None:
        """The stored reply for ``key``, if any; its tokens were counted when it was received."""
        raw = self._cache.get(key) if self._cache is not None else None
        if raw is None:
            return None
        try:
            reply = self._parse(raw)
        except MalformedResponse:
            return None  # stored by a parser that accepted more: ask again, and store anew
        self.stats.cache_hits += 1
        return reply

    async def _attempt(self, token: object, body: bytes, budget: int) -> _Received:
        """One attempt, in a limiter slot, to the endpoint the pool picks then."""
        while True:
            # Before the slot: waiting out an outage holds none.
            probe = await self.endpoints.ready()
            try:
                async with self._limiter.slot(budget) as lease:
                    passage = self.endpoints.route(token, probe)
                    probe = None  # the passage settles it from here
                    if passage is None:
                        continue  # all went down while this waited for its slot
                    try:
                        return await self._exchange(passage, lease, body)
                    except RetryableError as err:
                        if passage.endpoint.health.down and unreachable(err):
                            self.stats.retries[retry_reason(err)] += 1
                            raise _EndpointDown from err
                        raise
            finally:
                if probe is not None:  # cancelled before it could be sent
                    self.endpoints.release(probe)

    async def _exchange(self, passage: Passage, lease: Lease, body: bytes) -> _Received:
        """Send ``body`` to ``passage.endpoint``; the reply, or the engine error saying what
        went wrong. Reports the outcome to the endpoint's health and to the limiter."""
        self.stats.requests_sent += 1
        try:
            status, headers, raw = await self._post(passage.endpoint.chat_url, body)
        except RetryableError:
            passage.outcome = AttemptOutcome.UNREACHABLE
            raise
        else:
            passage.outcome = answered_outcome(status)
        finally:
            self.endpoints.settle(passage)
        try:
            reply = self._reply(passage.endpoint, status, headers, raw)
        except EngineError as err:
            if status == HTTPStatus.TOO_MANY_REQUESTS:
                # Fewer requests in flight for a while, and none sent until Retry-After.
                lease.throttled(self._quiet_after(err))
            else:
                lease.answered(0)
            raise
        lease.answered(reply.usage.prompt_tokens + reply.usage.completion_tokens)
        return _Received(reply, raw)

    def _quiet_after(self, err: EngineError) -> float | None:
        """The Retry-After of a 429, capped like the retry's own wait."""
        seconds = err.retry_after if isinstance(err, RetryableError) else None
        return None if seconds is None else min(seconds, self._retry.retry_after_max_s)

    async def probe(self, url: str, payload: Mapping[str, Any] | None = None) -> ProbeReply:
        """One preflight request: ``GET url``, or ``POST`` of ``payload`` as JSON.

        Sent once, outside the limiter, the endpoint pool, the cache and the retries: the
        preflight wants to see what the server says, whatever it is. Never raises for what
        the server or the network did; counted in ``stats.preflight_requests``.
        """
        self.stats.preflight_requests += 1
        body = None if payload is None else orjson.dumps(payload)
        try:
            status, headers, raw = await self._send("POST" if body else "GET", url, body)
        except RetryableError as err:
            return ProbeReply(url, None, {}, b"", str(err))
        # A gateway may echo the key in its answer, which the preflight quotes in messages.
        if self._secret is not None and self._secret in raw.decode("utf-8", "replace"):
            raw = redact(raw.decode("utf-8", "replace"), self._secret).encode()
        return ProbeReply(url, status, dict(headers), raw)

    async def _post(self, url: str, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        return await self._send("POST", url, body)

    async def _send(
        self, method: str, url: str, body: bytes | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        """The HTTP exchange itself; aiohttp's exceptions end here. Redirects are never
        followed: a POST re-sent as a GET would be answered 405 and hide the cause."""
        if self._session is None:
            raise RuntimeError("HTTPTeacher is not open: use `async with HTTPTeacher(...)`")
        proxy = self._proxy(url)
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                allow_redirects=False,
                proxy=None if proxy is None else proxy.url,
            ) as response:
                return response.status, response.headers, await response.read()
        # ServerTimeoutError is also a ClientConnectionError: catch timeouts first.
        except TimeoutError as err:
            raise TeacherTimeout(f"no reply from {url} in time") from err
        except aiohttp.InvalidURL as err:
            raise ConfigError([f"teacher.base_url is not a usable URL: {err}"]) from err
        except aiohttp.ClientError as err:
            raise self._connection_failure(url, proxy, err) from err

    def _connection_failure(
        self, url: str, proxy: Proxy | None, err: aiohttp.ClientError
    ) -> EngineError:
        """What a failed connection means, as the engine error that says what to change."""
        if isinstance(err, aiohttp.ClientConnectorCertificateError):
            cause = err.certificate_error
            return tls_failure(
                f"{err.host}:{err.port}",
                getattr(cause, "verify_message", None) or str(cause),
                getattr(cause, "verify_code", None),
                ca_bundle=self._config.ca_bundle,
                proxy=proxy if proxy is not None and proxy.host == err.host else None,
            )
        if isinstance(err, aiohttp.ClientConnectorDNSError):
            return dns_failure(url, err.host, proxy)
        if isinstance(err, aiohttp.ClientHttpProxyError) and proxy is not None:
            return proxy_failure(url, proxy, err.status, err.message)
        if isinstance(err, aiohttp.ClientProxyConnectionError) and proxy is not None:
            return TeacherConnectionError(
                f"cannot connect to the proxy {proxy.public} (from {proxy.variable}) for "
                f"{url}: {err.os_error.strerror or err.os_error}"
            )
        if isinstance(err, aiohttp.ClientConnectorSSLError):
            return TeacherConnectionError(
                f"TLS handshake with {err.host}:{err.port} failed for {url}: {err.os_error} "
                "(an https:// URL on a plain-HTTP port fails like this)"
            )
        return TeacherConnectionError(f"connection to {url} failed: {type(err).__name__}: {err}")

    def _reply(
        self, endpoint: Endpoint, status: int, headers: Mapping[str, str], raw: bytes
    ) -> ChatReply:
        decision = classify(status)
        if decision == "ok":
            reply = self._parse(raw)
            self.stats.prompt_tokens += reply.usage.prompt_tokens
            self.stats.completion_tokens += reply.usage.completion_tokens
            return reply
        if decision == "auth":
            raise AuthError(endpoint.url, status)
        if decision == "redirect":
            raise redirected(endpoint.url, endpoint.chat_url, status, headers)
        if status == HTTPStatus.PROXY_AUTHENTICATION_REQUIRED and (
            proxy := self._proxy(endpoint.chat_url)
        ):
            raise proxy_failure(endpoint.chat_url, proxy, status, "Proxy Authentication Required")
        excerpt = _excerpt(raw, self._secret)
        if decision == "reject":
            raise RequestRejected(
                f"the teacher rejected the request: HTTP {status}: {excerpt}",
                status=status,
                body=excerpt,
            )
        raise TeacherHTTPError(
            f"HTTP {status}: {excerpt}",
            status=status,
            retry_after=retry_after(headers),
            body=excerpt,
        )

    def _parse(self, raw: bytes) -> ChatReply:
        """A 200 body as a ``ChatReply``; ``MalformedResponse`` if it is not a chat completion."""
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

    def __repr__(self) -> str:
        proxies = sorted({f"{p.public} ({p.variable})" for p in self._proxies.values() if p})
        via = f" via {', '.join(proxies)}" if proxies else ""
        return f"<HTTPTeacher {self.base_url} model={self.model}{via}>"


@dataclass(frozen=True, slots=True)
class ProbeReply:
    """What one preflight request got: the status, headers and body of the answer, or (with
    ``status`` None) why there was none."""

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
        return _excerpt(message.encode()) if isinstance(message, str) else _excerpt(self.body)


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


class _EndpointDown(Exception):
    """An attempt failed on an endpoint already known to be down: it costs no attempt."""


@dataclass(frozen=True, slots=True)
class _Received:
    value: ChatReply
    raw: bytes


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2].lower()}"


# Where servers put the reasoning they set apart: vLLM has used both names across releases.
_REASONING_FIELDS = ("reasoning_content", "reasoning")


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
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _excerpt(raw: bytes, secret: str | None = None) -> str:
    """The start of a body, on one line; a key the server echoed back is taken out first."""
    text = redact(raw.decode("utf-8", errors="replace"), secret)
    return " ".join(text.split())[:_EXCERPT_CHARS]


def _malformed(problem: str, raw: bytes) -> MalformedResponse:
    excerpt = _excerpt(raw)
    return MalformedResponse(f"HTTP 200 but {problem}: {excerpt}", status=200, body=excerpt)
