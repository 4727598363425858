"""Fault hooks for the simulator (``SimulatorConfig.fault``): which requests fail, and how.

``FaultInjector(plan)`` sees every request the simulator receives and asks ``plan`` what to
do with it. The plan gets a ``Seen``: the body, its ``key`` (a retry sends the same body, so
it has the same key), the order in which distinct bodies first arrived (``index``) and the
``attempt`` number of this body. Choosing faults by these, never at random, keeps a faulted
run's counts exact whatever order the engine's concurrent requests arrive in.

The plan returns a response to send instead of the real one (``error``, ``text``,
``payload``, ``completion``, ``reset``), None to answer normally, or an awaitable of either
(``Hang``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the fault hook saw it."""

    seq: int
    body: dict[str, Any]
    key: str
    index: int  # 0 for the first distinct body to arrive, 1 for the next, ...
    attempt: int  # 1 the first time this body arrives
    arrival: float  # time.monotonic()

    @property
    def prompt(self) -> str:
        """The last user message."""
        for message in reversed(self.body["messages"]):
            if message.get("role") == "user":
                return str(message.get("content", ""))
        return ""


Outcome: TypeAlias = web.StreamResponse | None
Plan: TypeAlias = Callable[[Seen], Outcome | Awaitable[Outcome]]


def request_key(body: dict[str, Any]) -> str:
    """The identity of a request body: the same for every attempt of one request."""
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()


class FaultInjector:
    """A ``FaultHook`` that applies ``plan`` and keeps a log of what it saw and did."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.seen: list[Seen] = []
        # (request, status of the response sent instead); status 0 for a reset or a hang.
        self.injected: list[tuple[Seen, int]] = []
        self._index: dict[str, int] = {}
        self._attempts: dict[str, int] = {}

    async def __call__(self, seq: int, body: dict[str, Any]) -> web.StreamResponse | None:
        key = request_key(body)
        index = self._index.setdefault(key, len(self._index))
        attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
        seen = Seen(seq, body, key, index, attempt, time.monotonic())
        self.seen.append(seen)
        outcome = self.plan(seen)
        if outcome is None or isinstance(outcome, web.StreamResponse):
            if outcome is not None:
                self.injected.append((seen, 0 if isinstance(outcome, Reset) else outcome.status))
            return outcome
        self.injected.append((seen, 0))
        return await outcome

    @property
    def distinct(self) -> int:
        """Distinct request bodies seen."""
        return len(self._index)

    def attempts(self, key: str) -> list[Seen]:
        """Every arrival of the request with ``key``, in order."""
        return [s for s in self.seen if s.key == key]

    def statuses(self) -> dict[int, int]:
        """How many faults were injected, by status (0: reset or hang)."""
        counts: dict[int, int] = {}
        for _seen, status in self.injected:
            counts[status] = counts.get(status, 0) + 1
        return counts

    def __repr__(self) -> str:
        return (
            f"<FaultInjector seen={len(self.seen)} distinct={self.distinct} "
            f"injected={self.statuses()}>"
        )


# --- what to send instead ---------------------------------------------------------------


def error(
    status: int,
    message: str = "injected fault",
    *,
    code: str | None = None,
    kind: str = "server_error",
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-style error reply."""
    payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def completion(*contents: str, model: str = "sim-teacher") -> web.Response:
    """A well-formed chat completion whose choices say ``contents`` (junk, for the gates)."""
    choices = [
        {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
        for i, c in enumerate(contents)
    ]
    usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
    body = {"id": "chatcmpl-junk", "object": "chat.completion", "created": 0, "model": model}
    return payload({**body, "choices": choices, "usage": usage})


def text(body: str, status: int = 200, content_type: str = "text/plain") -> web.Response:
    """A reply with ``body`` verbatim."""
    return web.Response(status=status, text=body, content_type=content_type)


def payload(value: Any, status: int = 200) -> web.Response:
    """A JSON reply holding ``value``."""
    return web.Response(status=status, body=orjson.dumps(value), content_type="application/json")


class Reset(web.StreamResponse):
    """Not a reply: the connection is dropped, before the response or ``partial`` bytes into
    its body (a server that dies while answering).

    aiohttp calls ``prepare`` with the request, which is the only place a hook's response can
    reach the transport; the ``ConnectionResetError`` is how aiohttp expects a handler to
    report a client that is gone.
    """

    def __init__(self, partial: bytes = b"") -> None:
        super().__init__()
        self.partial = partial

    async def prepare(self, request: BaseRequest) -> None:
        if self.partial:
            self.content_type = "application/json"
            self.content_length = 10 * len(self.partial)
            await super().prepare(request)
            await self.write(self.partial)
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("connection dropped by the fault hook")


def reset(partial: bytes = b"") -> Reset:
    return Reset(partial)


class Hang:
    """A request that hangs for ``seconds`` (or until ``release()``), then is answered."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._released = asyncio.Event()

    async def __call__(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), self.seconds)

    def release(self) -> None:
        """End every hang now, so the server can shut down without waiting for them."""
        self._released.set()
