"""The generation types, one flow each: the ``Flow`` interface and its registry
(``engine.flows.registry``: ``build_flows`` makes the ones the config asks for), and the
config keys behind each stage (``stage_settings``), for messages that say what to change."""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.config import Config
from engine.flows.registry import FLOWS, Flow, FlowFactory, build_flows
from engine.flows.unit import stage_name

__all__ = ["FLOWS", "Flow", "FlowFactory", "StageSettings", "build_flows", "stage_settings"]


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
