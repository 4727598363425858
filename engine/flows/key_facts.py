"""``key_facts_to_qa``: atomic key facts of the chunk, then question/answer pairs per fact.

A pair's grounding ``document`` is its fact and the fact's context.
"""

from __future__ import annotations

from engine.config import KeyFactsConfig
from engine.flows import prompts, quality
from engine.flows.ask import Ask
from engine.flows.planning import StagePlan, assumed_reply
from engine.flows.structured import KeyFact, KeyFacts, QAPairs, key_facts_model, qa_pairs_model
from engine.flows.unit import FlowContext, Pair, Unit, grounding, label, stage_name
from engine.output.records import UnitResult
from engine.seeds import SeedRow


def _grounding(fact: str, context: str) -> str:
    """A pair's ``document``: its fact and the fact's context."""
    return f"{fact}\n\n{context}"


class KeyFactsFlow:
    """``key_facts_to_qa``: up to ``max_facts`` key facts of the chunk, each with its context,
    then ``qa_per_fact`` question/answer pairs per fact in one request."""

    gen_type = "key_facts_to_qa"

    def __init__(self, config: KeyFactsConfig, ctx: FlowContext) -> None:
        self.config = config
        self.ctx = ctx

    async def run(self, seed: SeedRow) -> UnitResult:
        """``Flow.run``: the unit's records, grounded each in its fact and the fact's context."""
        async with self.ctx.unit(seed, self.gen_type) as unit:
            unit.spawn(unit.stage("key_facts"), "key_facts", self._facts(unit))
        return unit.result()

    def plan(self, seed: SeedRow) -> list[StagePlan]:
        """``Flow.plan``: the key-facts request, then one pairs request per fact."""
        c = self.config
        # Each fact and each context is one item of the key-facts reply; likewise per pair.
        fact = assumed_reply(c.max_tokens, 2 * c.max_facts, seed.document)
        text = assumed_reply(c.qa_max_tokens, 2 * c.qa_per_fact, seed.document)
        facts = self.ctx.asker.first_round(self._facts_ask(seed))
        qa = self.ctx.asker.first_round(self._qa_ask(seed, fact, fact))
        pair = (_grounding(fact, fact), text, text)
        pairs = c.max_facts * c.qa_per_fact
        return [
            StagePlan.of(facts),
            StagePlan.of(qa, c.max_facts, f"{c.max_facts} facts"),
            *self.ctx.judge_plan(
                self.gen_type, pairs, pair, f"{c.max_facts} facts x {c.qa_per_fact} pairs"
            ),
        ]

    def _facts_ask(self, seed: SeedRow, seen: quality.Seen | None = None) -> Ask[KeyFacts]:
        return Ask(
            stage_name(self.gen_type, "key_facts"),
            prompts.key_facts_messages(seed, self.config.max_facts),
            key_facts_model(self.config.max_facts),
            self.config.temperature,
            self.config.max_tokens,
            grounding=grounding(seed, seed.document),
            seen=seen,
        )

    def _qa_ask(
        self, seed: SeedRow, fact: str, context: str, seen: quality.Seen | None = None
    ) -> Ask[QAPairs]:
        count = self.config.qa_per_fact
        return Ask(
            stage_name(self.gen_type, "qa"),
            prompts.fact_qa_messages(seed, fact, context, count),
            qa_pairs_model(count),
            self.config.qa_temperature,
            self.config.qa_max_tokens,
            # A pair is grounded in its fact and the fact's context, like its record.
            grounding=grounding(seed, _grounding(fact, context)),
            seen=seen,
        )

    async def _facts(self, unit: Unit) -> None:
        got = await unit.ask(self._facts_ask(unit.seed, unit.seen), "key_facts")
        for i, fact in enumerate(got.value.facts):
            path = (f"f{i:03d}",)
            unit.spawn(unit.stage("qa"), label(path), self._qa(unit, path, fact))

    async def _qa(self, unit: Unit, path: tuple[str, ...], fact: KeyFact) -> None:
        ask = self._qa_ask(unit.seed, fact.fact, fact.context, unit.seen)
        got = await unit.ask(ask, label(path))
        document = _grounding(fact.fact, fact.context)
        for j, pair in enumerate(got.value.pairs):
            unit.add(
                Pair(
                    (*path, f"p{j:02d}"),
                    document,
                    pair.question,
                    pair.answer,
                    got.model,
                    got.reasoning,
                    key_fact=fact.fact,
                )
            )

    def __repr__(self) -> str:
        return f"<KeyFactsFlow max_facts={self.config.max_facts} x{self.config.qa_per_fact}>"
