"""``python -m engine plan``: the requests and tokens a run would send, and how long it would
take at the configured limits. Sends nothing.

The counting lives in the flows (``Flow.plan``), next to the code that sends the requests;
this module streams the seeds through it, adds up per stage and prints a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from engine.config import Config, LimitsConfig
from engine.embedded.resolve import resolve_offline
from engine.errors import ConfigError
from engine.flows import Flow, build_flows
from engine.flows.planning import StagePlan
from engine.output.checkpoint import Checkpoint, DoneUnits, read_checkpoint
from engine.pipeline.resume import ResumePoint, resume_point
from engine.seeds import Reject, SeedRow, seed_file_problem
from engine.teacher.protocol import ChatReply, ChatRequest

DEFAULT_LATENCY_S = 5.0


class _Offline:
    """The teacher of a plan: flows are built with it, but it never sends anything."""

    model = "plan"

    async def complete(self, request: ChatRequest) -> ChatReply:
        raise RuntimeError("a plan sends no requests")

    def forget(self, request: ChatRequest) -> None:
        """Nothing is cached, so nothing to forget."""


@dataclass
class Plan:
    """Totals per type and stage over the seeds, and what was left out."""

    rows: int = 0
    rejects: int = 0
    done: int = 0  # (document, type) units already in the output directory: skipped
    stages: dict[str, dict[str, StagePlan]] = field(default_factory=dict)

    def add(self, gen_type: str, parts: list[StagePlan]) -> None:
        """Add one unit's plan (``Flow.plan``) to the type's stage totals."""
        stages = self.stages.setdefault(gen_type, {})
        for part in parts:
            known = stages.get(part.stage)
            stages[part.stage] = part if known is None else known + part

    def type_total(self, gen_type: str) -> StagePlan:
        """All the stages of ``gen_type`` added up, named ``"<type> (all)"``."""
        return _sum(f"{gen_type} (all)", self.stages.get(gen_type, {}).values())

    def total(self) -> StagePlan:
        """Every type added up, named ``"total"``."""
        return _sum("total", (self.type_total(t) for t in self.stages))


def _sum(name: str, parts: Iterable[StagePlan]) -> StagePlan:
    total = StagePlan(name, 0, 0, 0, 0)
    for part in parts:
        total += part
    return dataclasses.replace(total, assumes="")


def as_run(config: Config) -> tuple[Config, str]:
    """The config a run would use (``resolve_offline``), and a note when it is not ``config``
    itself: with no endpoint, the embedded demo teacher at its scaled-down settings."""
    resolved = resolve_offline(config)
    note = (
        f"no teacher endpoint: planned for the embedded demo teacher, with the "
        f"{len(resolved.changes)} settings it scales down (a run logs each of them)"
    )
    return resolved.config, note if resolved.embedded else ""


def make_plan(config: Config, *, fresh: bool = False) -> Plan:
    """Stream the seeds through each flow's ``plan``; skip units already done unless ``fresh``.

    Raises ``ConfigError`` when the seed file is missing.
    """
    seeds = config.input.seeds
    if problem := seed_file_problem(seeds, config.input.max_document_chars):
        raise ConfigError([problem])
    checkpoint = Checkpoint() if fresh else read_checkpoint(config.output.dir)
    with contextlib.closing(checkpoint):
        flows = build_flows(config, _Offline())
        resume = resume_point(
            seeds, config.input.max_document_chars, list(flows), checkpoint, config.output.dir
        )
        return _count(flows, checkpoint.done, resume)


def _count(flows: Mapping[str, Flow], done: DoneUnits, resume: ResumePoint) -> Plan:
    """Rows before the resume point are done, all their units: counted, not read."""
    mark = resume.mark
    plan = Plan(mark.rows, mark.rejects, mark.rows * len(flows), {t: {} for t in flows})
    for item in resume.seeds_after():
        if isinstance(item, Reject):
            plan.rejects += 1
            continue
        plan.rows += 1
        for gen_type, flow in flows.items():
            if (item.doc_id, gen_type) in done:
                plan.done += 1
            else:
                plan.add(gen_type, flow.plan(item))
    return plan


def stage_prompts(config: Config) -> dict[str, int]:
    """Per stage, the estimated prompt tokens of one request for an empty document: the
    stage's own instructions, the least any of its requests sends
    (``engine.pipeline.preflight``)."""
    empty = SeedRow("", 0, "", "", "", "", "", "", "")
    prompts: dict[str, int] = {}
    for flow in build_flows(config, _Offline()).values():
        for part in flow.plan(empty):
            if part.requests:
                prompts[part.stage] = part.prompt_tokens // part.requests
    return prompts


@dataclass(frozen=True, slots=True)
class Pace:
    """Requests per minute that each limit allows; a run goes at the lowest of them."""

    requests_per_minute: float
    concurrency: float  # max_concurrency requests in flight, each taking the latency
    tokens: float | None  # tokens_per_minute over the tokens of a mean request; None: off

    @classmethod
    def of(cls, limits: LimitsConfig, latency_s: float, total: StagePlan) -> Pace:
        """The pace ``limits`` allow for requests like ``total``'s, each taking
        ``latency_s`` seconds."""
        tokens = None
        if limits.tokens_per_minute and total.requests:
            per_request = (total.prompt_tokens + total.completion_tokens) / total.requests
            tokens = limits.tokens_per_minute / per_request
        return cls(
            requests_per_minute=float(limits.requests_per_minute),
            concurrency=limits.max_concurrency / latency_s * 60,
            tokens=tokens,
        )

    @property
    def bounds(self) -> dict[str, float]:
        """Requests per minute by the config key of the limit that allows them."""
        found = {
            "limits.requests_per_minute": self.requests_per_minute,
            "limits.max_concurrency": self.concurrency,
        }
        if self.tokens is not None:
            found["limits.tokens_per_minute"] = self.tokens
        return found

    @property
    def rate(self) -> float:
        """Requests per minute."""
        return min(self.bounds.values())

    @property
    def binding(self) -> str:
        """The limit that sets the rate."""
        return min(self.bounds.items(), key=lambda item: item[1])[0]

    def seconds(self, requests: int) -> float:
        """How long ``requests`` requests take at ``rate``, in seconds."""
        return requests / self.rate * 60


WIDTH = 96
HEADER = ("stage", "requests", "choices", "prompt tokens", "completion tokens*", "assumes")
ASSUMPTIONS = (
    "Counts are before retries and re-asks (failed, invalid, repeated or missing replies), "
    "and no reply is taken from the response cache.",
    'Where a count depends on replies ("assumes"), the teacher returns as many items as it '
    "is asked for (facts, questions, pairs).",
    "* Completion tokens are an upper bound: max_tokens for every choice.",
    "Prompt tokens are estimated from the prompts the run would send (4 characters per "
    "token, a non-ASCII character as one, plus 4 per message). A prompt that quotes an "
    "earlier reply (summary, question, fact, answer) assumes that reply filled its "
    "max_tokens, shared evenly by a list's items, none longer than its chunk: an upper "
    "bound as well.",
    "Duration: every request takes the latency whatever its n; the token limit is applied "
    "to the upper bound of tokens per request.",
)


def format_plan(plan: Plan, config: Config, latency_s: float) -> str:
    """The plan as text: what was read, a table per type and stage, duration, assumptions."""
    parts = [_inputs(plan, config), _table(plan)]
    total = plan.total()
    if total.requests:
        parts.append(_duration(Pace.of(config.limits, latency_s, total), latency_s, total))
    parts.append("Assumptions:\n" + "\n".join(map(_bullet, ASSUMPTIONS)))
    return "\n\n".join(parts)


def _bullet(text: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent="  - ", subsequent_indent="    ")


def _inputs(plan: Plan, config: Config) -> str:
    teacher = config.teacher
    samples = (
        "N samples are one request with n=N"
        if teacher.supports_n
        else "N samples are N requests with n=1"
    )
    judge = "on: one request per answer" if config.generation.judge else "off"
    return "\n".join(
        (
            "Plan (nothing is sent)",
            f"seeds:   {config.input.seeds}: {plan.rows} valid rows, {plan.rejects} rejected "
            "(python -m engine validate lists them)",
            f"resume:  {plan.done} units already done in {config.output.dir} are skipped "
            "(plan --fresh counts them)",
            f"teacher: supports_n = {str(teacher.supports_n).lower()} ({samples}); judge {judge}",
        )
    )


def _table(plan: Plan) -> str:
    rows: list[tuple[str, ...]] = [HEADER]
    for gen_type, stages in plan.stages.items():
        rows.extend(_row(stage) for stage in stages.values())
        rows.extend((_row(plan.type_total(gen_type)), ()))
    rows.append(_row(plan.total()))
    widths = [max(len(row[i]) for row in rows if row) for i in range(len(HEADER))]
    lines = []
    for row in rows:
        if not row:
            lines.append("")
            continue
        cells = [
            cell.ljust(width) if i in (0, len(HEADER) - 1) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _row(stage: StagePlan) -> tuple[str, ...]:
    numbers = (stage.requests, stage.choices, stage.prompt_tokens, stage.completion_tokens)
    return (stage.stage, *(f"{number:,}" for number in numbers), stage.assumes)


def _duration(pace: Pace, latency_s: float, total: StagePlan) -> str:
    tokens = "off" if pace.tokens is None else f"{pace.tokens:,.0f} requests/min"
    lines = [
        f"Duration at {latency_s:g} s mean latency per request:",
        f"  limits.requests_per_minute  {pace.requests_per_minute:,.0f} requests/min",
        f"  limits.max_concurrency      {pace.concurrency:,.0f} requests/min "
        f"(requests in flight / latency)",
        f"  limits.tokens_per_minute    {tokens}",
        f"  => {pace.rate:,.0f} requests/min, set by {pace.binding}: {total.requests:,} "
        f"requests take about {_clock(pace.seconds(total.requests))}",
    ]
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    """``"2 d 03 h"``, ``"5 h 07 min"``, ``"6 min 51 s"`` or ``"12 s"``."""
    whole = math.ceil(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours:02d} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"
