"""Known causes of faults that hit every request, and what to change for each.

A small table, first match wins, read by the breaker (``engine.pipeline.breaker``) when it stops a
run: given how items were lost (stage, HTTP status or reply check) and the server's words, the
likely fix, naming the exact config key where there is one. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine.flows import StageSettings
from engine.flows.quality import CODES as CONTENT_CHECKS
from engine.pipeline.breaker import Signature

PROBE_HINT = "`python -m engine validate --probe CONFIG` checks the teacher"

_CONTEXT = re.compile(
    r"maximum context length|context[_ ]length|context window|max_model_len|too many tokens|"
    r"exceeds? the (?:model's )?context|prompt is too long",
    re.IGNORECASE,
)
_COMPLETION_FIELD = re.compile(r"max_completion_tokens", re.IGNORECASE)
_TEMPERATURE = re.compile(r"\btemperature\b", re.IGNORECASE)
_FORMAT = re.compile(
    r"response_format|json_schema|json_object|guided|grammar|structured output", re.IGNORECASE
)
_N = re.compile(
    r"['\"`]n['\"`]|\bn\s*(?:>|>=|=|!=|must|should|is not|not supported|greater)|"
    r"\bn=\d|more than one (?:choice|completion)|multiple (?:choices|completions)",
    re.IGNORECASE,
)
_MODEL_MISSING = re.compile(
    r"model.{0,80}(?:not found|does not exist|not exist|unknown|not served|no such)|"
    r"(?:unknown|invalid) model",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class RunSettings:
    """What the fixes need to know of the run: each stage's keys and the teacher's features."""

    stages: Mapping[str, StageSettings] = field(default_factory=dict)
    structured_output: str = "json_schema"
    supports_n: bool = True
    model: str = ""
    base_urls: tuple[str, ...] = ()


Rule = Callable[[Signature, str, RunSettings], str]


def likely_fix(signature: Signature, said: str, run: RunSettings) -> str:
    """What to change when items of ``signature.stage`` keep being lost this way; ``said`` is
    the server's answer (or the error message). Never empty."""
    for rule in _RULES:
        if fix := rule(signature, said, run):
            return fix
    return f"see {signature.stage} in failures.jsonl for the server's answers; {PROBE_HINT}"


def _max_tokens(signature: Signature, run: RunSettings) -> str:
    stage = run.stages.get(signature.stage)
    if stage is None:
        return "the stage's max_tokens"
    return f"{stage.max_tokens_key} (now {stage.max_tokens})"


def _context(signature: Signature, said: str, run: RunSettings) -> str:
    if not _CONTEXT.search(said):
        return ""
    stage = run.stages.get(signature.stage)
    also = (
        sorted(
            {
                s.max_tokens_key
                for s in run.stages.values()
                if s.max_tokens >= stage.max_tokens and s.max_tokens_key != stage.max_tokens_key
            }
        )
        if stage
        else []
    )
    as_large = f" (and as large: {', '.join(also)})" if also else ""
    return (
        f"the prompt plus max_tokens does not fit the model's context: lower "
        f"{_max_tokens(signature, run)}{as_large}, or input.max_document_chars if the chunks "
        "are long"
    )


def _completion_field(signature: Signature, said: str, run: RunSettings) -> str:
    if signature.status is None or not _COMPLETION_FIELD.search(said):
        return ""
    return (
        "the server wants max_completion_tokens instead of max_tokens (OpenAI's reasoning "
        "models): run without --no-preflight, which finds this and switches the field"
    )


def _temperature(signature: Signature, said: str, run: RunSettings) -> str:
    if signature.status is None or not _TEMPERATURE.search(said):
        return ""
    stage = run.stages.get(signature.stage)
    key = stage.temperature_key if stage else "the stage's temperature"
    return (
        f"the server refuses this temperature: run without --no-preflight (it leaves "
        f"temperature out for such a server), or set {key} to 1"
    )


def _structured(signature: Signature, said: str, run: RunSettings) -> str:
    if signature.status is None or not _FORMAT.search(said):
        return ""
    others = [m for m in ("json_schema", "json_object", "text") if m != run.structured_output]
    return (
        f'the server refuses teacher.structured_output = "{run.structured_output}": set it '
        f'to "{others[0]}" (llama.cpp takes json_object) or "{others[1]}"; {PROBE_HINT} '
        "and names the mode that works"
    )


def _n(signature: Signature, said: str, run: RunSettings) -> str:
    stage = run.stages.get(signature.stage)
    asks_n = run.supports_n and (stage is None or stage.samples > 1)
    if signature.status is None or not asks_n or not _N.search(said):
        return ""
    return (
        "the server refuses n > 1 (several samples in one request): set "
        "teacher.supports_n = false, or run without --no-preflight, which finds this"
    )


def _by_status(signature: Signature, said: str, run: RunSettings) -> str:
    status = signature.status
    if status == 404 and _MODEL_MISSING.search(said):
        return (
            f"the server does not serve TEACHER_MODEL_NAME = {run.model!r}: {PROBE_HINT} and "
            "lists the models it serves"
        )
    fixes = {
        404: _not_found(run),
        405: (
            "check TEACHER_MODEL_BASE_URL: the server does not take a POST there (not the API "
            f"base, or a proxy that redirects); {PROBE_HINT}"
        ),
        413: (
            "the requests are too large for the server or a proxy in front of it: lower "
            "input.max_document_chars, or raise the server's request size limit"
        ),
        200: (
            "the server answers 200 with something that is not a chat completion (an HTML "
            "login page of a gateway or proxy?): check TEACHER_MODEL_BASE_URL and the proxy"
        ),
    }
    if status in fixes:
        return fixes[status]
    if status is not None and status >= 500:
        return (
            f"the server fails these requests with HTTP {status}: its log says why (llama.cpp "
            f"reports a request it cannot serve as 500); {PROBE_HINT}"
        )
    if status is not None:
        return f"the server refuses these requests (HTTP {status}): {PROBE_HINT}"
    return ""


def _not_found(run: RunSettings) -> str:
    without = [url for url in run.base_urls if not url.endswith("/v1")]
    if without:
        return (
            f"TEACHER_MODEL_BASE_URL should probably end in /v1: try {without[0]}/v1; "
            f"{PROBE_HINT} and finds the URL that answers"
        )
    return (
        "check TEACHER_MODEL_BASE_URL: it must be the API base, where /chat/completions is "
        f"(e.g. http://host:8000/v1); {PROBE_HINT} and finds the URL that answers"
    )


def _by_check(signature: Signature, said: str, run: RunSettings) -> str:
    stage = run.stages.get(signature.stage)
    temperature = stage.temperature_key if stage else "the stage's temperature"
    fixes = {
        "cut_off": f"replies are cut off at max_tokens: raise {_max_tokens(signature, run)}",
        "no_json": (
            'the model does not answer with JSON: use teacher.structured_output = "json_schema"'
            ' (guided decoding: vLLM, OpenAI) or "json_object" (llama.cpp); a reasoning model '
            "needs the server's reasoning parser on"
        ),
        "schema": (
            "the replies do not match the stage's JSON schema: use teacher.structured_output = "
            '"json_schema" (guided decoding), or a stronger model'
        ),
        "no_choices": "the server answers without choices: check the server and any proxy",
        "duplicate": f"the model repeats the same sample: raise {temperature}",
        "timeout": (
            "the requests time out: raise teacher.timeout_s above the longest reply, or lower "
            f"{_max_tokens(signature, run)}"
        ),
        "connection": "connections fail: check the network path and the server",
        "malformed_response": "the server's answers are not chat completions: check the URL",
    }
    if signature.check in fixes:
        return fixes[signature.check]
    if signature.check in CONTENT_CHECKS:
        return (
            "the teacher's replies are junk by the quality gates (a weak or base model, or a "
            "chat format that does not fit it): use a capable instruction-tuned teacher; the "
            "[quality] keys set the gates' thresholds (README: Quality gates), and "
            "retry.breaker_reject_share how much junk stops a run"
        )
    if signature.check:
        return f"the replies keep failing the {signature.check!r} check: see failures.jsonl"
    return ""


_RULES: tuple[Rule, ...] = (
    _context,
    _completion_field,
    _temperature,
    _structured,
    _n,
    _by_status,
    _by_check,
)
