"""The generation types, one flow each; ``build_flows`` makes the ones the config asks for."""

from __future__ import annotations

from typing import assert_never

from engine.config import Config
from engine.flows.ask import Asker, Tally
from engine.flows.base import Flow
from engine.flows.document_qa import DocumentQAFlow
from engine.flows.key_facts import KeyFactsFlow
from engine.flows.summary import SummaryFlow
from engine.flows.unit import FlowContext, Judge
from engine.teacher import Teacher

__all__ = ["build_flows"]


def build_flows(config: Config, teacher: Teacher, tally: Tally | None = None) -> dict[str, Flow]:
    """One flow per type in ``config.generation.types``, keyed by type name, in that order.

    ``tally(stage, check)`` counts every reply choice: ``check`` "" when it was accepted,
    else the code of the check that rejected it (``Stats.count_reply``).
    """
    gen = config.generation
    asker = Asker(
        teacher,
        mode=config.teacher.structured_output,
        attempts=config.retry.invalid_reply_attempts,
        supports_n=config.teacher.supports_n,
        quality=config.quality,
        tally=tally,
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
