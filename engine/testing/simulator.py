"""A simulated OpenAI-compatible teacher: a real aiohttp server for tests and benchmarks.

Replies are deterministic JSON instances of the requested schema (``json_schema``,
``json_object`` or a ``<schema>...</schema>`` block in the prompt), with knobs for
latency, rate limits, injected faults and the reply layouts of reasoning models.

    python -m engine.testing.simulator --port 8000 --latency-mean 1.0 --latency-sigma 0.6
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import logging
import math
import random
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

import orjson
from aiohttp import web

from engine.testing.schema_instance import digest, instance_for_schema, sentence

logger = logging.getLogger(__name__)

FaultHook: TypeAlias = Callable[[int, dict[str, Any]], Awaitable[web.StreamResponse | None]]

_SCHEMA_MARKERS = re.compile(r"<schema>(.*?)</schema>", re.DOTALL)
_DOCUMENT = re.compile(r"<document>\n?(.*?)\n?</document>", re.DOTALL)
# A summary is this share of the document it summarises, like the prompts ask (a quarter to a
# third): well inside the engine's length checks (quality.summary_min_ratio).
SUMMARY_SHARE = 0.3
# json_object mode without any schema still has to answer with some JSON object.
_ANY_OBJECT: dict[str, Any] = {"type": "object", "properties": {"result": {"type": "string"}}}

# How a reasoning teacher lays out its reply (see engine/reasoning.py for the real ones):
#   field: the answer in content, the reasoning in ``reasoning_field`` (a reasoning parser);
#   answer_in_field: content null, the answer in ``reasoning_field`` (guided decoding with a
#     reasoning parser, vllm #16182);
#   thinking_blocks: content as typed blocks, thinking then text (Mistral's API);
#   inline: content is <open>reasoning<close> then the answer (no reasoning parser);
#   template_opened: content is reasoning<close> then the answer (the template opened it);
#   cut_off: content is <open>reasoning, never closed, finish_reason "length".
# The reasoning holds a draft of the answer whose strings start with DRAFT_MARK (valid
# for schemas that constrain strings only to be there, as the engine's do): a client that
# parses the reasoning as the answer writes them into its records.
ReasoningLayout = Literal[
    "field", "answer_in_field", "thinking_blocks", "inline", "template_opened", "cut_off"
]
REASONING_LAYOUTS: tuple[ReasoningLayout, ...] = get_args(ReasoningLayout)
DRAFT_MARK = "DRAFT"


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated teacher behaves."""

    model: str = "sim-teacher"
    api_key: str | None = None
    latency_mean_s: float = 0.0
    # Sigma of the underlying normal; 0 gives a fixed latency of ``latency_mean_s``.
    latency_sigma: float = 0.0
    seed: int = 0
    array_items: int = 3
    boolean_value: bool = True
    # The message field for reasoning; set alone, it means the "field" layout.
    reasoning_field: str | None = None
    reasoning_layout: ReasoningLayout | None = None
    think_tags: tuple[str, str] = ("<think>", "</think>")
    supports_n: bool = True
    rpm_limit: int = 0
    # Report completion tokens as max_tokens per choice: a teacher that always writes to its
    # limit, so that a client's token reservations are exact (token-pacing benchmarks).
    usage_fills_max_tokens: bool = False
    fault: FaultHook | None = None
    # How a reply's latency is waited out (tests inject one that records or steers it).
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    # Where the API is served: "/v1" and "" (both, the default), or one of them.
    prefixes: tuple[str, ...] = ("/v1", "")
    # The context length, like vLLM's max_model_len: listed in /models, and a request whose
    # prompt (4 characters a token) plus max_tokens exceeds it gets vLLM's 400. 0: no limit.
    max_model_len: int = 0
    # List max_model_len in /models (vLLM does; llama.cpp and hosted APIs do not).
    report_context: bool = True
    # Answer only for ``model`` (vLLM's 404 for any other), instead of for any name.
    strict_model: bool = False
    # Require HTTP Basic authentication with this user and password (a gateway's), like
    # ``api_key`` requires a Bearer token.
    basic_auth: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        numbers = (self.latency_mean_s, self.latency_sigma, self.array_items, self.rpm_limit)
        if min(numbers) < 0:
            raise ValueError("simulator latency, array_items and rpm_limit must be >= 0")
        if self.reasoning_layout not in (None, *REASONING_LAYOUTS):
            raise ValueError(f"unknown reasoning_layout {self.reasoning_layout!r}")

    @property
    def layout(self) -> ReasoningLayout | None:
        """The reasoning layout in effect (None: the teacher does not reason)."""
        if self.reasoning_layout is None and self.reasoning_field is not None:
            return "field"
        return self.reasoning_layout


@dataclass
class RequestLog:
    """One chat-completions request as the server saw it (filled in as it progresses)."""

    seq: int
    arrival: float  # time.monotonic()
    finish: float | None = None
    status: int | None = None  # 499: the handler was cancelled
    n: int = 1
    response_format: str | None = None  # the ``type`` of response_format; None when absent
    prompt_head: str = ""  # first 80 characters of the last user message
    tokens: int = 0  # prompt + completion tokens reported in the reply's usage


class SimulatorState:
    """Statistics of a running simulator, readable by tests and benchmarks."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.requests: list[RequestLog] = []
        # Every HTTP request, whatever its path or method: (method, path, status).
        self.http: list[tuple[str, str, int]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.rng = random.Random(config.seed)
        self.window = _RateWindow(config.rpm_limit)

    @property
    def total_requests(self) -> int:
        """Chat-completion requests received so far, answered or not."""
        return len(self.requests)

    def arrive(self) -> RequestLog:
        """Log a request as it arrives; it is in flight until ``depart``."""
        log = RequestLog(seq=len(self.requests), arrival=time.monotonic())
        self.requests.append(log)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return log

    def depart(self, log: RequestLog, status: int) -> None:
        """Log the end of a request with the status it was answered with (499: cancelled)."""
        log.finish = time.monotonic()
        log.status = status
        self.in_flight -= 1

    def __repr__(self) -> str:
        return (
            f"SimulatorState(requests={self.total_requests}, in_flight={self.in_flight}, "
            f"peak_in_flight={self.peak_in_flight})"
        )


class _RateWindow:
    """Sliding 60 s window of admitted requests; ``limit`` 0 admits everything."""

    def __init__(self, limit: int, period: float = 60.0) -> None:
        self.limit = limit
        self.period = period
        self._admitted: deque[float] = deque()

    def acquire(self, now: float) -> int | None:
        """Admit a request at ``now`` (None) or return the seconds until a slot frees."""
        if self.limit <= 0:
            return None
        while self._admitted and self._admitted[0] <= now - self.period:
            self._admitted.popleft()
        if len(self._admitted) < self.limit:
            self._admitted.append(now)
            return None
        return max(1, math.ceil(self._admitted[0] + self.period - now))


# --- request handling -------------------------------------------------------------------


class _BadRequest(Exception):
    """The request body cannot be answered; becomes a 400."""


_STATE = web.AppKey("simulator_state", SimulatorState)
_CONFIG = web.AppKey("simulator_config", SimulatorConfig)


def make_app(config: SimulatorConfig) -> tuple[web.Application, SimulatorState]:
    """The simulator's aiohttp application and the statistics it keeps."""
    state = SimulatorState(config)
    app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[_count_http])
    app[_STATE] = state
    app[_CONFIG] = config
    for prefix in config.prefixes:
        app.router.add_post(f"{prefix}/chat/completions", _chat_completions)
        app.router.add_get(f"{prefix}/models", _models)
    return app, state


@web.middleware
async def _count_http(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Log every request, 404s and 405s included (they never reach a handler)."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as err:
        status = err.status
        raise
    finally:
        request.app[_STATE].http.append((request.method, request.path, status))


async def _models(request: web.Request) -> web.StreamResponse:
    config = request.app[_CONFIG]
    if not _authorized(request, config.api_key, config.basic_auth):
        return _unauthorized()
    model: dict[str, Any] = {"id": config.model, "object": "model"}
    if config.max_model_len and config.report_context:
        model["max_model_len"] = config.max_model_len
    return _json({"object": "list", "data": [model]})


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    log = state.arrive()
    status = 500
    try:
        response = await _answer(request, request.app[_CONFIG], state, log)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        state.depart(log, status)


async def _answer(
    request: web.Request, config: SimulatorConfig, state: SimulatorState, log: RequestLog
) -> web.StreamResponse:
    if not _authorized(request, config.api_key, config.basic_auth):
        return _unauthorized()
    retry_after = state.window.acquire(time.monotonic())
    if retry_after is not None:
        return _error(
            429,
            f"Rate limit reached: {config.rpm_limit} requests per minute.",
            kind="requests",
            code="rate_limit_exceeded",
            headers={"retry-after": str(retry_after)},
        )
    try:
        body = _parse_body(await request.read())
        _describe(log, body)
        faulty = None if config.fault is None else await config.fault(log.seq, body)
        if faulty is not None:
            return faulty
        refused = _refusal(body, config)
        if refused is not None:
            return refused
        completion = _completion(body, config, log.seq)
        log.tokens = completion["usage"]["total_tokens"]
    except _BadRequest as err:
        return _error(400, str(err), kind="invalid_request_error", code=None)
    await config.sleep(_latency(config, state.rng))
    return _json(completion)


def _authorized(
    request: web.Request, api_key: str | None, basic: tuple[str, str] | None = None
) -> bool:
    got = request.headers.get("Authorization", "")
    if basic is not None:
        token = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        return hmac.compare_digest(got.encode(), f"Basic {token}".encode())
    if api_key is None:
        return True
    return hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode())


def _unauthorized() -> web.Response:
    return _error(
        401, "Incorrect API key provided.", kind="invalid_request_error", code="invalid_api_key"
    )


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise _BadRequest(f"request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list")
    if not all(isinstance(m, dict) for m in messages):
        raise _BadRequest("each message must be an object")
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise _BadRequest("'n' must be an integer between 1 and 128")
    if body.get("stream"):
        raise _BadRequest("streaming is not supported by the simulator")
    return body


def _refusal(body: dict[str, Any], config: SimulatorConfig) -> web.Response | None:
    """vLLM's answers to a model it does not serve and to a request over the context."""
    if config.strict_model and body.get("model") != config.model:
        return _error(
            404,
            f"The model `{body.get('model')}` does not exist.",
            kind="NotFoundError",
            code=None,
        )
    limit = config.max_model_len
    if not limit:
        return None
    prompt = sum(_tokens(_text_of(m.get("content"))) for m in body["messages"])
    completion = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    if not isinstance(completion, int) or prompt + completion <= limit:
        return None
    return _error(
        400,
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the "
        "completion). Please reduce the length of the messages or completion.",
        kind="BadRequestError",
        code=None,
    )


def _describe(log: RequestLog, body: dict[str, Any]) -> None:
    log.n = body.get("n", 1)
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        log.response_format = str(response_format.get("type"))
    log.prompt_head = _last_user_text(body["messages"])[:80]


def _completion(body: dict[str, Any], config: SimulatorConfig, seq: int) -> dict[str, Any]:
    count = body.get("n", 1) if config.supports_n else 1
    messages = orjson.dumps(body["messages"], option=orjson.OPT_SORT_KEYS).decode()
    request_seed = f"{digest(messages):x}"
    choices: list[dict[str, Any]] = []
    completion_tokens = 0
    for index in range(count):
        seed = f"{request_seed}#{index}"
        answer = _content(body, seed, config)
        thinking = "" if config.layout is None else _thinking(body, seed, config)
        message, finish = _lay_out(answer, thinking, config)
        completion_tokens += _tokens(answer) + (_tokens(thinking) if thinking else 0)
        choices.append({"index": index, "message": message, "finish_reason": finish})
    prompt_tokens = sum(_tokens(_text_of(m.get("content"))) for m in body["messages"])
    max_tokens = body.get("max_tokens")
    if config.usage_fills_max_tokens and isinstance(max_tokens, int):
        completion_tokens = max_tokens * count
    return {
        "id": f"chatcmpl-sim-{seq}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or config.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _content(body: dict[str, Any], seed: str, config: SimulatorConfig) -> str:
    schema, fenced = _requested_schema(body)
    if schema is None:
        return _lorem(seed)
    try:
        instance = instance_for_schema(
            schema,
            seed,
            array_items=config.array_items,
            boolean_value=config.boolean_value,
            min_lengths=_min_lengths(body["messages"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _BadRequest(f"cannot follow the requested schema: {err!r}") from err
    if not fenced:
        return orjson.dumps(instance).decode()
    pretty = orjson.dumps(instance, option=orjson.OPT_INDENT_2).decode()
    return f"Here is the result:\n```json\n{pretty}\n```\nHope this helps."


def _min_lengths(messages: list[dict[str, Any]]) -> dict[str, int]:
    """A summary as long as a summary of the prompt's ``<document>`` would be."""
    match = _DOCUMENT.search(_last_user_text(messages))
    return {"summary": int(SUMMARY_SHARE * len(match.group(1)))} if match else {}


def _thinking(body: dict[str, Any], seed: str, config: SimulatorConfig) -> str:
    """Reasoning text, with a draft of the answer in it when a schema was asked for."""
    text = "Let me think this through. " + _lorem(seed + "/reasoning")
    schema, _ = _requested_schema(body)
    if schema is None:
        return text
    draft = instance_for_schema(schema, seed + "/draft", array_items=config.array_items)
    return f"{text} A first draft: {orjson.dumps(_mark_draft(draft)).decode()}"


def _mark_draft(value: Any) -> Any:
    if isinstance(value, str):
        return f"{DRAFT_MARK} {value}"
    if isinstance(value, list):
        return [_mark_draft(v) for v in value]
    if isinstance(value, dict):
        return {k: _mark_draft(v) for k, v in value.items()}
    return value


def _lay_out(answer: str, thinking: str, config: SimulatorConfig) -> tuple[dict[str, Any], str]:
    """The message and finish_reason of one choice, laid out as ``config.layout`` says."""
    field = config.reasoning_field or "reasoning_content"
    opening, closing = config.think_tags
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    finish = "stop"
    match config.layout:
        case "field":
            message[field] = thinking
        case "answer_in_field":
            message.update({"content": None, field: answer})
        case "thinking_blocks":
            message["content"] = [
                {"type": "thinking", "thinking": [{"type": "text", "text": thinking}]},
                {"type": "text", "text": answer},
            ]
        case "inline":
            message["content"] = f"{opening}{thinking}{closing}\n\n{answer}"
        case "template_opened":
            message["content"] = f"{thinking}\n{closing}\n\n{answer}"
        case "cut_off":
            message["content"] = f"{opening}{thinking}"
            finish = "length"
    return message, finish


def _requested_schema(body: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """The schema to answer with, and whether to wrap it in prose (text mode)."""
    response_format = body.get("response_format") or {"type": "text"}
    if not isinstance(response_format, dict):
        raise _BadRequest("'response_format' must be an object")
    match response_format.get("type"):
        case "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise _BadRequest("'response_format.json_schema.schema' must be an object")
            return schema, False
        case "json_object":
            schema = response_format.get("schema") or _prompt_schema(body["messages"])
            if schema is not None and not isinstance(schema, dict):
                raise _BadRequest("'response_format.schema' must be an object")
            return schema or _ANY_OBJECT, False
        case "text":
            return _prompt_schema(body["messages"]), True
        case other:
            raise _BadRequest(f"unsupported response_format type {other!r}")


def _prompt_schema(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    match = _SCHEMA_MARKERS.search(_last_user_text(messages))
    if match is None:
        return None
    try:
        schema = orjson.loads(match.group(1))
    except orjson.JSONDecodeError:
        # A real model would shrug and answer in prose; so does the simulator.
        logger.warning("the <schema> block in the prompt is not valid JSON")
        return None
    return schema if isinstance(schema, dict) else None


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _lorem(seed: str) -> str:
    rng = random.Random(digest(seed))
    return " ".join(sentence(rng, max_length=None) for _ in range(rng.randint(2, 4)))


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _latency(config: SimulatorConfig, rng: random.Random) -> float:
    """Lognormal seconds with mean ``latency_mean_s``; fixed when sigma is 0."""
    if config.latency_mean_s <= 0:
        return 0.0
    if config.latency_sigma <= 0:
        return config.latency_mean_s
    mu = math.log(config.latency_mean_s) - config.latency_sigma**2 / 2
    return rng.lognormvariate(mu, config.latency_sigma)


def _json(payload: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def _error(
    status: int,
    message: str,
    *,
    kind: str,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers=headers,
    )


# --- running it -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningSimulator:
    """A simulator listening on ``base_url`` (ends in ``/v1``)."""

    base_url: str
    port: int
    state: SimulatorState
    app: web.Application


@contextlib.asynccontextmanager
async def running_simulator(
    config: SimulatorConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[RunningSimulator]:
    """Serve the simulator on ``host:port`` (0: a free port) until the block exits; over
    HTTPS with ``ssl_context`` (a server context holding its certificate)."""
    app, state = make_app(config or SimulatorConfig())
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound = runner.addresses[0][1]
        scheme = "http" if ssl_context is None else "https"
        yield RunningSimulator(f"{scheme}://{host}:{bound}/v1", bound, state, app)
    finally:
        await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.testing.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="sim-teacher")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--latency-mean", type=float, default=0.0, help="seconds")
    parser.add_argument("--latency-sigma", type=float, default=0.0)
    parser.add_argument("--rpm-limit", type=int, default=0, help="0: no limit")
    parser.add_argument("--array-items", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reasoning-field", choices=("reasoning_content", "reasoning"))
    parser.add_argument(
        "--reasoning-layout", choices=REASONING_LAYOUTS, help="how a reasoning teacher replies"
    )
    parser.add_argument(
        "--think-tags", nargs=2, default=("<think>", "</think>"), metavar=("OPEN", "CLOSE")
    )
    parser.add_argument("--no-n", action="store_true", help="ignore n, like llama.cpp")
    return parser


async def _serve(config: SimulatorConfig, host: str, port: int) -> None:
    async with running_simulator(config, host=host, port=port) as sim:
        logger.info("simulated teacher %r listening on %s", config.model, sim.base_url)
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: serve until interrupted."""
    args = _parser().parse_args(argv)
    config = SimulatorConfig(
        model=args.model,
        api_key=args.api_key,
        latency_mean_s=args.latency_mean,
        latency_sigma=args.latency_sigma,
        seed=args.seed,
        array_items=args.array_items,
        reasoning_field=args.reasoning_field,
        reasoning_layout=args.reasoning_layout,
        think_tags=tuple(args.think_tags),
        supports_n=not args.no_n,
        rpm_limit=args.rpm_limit,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
