"""The generation types: the ``Flow`` interface each implements, and the registry (``FLOWS``)
from a type name to how its flow is built and which config keys set each of its stages.
``build_flows`` makes the flows a config asks for; ``stage_settings`` names every stage's keys,
for messages that say what to change.

A new type is one flow module and one entry here (and its name and section in
``engine.config``); nothing else in the flows branches on type names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Protocol

from engine.budget import PassBudget
from engine.config import Config, GenerationConfig, GenType
from engine.flows.admission import Admission
from engine.flows.ask import Asker, Tally
from engine.flows.document_qa import DocumentQAFlow
from engine.flows.key_facts import KeyFactsFlow
from engine.flows.planning import StagePlan
from engine.flows.summary import SummaryFlow
from engine.flows.unit import FlowContext, Judge, stage_name
from engine.output.records import UnitResult
from engine.pipeline.breaker import Breaker
from engine.seeds import SeedRow
from engine.teacher.protocol import Teacher


class Flow(Protocol):
    """A generation type: turns one seed row into records through its stages."""

    gen_type: str

    async def run(self, seed: SeedRow) -> UnitResult:
        """Generate the unit (``seed``, ``gen_type``) to its end: its records and lost items.

        Raises ``FatalRunError`` (the run must stop) and is cancellable; an ``ItemError``
        never escapes (it becomes a ``Failure`` of the result).
        """
        ...

    def plan(self, seed: SeedRow) -> list[StagePlan]:
        """The requests ``run(seed)`` sends per stage, before retries and re-asks, assuming
        the teacher returns as many items (facts, questions, pairs) as it is asked for."""
        ...


# Makes a type's flow from the generation settings and what every flow shares.
FlowFactory = Callable[[GenerationConfig, FlowContext], Flow]
# Which keys of a type's config section set a stage's requests: "" for max_tokens and
# temperature, "qa_" for qa_max_tokens and qa_temperature.
Knobs = Literal["", "qa_"]
FIRST: Knobs = ""
QA: Knobs = "qa_"


@dataclass(frozen=True, slots=True)
class FlowType:
    """One generation type in the registry."""

    build: FlowFactory
    # The type's stages (short names, as in "key_facts_to_qa/qa"), in the order they run,
    # with the keys that set each; the judge, when on, comes after them.
    stages: Mapping[str, Knobs]
    # The key of the type's section that sets how many samples (n) one request of its first
    # stage asks for when the server supports n; "" when every request asks for one.
    samples_key: str = ""


_SUMMARY_STAGES: Mapping[str, Knobs] = {"summary": FIRST, "questions": QA, "answer": QA}

FLOWS: Mapping[GenType, FlowType] = MappingProxyType(
    {
        "extractive_summary": FlowType(
            lambda gen, ctx: SummaryFlow(
                "extractive_summary", "extractive", gen.extractive_summary, ctx
            ),
            _SUMMARY_STAGES,
            samples_key="summaries",
        ),
        "detailed_summary": FlowType(
            lambda gen, ctx: SummaryFlow("detailed_summary", "detailed", gen.detailed_summary, ctx),
            _SUMMARY_STAGES,
            samples_key="summaries",
        ),
        "key_facts_to_qa": FlowType(
            lambda gen, ctx: KeyFactsFlow(gen.key_facts_to_qa, ctx),
            {"key_facts": FIRST, "qa": QA},
        ),
        "document_based_qa": FlowType(
            lambda gen, ctx: DocumentQAFlow(gen.document_based_qa, ctx),
            {"questions": FIRST, "answer": QA},
        ),
    }
)


def build_flows(
    config: Config,
    teacher: Teacher,
    *,
    tally: Tally | None = None,
    breaker: Breaker | None = None,
    admission: Admission | None = None,
    budget: PassBudget | None = None,
) -> dict[str, Flow]:
    """One flow per type in ``config.generation.types``, keyed by type name, in that order.

    ``tally(stage, check)`` counts every reply choice: ``check`` "" when it was accepted,
    else the code of the check that rejected it (``Stats.count_reply``). ``breaker``
    (``engine.pipeline.breaker``) is told of every item won and lost. ``admission``: the
    run's cap on branches running at once (``engine.flows.admission``); by default one for
    ``limits.max_concurrency``. ``budget``: the event loop's time per pass for the flows'
    steps (``engine.budget``), shared with the writer; by default the flows' own.
    """
    gen = config.generation
    asker = Asker(
        teacher,
        mode=config.teacher.structured_output,
        attempts=config.retry.invalid_reply_attempts,
        supports_n=config.teacher.supports_n,
        quality=config.quality,
        tally=tally,
        breaker=breaker,
        budget=budget or PassBudget(),
    )
    judge = Judge(gen.judge_temperature, gen.judge_max_tokens) if gen.judge else None
    if admission is None:
        admission = Admission.for_concurrency(config.limits.max_concurrency)
    ctx = FlowContext(asker, judge, admission)
    return {gen_type: FLOWS[gen_type].build(gen, ctx) for gen_type in gen.types}


@dataclass(frozen=True, slots=True)
class StageSettings:
    """The config keys behind one stage's requests, for messages that say what to change."""

    max_tokens_key: str  # e.g. "generation.extractive_summary.qa_max_tokens"
    max_tokens: int
    temperature_key: str
    temperature: float
    samples: int  # choices one request of the stage asks for (n), at most


def stage_settings(config: Config) -> dict[str, StageSettings]:
    """Every stage the config's types run (full names, e.g. "key_facts_to_qa/qa"), in the
    order they run, with the keys that set its ``max_tokens`` and temperature."""
    gen = config.generation
    found: dict[str, StageSettings] = {}
    for gen_type in gen.types:
        flow_type = FLOWS[gen_type]
        section = getattr(gen, gen_type)
        prefix = f"generation.{gen_type}"
        for i, (name, knobs) in enumerate(flow_type.stages.items()):
            samples = 1
            if i == 0 and flow_type.samples_key and config.teacher.supports_n:
                samples = getattr(section, flow_type.samples_key)
            found[stage_name(gen_type, name)] = StageSettings(
                f"{prefix}.{knobs}max_tokens",
                getattr(section, f"{knobs}max_tokens"),
                f"{prefix}.{knobs}temperature",
                getattr(section, f"{knobs}temperature"),
                samples,
            )
        if gen.judge:
            found[stage_name(gen_type, "judge")] = StageSettings(
                "generation.judge_max_tokens",
                gen.judge_max_tokens,
                "generation.judge_temperature",
                gen.judge_temperature,
                1,
            )
    return found
