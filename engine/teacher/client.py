"""``HTTPTeacher``: the teacher behind an OpenAI-compatible ``/chat/completions`` endpoint.

Each request goes cache -> endpoints -> limiter -> transport, and back through the reply's
reading, with retries around the whole: ``complete`` asks the cache, ``_with_retries`` backs
off between attempts, ``_attempt`` waits for an endpoint and a limiter slot, ``_exchange``
sends through the transport (``engine.teacher.transport``) and reads the answer
(``engine.teacher.wire``), reporting its outcome to the endpoint's health and the limiter.
Callers see a ``ChatReply`` or an engine error.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self

import orjson

from engine.config import RetryConfig, TeacherConfig
from engine.config.secrets import redact
from engine.errors import (
    EngineError,
    ItemError,
    MalformedResponse,
    RetriesExhausted,
    RetryableError,
)
from engine.teacher.cache import ResponseCache, canonical_body, request_key
from engine.teacher.endpoints import Endpoint, EndpointPool, Passage
from engine.teacher.health import AttemptOutcome, answered_outcome, unreachable
from engine.teacher.limits import Lease, RequestLimiter
from engine.teacher.network import Proxies
from engine.teacher.protocol import ChatReply, ChatRequest, Wire
from engine.teacher.retry import backoff, classify, retry_reason
from engine.teacher.stats import RequestStats
from engine.teacher.transport import AiohttpTransport, Response, Transport
from engine.teacher.wire import ProbeReply, error_for_status, parse_chat_completion

log = logging.getLogger(__name__)


class HTTPTeacher:
    """Sends chat requests through ``limiter``, retrying transient failures with back-off.

    Use as ``async with HTTPTeacher(...) as teacher:``; leaving the block closes the
    ``transport`` (default: an ``AiohttpTransport`` for ``teacher``, sized to the limiter).
    With a ``cache``, a request answered before is answered from it: nothing is sent, and no
    rate budget or concurrency slot is used. Counts what it sends and gets in ``stats``
    (its own ``RequestStats`` unless given one). ``sleep`` waits out back-offs and ``rng``
    draws their jitter (both injectable for tests).

    Raises ``ConfigError`` when a proxy setting for the teacher's URLs is unusable, or (with
    the default transport) the certificates to trust cannot be loaded.
    """

    def __init__(
        self,
        teacher: TeacherConfig,
        retry: RetryConfig,
        limiter: RequestLimiter,
        *,
        stats: RequestStats | None = None,
        transport: Transport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.model = teacher.model
        self.base_url = ", ".join(teacher.urls)
        self.stats = stats if stats is not None else RequestStats()
        # How requests are written for this server (set from the preflight's findings).
        self.wire = Wire()
        self._retry = retry
        self._limiter = limiter
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._cache = cache
        key = teacher.api_key
        self._secret = key.get_secret_value() if key is not None else None
        # The proxy of each URL, decided once per origin (engine.teacher.network): the
        # transport sends through them, and a proxy's 407 is read as the proxy's refusal.
        self._proxies = Proxies(teacher.urls)
        if transport is None:
            transport = AiohttpTransport(
                teacher, self._proxies, max_concurrency=limiter.max_concurrency
            )
        self._transport = transport
        self._open = False
        self.endpoints = EndpointPool(
            teacher.urls,
            threshold=retry.outage_threshold,
            probe_base_s=retry.outage_probe_base_s,
            probe_max_s=retry.outage_probe_max_s,
            give_up_s=retry.outage_max_s,
        )

    @property
    def transport(self) -> Transport:
        """What sends the requests."""
        return self._transport

    async def __aenter__(self) -> Self:
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        await self._transport.close()

    async def complete(self, request: ChatRequest) -> ChatReply:
        """Send ``request``; retry timeouts, resets, 408/409/429/5xx and malformed replies.

        Attempts that fail on an endpoint that is down (see ``engine.teacher.endpoints``) do not
        count against ``retry.max_attempts``. Raises ``RequestRejected`` (other 4xx),
        ``RetriesExhausted`` (attempts used up), ``AuthError`` (401/403), ``Redirected``
        (3xx), ``TLSVerificationError``, ``ProxyRefused`` or ``EndpointDown`` (all fatal for
        the run), and ``RuntimeError`` outside ``async with``.
        """
        body = canonical_body(request.payload(self.model, self.wire))
        # Looked up before the limiter and the endpoints: a hit spends neither.
        key = request_key(body) if self._cache is not None else None
        if key is not None and (cached := self._cached(key)) is not None:
            return cached
        received = await self._with_retries(body, request.token_budget(), request.stage)
        if key is not None and self._cache is not None:
            self._cache.put(key, received.raw)  # only a valid chat completion gets here
        return received.reply

    def forget(self, request: ChatRequest) -> None:
        """The reply to ``request`` did not validate: drop it from the cache, if any."""
        if self._cache is not None:
            body = canonical_body(request.payload(self.model, self.wire))
            self._cache.discard(request_key(body))

    async def probe(self, url: str, payload: Mapping[str, Any] | None = None) -> ProbeReply:
        """One preflight request: ``GET url``, or ``POST`` of ``payload`` as JSON.

        Sent once, outside the limiter, the endpoint pool, the cache and the retries: the
        preflight wants to see what the server says, whatever it is. Never raises for what
        the server or the network did (only for what no request could get through:
        ``TLSVerificationError``, ``ProxyRefused``, ``ConfigError``); counted in
        ``stats.preflight_requests``. The key, if the server echoed it, is taken out of the
        body.
        """
        self.stats.preflight_requests += 1
        body = None if payload is None else orjson.dumps(payload)
        try:
            response = await self._send("POST" if body else "GET", url, body)
        except RetryableError as err:
            return ProbeReply(url, None, {}, b"", str(err))
        raw = response.body
        # A gateway may echo the key in its answer, which the preflight quotes in messages.
        if self._secret is not None and self._secret in raw.decode("utf-8", "replace"):
            raw = redact(raw.decode("utf-8", "replace"), self._secret).encode()
        return ProbeReply(url, response.status, dict(response.headers), raw)

    def _cached(self, key: bytes) -> ChatReply | None:
        """The stored reply for ``key``, if any; its tokens were counted when it was received."""
        raw = self._cache.get(key) if self._cache is not None else None
        if raw is None:
            return None
        try:
            reply = parse_chat_completion(raw)
        except MalformedResponse:
            return None  # stored by a parser that accepted more: ask again, and store anew
        self.stats.cache_hits += 1
        return reply

    async def _with_retries(self, body: bytes, budget: int, stage: str) -> _Received:
        """Attempts of one request until one is answered, backing off between them."""
        attempt = 0
        request_id = object()  # names this request to the endpoints' health, across attempts
        while True:
            try:
                return await self._attempt(request_id, body, budget)
            except _EndpointDown:
                continue  # routed elsewhere, or paced by the probes; the budget is untouched
            except ItemError as err:
                err.attempts = attempt + 1
                raise
            except RetryableError as err:
                attempt += 1
                await self._wait(attempt, err, stage)

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

    async def _attempt(self, request_id: object, body: bytes, budget: int) -> _Received:
        """One attempt: a usable endpoint, then a limiter slot, then the exchange."""
        while True:
            # Before the slot: waiting out an outage holds none.
            probe = await self.endpoints.ready()
            received = await self._in_slot(request_id, body, budget, probe)
            if received is not None:
                return received
            # Every endpoint went down while this waited for its slot: wait again.

    async def _in_slot(
        self, request_id: object, body: bytes, budget: int, probe: Endpoint | None
    ) -> _Received | None:
        """In a limiter slot, to the endpoint the pool picks then (``probe``, if this attempt
        claimed one); None if none can take it now."""
        try:
            async with self._limiter.slot(budget) as lease:
                passage = self.endpoints.route(request_id, probe)
                probe = None  # the passage settles it from here
                if passage is None:
                    return None
                return await self._exchange(passage, lease, body)
        finally:
            if probe is not None:  # cancelled before it could be sent
                self.endpoints.release(probe)

    async def _exchange(self, passage: Passage, lease: Lease, body: bytes) -> _Received:
        """Send ``body`` to ``passage.endpoint`` and read the answer; the reply, or the
        engine error saying what went wrong (``_EndpointDown`` if the endpoint is down and
        the failure says it is not there). Reports the outcome to the limiter."""
        try:
            response = await self._post(passage, body)
            reply = self._read(passage.endpoint, response, lease)
        except RetryableError as err:
            if passage.endpoint.health.down and unreachable(err):
                self.stats.retries[retry_reason(err)] += 1
                raise _EndpointDown from err
            raise
        return _Received(reply, response.body)

    async def _post(self, passage: Passage, body: bytes) -> Response:
        """The HTTP exchange, its outcome settled in the endpoint's health."""
        self.stats.requests_sent += 1
        try:
            response = await self._send("POST", passage.endpoint.chat_url, body)
        except RetryableError:
            passage.outcome = AttemptOutcome.UNREACHABLE
            raise
        else:
            passage.outcome = answered_outcome(response.status)
        finally:
            self.endpoints.settle(passage)
        return response

    def _read(self, endpoint: Endpoint, response: Response, lease: Lease) -> ChatReply:
        """The reply in ``response``, or its error; the limiter learns which it was."""
        try:
            reply = self._reply(endpoint, response)
        except EngineError as err:
            if response.status == HTTPStatus.TOO_MANY_REQUESTS:
                # Fewer requests in flight for a while, and none sent until Retry-After.
                lease.throttled(self._quiet_after(err))
            else:
                lease.answered(0)
            raise
        lease.answered(reply.usage.prompt_tokens + reply.usage.completion_tokens)
        return reply

    def _reply(self, endpoint: Endpoint, response: Response) -> ChatReply:
        """A 2xx body as a ``ChatReply`` (its tokens counted); any other status raised as
        the engine error it means (``engine.teacher.wire.error_for_status``)."""
        if classify(response.status) != "ok":
            raise error_for_status(
                response.status,
                response.headers,
                response.body,
                base_url=endpoint.url,
                url=endpoint.chat_url,
                proxy=self._proxies.for_url(endpoint.chat_url),
                secret=self._secret,
            )
        reply = parse_chat_completion(response.body, self._secret)
        self.stats.prompt_tokens += reply.usage.prompt_tokens
        self.stats.completion_tokens += reply.usage.completion_tokens
        return reply

    def _quiet_after(self, err: EngineError) -> float | None:
        """The Retry-After of a 429, capped like the retry's own wait."""
        seconds = err.retry_after if isinstance(err, RetryableError) else None
        return None if seconds is None else min(seconds, self._retry.retry_after_max_s)

    async def _send(self, method: str, url: str, body: bytes | None) -> Response:
        if not self._open:
            raise RuntimeError("HTTPTeacher is not open: use `async with HTTPTeacher(...)`")
        return await self._transport.send(method, url, body)

    def __repr__(self) -> str:
        proxies = sorted({f"{p.public} ({p.variable})" for p in self._proxies.in_use})
        via = f" via {', '.join(proxies)}" if proxies else ""
        return f"<HTTPTeacher {self.base_url} model={self.model}{via}>"


class _EndpointDown(Exception):
    """An attempt failed on an endpoint already known to be down: it costs no attempt."""


@dataclass(frozen=True, slots=True)
class _Received:
    reply: ChatReply
    raw: bytes
