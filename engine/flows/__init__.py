"""The generation types, one flow each; ``build_flows`` makes the ones the config asks for."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import assert_never

from engine.config import Config
from engine.flows.ask import Asker, Tally
from engine.flows.base import Flow
from engine.flows.document_qa import DocumentQAFlow
from engine.flows.key_facts import KeyFactsFlow
from engine.flows.summary import SummaryFlow
from engine.flows.unit import FlowContext, Judge, stage_name
from engine.pipeline.breaker import Breaker
from engine.teacher.protocol import Teacher

__all__ = ["StageSettings", "build_flows", "stage_settings"]


@dataclass(frozen=True, slots=True)
class StageSettings:
    """The config keys behind one stage's requests, for messages that say what to change."""

    max_tokens_key: str  # e.g. "generation.extractive_summary.qa_max_tokens"
    max_tokens: int
    temperature_key: str
    temperature: float
    samples: int  # choices one request of the stage asks for (n), at most


def stage_settings(config: Config) -> dict[str, StageSettings]:
    """Every stage the config's types run (full names, e.g. "key_facts_to_qa/qa"), with the
    keys that set its ``max_tokens`` and temperature."""
    gen = config.generation
    found: dict[str, StageSettings] = {}
    for gen_type in gen.types:
        knobs = getattr(gen, gen_type)
        prefix = f"generation.{gen_type}"
        first = StageSettings(
            f"{prefix}.max_tokens", knobs.max_tokens, f"{prefix}.temperature", knobs.temperature, 1
        )
        qa = StageSettings(
            f"{prefix}.qa_max_tokens",
            knobs.qa_max_tokens,
            f"{prefix}.qa_temperature",
            knobs.qa_temperature,
            1,
        )
        if gen_type in ("extractive_summary", "detailed_summary"):
            samples = knobs.summaries if config.teacher.supports_n else 1
            stages = {
                "summary": replace(first, samples=samples),
                "questions": qa,
                "answer": qa,
            }
        elif gen_type == "key_facts_to_qa":
            stages = {"key_facts": first, "qa": qa}
        else:
            stages = {"questions": first, "answer": qa}
        if gen.judge:
            stages["judge"] = StageSettings(
                "generation.judge_max_tokens",
                gen.judge_max_tokens,
                "generation.judge_temperature",
                gen.judge_temperature,
                1,
            )
        found.update({stage_name(gen_type, name): s for name, s in stages.items()})
    return found


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
    flows: dict[str, Flow] = {}
    for gen_type in gen.types:
        if gen_type == "extractive_summary":
            flows[gen_type] = SummaryFlow(gen_type, "extractive", gen.extractive_summary, ctx)
        elif gen_type == "detailed_summary":
            flows[gen_type] = SummaryFlow(gen_type, "detailed", gen.detailed_summary, ctx)
        elif gen_type == "key_facts_to_qa":
            flows[gen_type] = KeyFactsFlow(gen.key_facts_to_qa, ctx)
        elif gen_type == "document_based_qa":
            flows[gen_type] = DocumentQAFlow(gen.document_based_qa, ctx)
        else:
            assert_never(gen_type)
    return flows
