"""Check the teacher before the corpus: a handful of tiny requests, and one line per problem.

A fault that every request hits (a base URL without ``/v1``, a model the server does not
serve, a ``max_tokens`` over the context, a request feature the server refuses, a redirect)
would otherwise cost the whole night. Before the first seed row is dispatched, ``preflight``
asks each endpoint for ``/models`` and a one-word chat reply, then tries each request feature
the run uses (``n``, the ``structured_output`` mode, the ``max_tokens`` field, the
``temperature``) once, in the run's own request shape, and the context length.

What the server refuses is either adapted to, for the whole run and said once (``n`` asked as
single requests, ``max_completion_tokens`` instead of ``max_tokens``, no ``temperature``),
or stops the run with what to change (``PreflightFailed``, ``Redirected``, ``AuthError``): a
different ``structured_output`` mode would change the records' settings, so it is named, not
chosen. The decisions are pure functions below; ``Preflight`` does the asking.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from engine.config import Config
from engine.errors import AuthError, PreflightFailed
from engine.flows import StageSettings, stage_settings, structured
from engine.flows.structured import Mode, Summary
from engine.pipeline.stats import Stats
from engine.plan import stage_prompts
from engine.teacher.protocol import ChatRequest, Message, Wire
from engine.teacher.retry import backoff, retry_after
from engine.teacher.wire import ProbeReply, redirected

log = logging.getLogger(__name__)

PROBE_PROMPT = "This is a connection check. Reply with the single word OK."
PROBE_MAX_TOKENS = 16
# A probe that meets a busy server (429, 503...) is asked again this often, then given up:
# the run's own retries and breaker take it from there.
PROBE_ATTEMPTS = 3
PROBE_WAIT_MAX_S = 30.0
MODELS_SHOWN = 10
_TRANSIENT = frozenset({408, 409, 429, 502, 503, 504})
# Keys servers use for the context length in /models: vLLM, then others.
_CONTEXT_KEYS = ("max_model_len", "context_length", "max_context_length", "context_window")
_CONTEXT_IN_ERROR = re.compile(r"maximum context length is (\d+)", re.IGNORECASE)
_CONTEXT_ERROR = re.compile(
    r"maximum context length|context[_ ]length|context window|max_model_len|too many tokens",
    re.IGNORECASE,
)
_COMPLETION_FIELD = re.compile(r"max_completion_tokens", re.IGNORECASE)
_MODEL_MISSING = re.compile(
    r"model.{0,80}(?:not found|does not exist|not exist|unknown|not served)", re.IGNORECASE
)
MODES: tuple[Mode, ...] = ("json_schema", "json_object", "text")

Verdict = Literal["ok", "not_chat", "transient", "refused", "unreachable", "redirect", "auth"]


async def check(config: Config, client: Prober, stats: Stats) -> tuple[Config, Findings]:
    """Run the preflight for ``config`` through ``client``; return the config the run should
    use (``supports_n`` off when the server refuses ``n``) and the findings. The client's
    ``wire`` is the caller's to set from ``findings.wire``. Raises as ``Preflight.run``."""
    teacher = config.teacher
    plan = Plan(
        urls=teacher.urls,
        model=teacher.model,
        mode=teacher.structured_output,
        supports_n=teacher.supports_n,
        stages=stage_settings(config),
        prompts=stage_prompts(config),
    )
    stats.preflight_ran = True
    findings = await Preflight(client, plan, backoff_base_s=config.retry.backoff_base_s).run()
    stats.adapted = list(findings.adapted)
    if not findings.supports_n and teacher.supports_n:
        config = config.model_copy(
            update={"teacher": teacher.model_copy(update={"supports_n": False})}
        )
    # What was adapted or noted is logged as it is found; this says the rest.
    changes = len(findings.adapted) + len(findings.notes)
    log.info(
        "preflight: the teacher answers (%d requests): %s",
        stats.teacher.preflight_requests,
        "; ".join([*findings.summary()[:1], f"{changes} finding(s) above"])
        if changes
        else "; ".join(findings.summary()),
    )
    return config, findings


# --- pure decisions ---------------------------------------------------------------------


def verdict(reply: ProbeReply) -> Verdict:
    """What a probe's answer means: a chat completion (``ok``), a 200 that is not one, a
    transient failure worth asking again, a refusal, no answer, a redirect, bad credentials."""
    status = reply.status
    if status is None:
        return "unreachable"
    if 200 <= status < 300:
        body = reply.json()
        choices = body.get("choices") if isinstance(body, dict) else None
        return "ok" if isinstance(choices, list) and choices else "not_chat"
    if 300 <= status < 400:
        return "redirect"
    if status in (401, 403):
        return "auth"
    return "transient" if status in _TRANSIENT else "refused"


def served_models(body: Any) -> list[str] | None:
    """The model ids a ``/models`` answer lists, or None when it is not such a list."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return [
        item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)
    ]


def context_length(body: Any, model: str) -> int | None:
    """The context length ``/models`` reports for ``model`` (vLLM: ``max_model_len``)."""
    data = body.get("data") if isinstance(body, dict) else None
    for item in data if isinstance(data, list) else ():
        if isinstance(item, dict) and item.get("id") == model:
            for key in _CONTEXT_KEYS:
                value = item.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def url_alternatives(url: str) -> list[str]:
    """Base URLs a user probably meant when ``url`` answers 404: with ``/v1``, or without a
    pasted ``/chat/completions``."""
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            return [url.removesuffix(suffix)]
    return [] if url.endswith("/v1") else [url + "/v1"]


def first_choices(reply: ProbeReply) -> int:
    """How many choices a probe's chat completion held (0 when it is not one)."""
    body = reply.json()
    choices = body.get("choices") if isinstance(body, dict) else None
    return len(choices) if isinstance(choices, list) else 0


def list_models(models: Sequence[str]) -> str:
    """``models`` for a message: the first ``MODELS_SHOWN``, and how many more."""
    shown = ", ".join(models[:MODELS_SHOWN])
    more = len(models) - MODELS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "") if models else "(none)"


def unfit_stages(
    stages: Mapping[str, StageSettings], prompts: Mapping[str, int], context: int
) -> list[str]:
    """The keys whose ``max_tokens`` cannot fit ``context`` even with the stage's shortest
    prompt (``prompts``: estimated tokens of each stage's instructions, with no document)."""
    unfit: dict[str, str] = {}
    for stage, settings in stages.items():
        prompt = prompts.get(stage, 0)
        if settings.max_tokens + prompt > context and settings.max_tokens_key not in unfit:
            unfit[settings.max_tokens_key] = (
                f"{settings.max_tokens_key} = {settings.max_tokens} (its prompt alone is about "
                f"{prompt} tokens)"
            )
    return list(unfit.values())


def context_message(unfit: Sequence[str], context: int, source: str) -> str:
    """The one line saying which ``max_tokens`` keys cannot fit a ``context`` of that many
    tokens (as ``source`` reported it)."""
    return (
        f"the model's context is {context} tokens ({source}), which these max_tokens cannot "
        f"fit with their prompts: {'; '.join(unfit)}: lower them, leaving room for the chunk "
        "(requests are prompt plus max_tokens)"
    )


def probe_temperature(stages: Mapping[str, StageSettings]) -> float:
    """A temperature the run uses, preferring one that is not the usual default of 1 (the one
    value OpenAI's reasoning models accept)."""
    temperatures = [s.temperature for s in stages.values()]
    return next((t for t in temperatures if t != 1.0), temperatures[0] if temperatures else 1.0)


def probe_samples(stages: Mapping[str, StageSettings]) -> int:
    """The largest ``n`` the run asks for."""
    return max((s.samples for s in stages.values()), default=1)


# --- findings ---------------------------------------------------------------------------


@dataclass
class Findings:
    """What the preflight found: how to write requests for this server, and what it saw."""

    wire: Wire = field(default_factory=Wire)
    supports_n: bool = True
    context: int | None = None
    adapted: list[str] = field(default_factory=list)  # changes for the run, in words
    notes: list[str] = field(default_factory=list)  # seen, worth saying, not in the way
    # Replicas that did not answer (base URL -> why), while another did: the run starts with
    # them down, probed one request at a time, instead of spending attempts to find out.
    down: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """What was found, in a few words each (``validate --probe`` prints these)."""
        context = f"context {self.context} tokens" if self.context else "context not reported"
        found = [context, *self.adapted, *self.notes]
        if len(found) == 1:
            found.append("every request feature the run uses is accepted")
        return found

    def adapt(self, change: str) -> None:
        """Record (and log once) a change the run makes to fit the server."""
        log.warning("preflight: %s", change)
        self.adapted.append(change)

    def note(self, text: str) -> None:
        """Record (and log once) something found that changes nothing."""
        log.warning("preflight: %s", text)
        self.notes.append(text)


class Prober(Protocol):
    """What the preflight needs of the client (``engine.teacher.client.HTTPTeacher``)."""

    model: str

    async def probe(self, url: str, payload: Mapping[str, Any] | None = None) -> ProbeReply:
        """One request outside the limiter, the cache and the retries: ``GET url``, or a
        ``POST`` of ``payload``; what the server answered (never raises for it)."""
        ...


@dataclass(frozen=True, slots=True)
class Plan:
    """What the run will ask of the teacher, for the preflight to try."""

    urls: tuple[str, ...]
    model: str
    mode: Mode
    supports_n: bool
    stages: Mapping[str, StageSettings]
    prompts: Mapping[str, int]  # per stage, estimated prompt tokens with no document


class Preflight:
    """Runs the checks against ``client`` (see the module docstring)."""

    def __init__(
        self,
        client: Prober,
        plan: Plan,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff_base_s: float = 0.5,
    ) -> None:
        self.client = client
        self.plan = plan
        self.findings = Findings(supports_n=plan.supports_n)
        self._sleep = sleep
        self._backoff_base_s = backoff_base_s
        self._models: dict[str, list[str] | None] = {}
        self._slow: set[str] = set()  # endpoints that took the connection but did not reply

    async def run(self) -> Findings:
        """Check every endpoint, then the run's request features on the first that answers.

        Raises ``PreflightFailed`` (what to change), ``Redirected`` or ``AuthError``.
        """
        reachable: list[str] = []
        unreachable: dict[str, str] = {}
        for url in self.plan.urls:
            problem = await self._endpoint(url)
            if problem:
                unreachable[url] = problem
            else:
                reachable.append(url)
        if not reachable:
            url, problem = next(iter(unreachable.items()))
            if url in self._slow:
                raise PreflightFailed(
                    f"the teacher at {url} took the connection but did not answer in time "
                    f"({problem}): a server that is still loading its model, or busy, can "
                    "take longer: raise teacher.timeout_s, or check that it is not stuck"
                )
            raise PreflightFailed(
                f"cannot reach the teacher at {url}: {problem}: check TEACHER_MODEL_BASE_URL "
                "(host and port) and that the server is running"
            )
        for url, problem in unreachable.items():
            state = "answers too slowly" if url in self._slow else "does not answer"
            self.findings.note(f"replica {url} {state} ({problem}); the others carry on")
            self.findings.down[url] = state
        await self._features(reachable[0])
        await self._context(reachable[0])
        return self.findings

    # --- one endpoint: /models, then a minimal chat request -----------------------------

    async def _endpoint(self, url: str) -> str:
        """Check ``url``; return why it cannot be reached ("" when it answers)."""
        models = await self.client.probe(url + "/models")
        kind = verdict(models)
        if kind == "unreachable":
            return self._unreachable(url, models)
        self._raise_for(url, url + "/models", models, kind)
        listed = served_models(models.json()) if models.status == 200 else None
        self._models[url] = listed
        if listed is not None and self.findings.context is None:
            self.findings.context = context_length(models.json(), self.plan.model)
        reply = await self._chat(url, self._base())
        kind = verdict(reply)
        if kind == "unreachable":
            return self._unreachable(url, reply)
        if kind == "transient":  # busy, not wrong: the run's retries and outages handle that
            self.findings.note(f"{url} is busy ({_said(reply)}): not checked further")
            return ""
        if kind == "refused" and _COMPLETION_FIELD.search(reply.excerpt):
            wire = replace(self.findings.wire, max_tokens_field="max_completion_tokens")
            again = await self._chat(url, self._base(wire))
            if verdict(again) == "ok":
                self.findings.wire = wire
                self.findings.adapt(
                    "the server refuses max_tokens and asks for max_completion_tokens: sending "
                    "max_completion_tokens for the whole run"
                )
                return ""
        if kind != "ok":
            await self._no_chat(url, reply, kind)
        if listed is not None and self.plan.model not in listed:
            self.findings.note(
                f"{url}/models does not list {self.plan.model!r} ({list_models(listed)}), "
                "but the server answers for it"
            )
        return ""

    def _unreachable(self, url: str, reply: ProbeReply) -> str:
        """Why ``url`` gave no answer; remembers whether a server was there but slow."""
        if reply.timed_out:
            self._slow.add(url)
        return reply.error

    async def _no_chat(self, url: str, reply: ProbeReply, kind: Verdict) -> None:
        """The minimal chat request failed: say why, as precisely as can be found out."""
        self._raise_for(url, url + "/chat/completions", reply, kind)
        listed = self._models.get(url)
        model = self.plan.model
        if (listed is not None and model not in listed) or _MODEL_MISSING.search(reply.excerpt):
            served = "" if listed is None else f"; it serves: {list_models(listed)}"
            raise PreflightFailed(
                f"the teacher at {url} does not serve the model {model!r} (HTTP "
                f"{reply.status}){served}: set TEACHER_MODEL_NAME to one of them"
            )
        if reply.status in (404, 405):
            for other in url_alternatives(url):
                if verdict(await self._chat(other, self._base())) in ("ok", "refused"):
                    should = "end in /v1: use" if other == url + "/v1" else "be"
                    raise PreflightFailed(
                        f"{url}/chat/completions answers HTTP {reply.status} but "
                        f"{other}/chat/completions answers: TEACHER_MODEL_BASE_URL should "
                        f"{should} {other}"
                    )
            raise PreflightFailed(
                f"{url}/chat/completions answers HTTP {reply.status}: TEACHER_MODEL_BASE_URL "
                "must be the server's OpenAI-compatible API base, where /chat/completions is "
                "(e.g. http://host:8000/v1)"
            )
        if kind == "not_chat":
            raise PreflightFailed(
                f"the teacher at {url} answers HTTP {reply.status} with something that is not "
                f"a chat completion ({reply.excerpt[:120]!r}): a gateway's login page or a "
                "proxy? check TEACHER_MODEL_BASE_URL"
            )
        raise PreflightFailed(
            f"the teacher at {url} refuses a minimal chat request with model {model!r}: HTTP "
            f"{reply.status}: {reply.excerpt}"
        )

    def _raise_for(self, base: str, url: str, reply: ProbeReply, kind: Verdict) -> None:
        if kind == "redirect" and reply.status is not None:
            raise redirected(base, url, reply.status, reply.headers)
        if kind == "auth" and reply.status is not None:
            raise AuthError(base, reply.status)

    # --- the run's request features -----------------------------------------------------

    async def _features(self, url: str) -> None:
        """The run's own request shape first; feature by feature only if it is refused."""
        plan, findings = self.plan, self.findings
        samples = probe_samples(plan.stages) if plan.supports_n else 1
        temperature = probe_temperature(plan.stages)
        full = await self._chat(url, self._request(samples, temperature, plan.mode))
        kind = verdict(full)
        if kind == "ok":
            if samples > 1 and first_choices(full) < samples:
                self._single_requests(f"it answered {first_choices(full)} of n={samples} choices")
            return
        if kind != "refused":
            findings.note(f"could not check the request features ({_said(full)}): going on")
            return
        # One feature at a time, each added to a request known to pass.
        await self._temperature(url, temperature)
        if samples > 1:
            await self._n(url, samples, temperature)
        if plan.mode != "text":
            await self._mode(url, temperature)
        # Each feature passed alone (or is adapted to): the whole shape once more.
        samples = samples if findings.supports_n else 1
        again = await self._chat(url, self._request(samples, temperature, plan.mode))
        if verdict(again) == "refused":
            raise PreflightFailed(
                f"the teacher at {url} refuses requests shaped like the run's (n={samples}, "
                f"structured_output {plan.mode}) though it takes each feature alone: "
                f"{_said(again)}"
            )

    async def _temperature(self, url: str, temperature: float) -> None:
        reply = await self._chat(url, self._request(1, temperature, "text"))
        if verdict(reply) == "refused":
            self.findings.wire = replace(self.findings.wire, temperature=False)
            self.findings.adapt(
                f"the server refuses temperature={temperature} ({_said(reply)}): leaving "
                "temperature out for the whole run (the server's default applies)"
            )

    async def _n(self, url: str, samples: int, temperature: float) -> None:
        reply = await self._chat(url, self._request(samples, temperature, "text"))
        if verdict(reply) == "refused":
            self._single_requests(f"it refuses n={samples}: {_said(reply)}")
        elif verdict(reply) == "ok" and first_choices(reply) < samples:
            self._single_requests(f"it answered {first_choices(reply)} of n={samples} choices")

    def _single_requests(self, why: str) -> None:
        self.findings.supports_n = False
        self.findings.adapt(
            f"the server does not take n > 1 ({why}): asking for each sample as its own "
            "request for the whole run"
        )

    async def _mode(self, url: str, temperature: float) -> None:
        mode = self.plan.mode
        reply = await self._chat(url, self._request(1, temperature, mode))
        if verdict(reply) != "refused":
            return
        for other in MODES:
            if other != mode and other != "text":
                accepted = await self._chat(url, self._request(1, temperature, other))
                if verdict(accepted) == "ok":
                    break
        else:
            other = "text"
        raise PreflightFailed(
            f'the server refuses teacher.structured_output = "{mode}" ({_said(reply)}): set '
            f'it to "{other}", which it accepts (--set \'teacher.structured_output="{other}"\')'
        )

    # --- the context length -------------------------------------------------------------

    async def _context(self, url: str) -> None:
        plan, findings = self.plan, self.findings
        if findings.context is not None:
            unfit = unfit_stages(plan.stages, plan.prompts, findings.context)
            if unfit:
                raise PreflightFailed(context_message(unfit, findings.context, f"{url}/models"))
            return
        largest = max((s.max_tokens for s in plan.stages.values()), default=0)
        if not largest:
            return
        reply = await self._chat(url, self._base(max_tokens=largest))
        said = reply.excerpt
        if verdict(reply) != "refused" or not _CONTEXT_ERROR.search(said):
            return
        match = _CONTEXT_IN_ERROR.search(said)
        context = int(match.group(1)) if match else largest
        unfit = unfit_stages(plan.stages, plan.prompts, context) or [
            f"{s.max_tokens_key} = {s.max_tokens}"
            for s in plan.stages.values()
            if s.max_tokens == largest
        ]
        source = f"the server said: {said.split('. ')[0][:120]!r}"
        raise PreflightFailed(context_message(unfit, context, source))

    # --- requests -----------------------------------------------------------------------

    def _base(self, wire: Wire | None = None, max_tokens: int = PROBE_MAX_TOKENS) -> dict[str, Any]:
        """The smallest chat request: no n, no response_format, no temperature."""
        wire = replace(wire or self.findings.wire, temperature=False)
        request = ChatRequest((Message("user", PROBE_PROMPT),), max_tokens=max_tokens)
        return request.payload(self.client.model, wire)

    def _request(self, n: int, temperature: float, mode: Mode) -> dict[str, Any]:
        """A tiny request in the run's shape: ``n`` samples, ``temperature``, ``mode``."""
        request = ChatRequest(
            (Message("user", PROBE_PROMPT),),
            temperature=temperature,
            max_tokens=PROBE_MAX_TOKENS,
            n=n,
            response_format=structured.response_format(Summary, mode),
        )
        return request.payload(self.client.model, self.findings.wire)

    async def _chat(self, url: str, payload: Mapping[str, Any]) -> ProbeReply:
        """POST ``payload`` to ``url``'s chat path. A busy server (429, 503...) or a 500 is
        asked again a few times: a 500 that stays is a refusal (llama.cpp's way), one that
        passes was a hiccup."""
        attempt = 0
        while True:
            reply = await self.client.probe(url + "/chat/completions", payload)
            attempt += 1
            again = verdict(reply) == "transient" or (reply.status or 0) >= 500
            if not again or attempt == PROBE_ATTEMPTS:
                return reply
            wait = backoff(
                attempt,
                retry_after(reply.headers),
                base=self._backoff_base_s,
                cap=PROBE_WAIT_MAX_S,
                retry_after_cap=PROBE_WAIT_MAX_S,
                rng=_half,
            )
            log.info("preflight: %s answered HTTP %s; asking again", url, reply.status)
            await self._sleep(wait)


def _half() -> float:
    return 0.5


def _said(reply: ProbeReply) -> str:
    if reply.status is None:
        return reply.error
    return f"HTTP {reply.status}: {reply.excerpt[:160]}"
