"""``key_facts_to_qa``: atomic key facts of the chunk, then question/answer pairs per fact.

A pair's grounding ``document`` is its fact and the fact's context.
"""

from __future__ import annotations

from engine import prompts
from engine.config import KeyFactsConfig
from engine.flows.ask import Ask
from engine.flows.base import UnitResult
from engine.flows.unit import FlowContext, Pair, Unit, label
from engine.seeds import SeedRow
from engine.structured import KeyFact, key_facts_model, qa_pairs_model


class KeyFactsFlow:
    gen_type = "key_facts_to_qa"

    def __init__(self, config: KeyFactsConfig, ctx: FlowContext) -> None:
        self.config = config
        self.ctx = ctx

    async def run(self, seed: SeedRow) -> UnitResult:
        async with self.ctx.unit(seed, self.gen_type) as unit:
            unit.spawn(unit.stage("key_facts"), "key_facts", self._facts(unit))
        return unit.result()

    async def _facts(self, unit: Unit) -> None:
        ask = Ask(
            unit.stage("key_facts"),
            prompts.key_facts_messages(unit.seed, self.config.max_facts),
            key_facts_model(self.config.max_facts),
            self.config.temperature,
            self.config.max_tokens,
        )
        got = await unit.asker.one(ask)
        for i, fact in enumerate(got.value.facts):
            path = (f"f{i:03d}",)
            unit.spawn(unit.stage("qa"), label(path), self._qa(unit, path, fact))

    async def _qa(self, unit: Unit, path: tuple[str, ...], fact: KeyFact) -> None:
        count = self.config.qa_per_fact
        ask = Ask(
            unit.stage("qa"),
            prompts.fact_qa_messages(unit.seed, fact.fact, fact.context, count),
            qa_pairs_model(count),
            self.config.qa_temperature,
            self.config.qa_max_tokens,
        )
        got = await unit.asker.one(ask)
        document = f"{fact.fact}\n\n{fact.context}"
        for j, pair in enumerate(got.value.pairs):
            unit.add(
                Pair(
                    (*path, f"p{j:02d}"),
                    document,
                    pair.question,
                    pair.answer,
                    got.model,
                    got.choice.reasoning,
                    key_fact=fact.fact,
                )
            )

    def __repr__(self) -> str:
        return f"<KeyFactsFlow max_facts={self.config.max_facts} x{self.config.qa_per_fact}>"
