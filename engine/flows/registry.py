"""The generation types: the ``Flow`` interface each implements, and the registry from a type
name to the factory of its flow (``FLOWS``), from which ``build_flows`` makes the ones a config
asks for.

A new type is one flow module and one entry here (and its name in ``engine.config.GenType``);
nothing else branches on type names to build flows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol

from engine.config import Config, GenerationConfig, GenType
from engine.flows.ask import Asker, Tally
from engine.flows.document_qa import DocumentQAFlow
from engine.flows.key_facts import KeyFactsFlow
from engine.flows.planning import StagePlan
from engine.flows.summary import SummaryFlow
from engine.flows.unit import FlowContext, Judge
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

FLOWS: Mapping[GenType, FlowFactory] = MappingProxyType(
    {
        "extractive_summary": lambda gen, ctx: SummaryFlow(
            "extractive_summary", "extractive", gen.extractive_summary, ctx
        ),
        "detailed_summary": lambda gen, ctx: SummaryFlow(
            "detailed_summary", "detailed", gen.detailed_summary, ctx
        ),
        "key_facts_to_qa": lambda gen, ctx: KeyFactsFlow(gen.key_facts_to_qa, ctx),
        "document_based_qa": lambda gen, ctx: DocumentQAFlow(gen.document_based_qa, ctx),
    }
)


def build_flows(
    config: Config,
    teacher: Teacher,
    *,
    tally: Tally | None = None,
    breaker: Breaker | None = None,
) -> dict[str, Flow]:
    """One flow per type in ``config.generation.types``, keyed by type name, in that order.

    ``tally(stage, check)`` counts every reply choice: ``check`` "" when it was accepted,
    else the code of the check that rejected it (``Stats.count_reply``). ``breaker``
    (``engine.pipeline.breaker``) is told of every item won and lost.
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
    )
    judge = Judge(gen.judge_temperature, gen.judge_max_tokens) if gen.judge else None
    ctx = FlowContext(asker, judge)
    return {gen_type: FLOWS[gen_type](gen, ctx) for gen_type in gen.types}
