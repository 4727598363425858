"""``extractive_summary`` and ``detailed_summary``: N summaries, questions on each, answers.

Each summary becomes the grounding ``document`` of its own question/answer pairs. Summary
i's questions are asked as soon as summary i has arrived, not when all N have.
"""

from __future__ import annotations

from engine.config import SummaryConfig
from engine.flows import prompts, quality
from engine.flows.ask import Ask, Parsed
from engine.flows.planning import StagePlan, assumed_reply
from engine.flows.qa import Knobs, QuestionsThenAnswers
from engine.flows.structured import Summary
from engine.flows.unit import FlowContext, Unit, grounding, stage_name
from engine.output.records import UnitResult
from engine.seeds import SeedRow


def _slot_path(slot: int) -> tuple[str]:
    return (f"s{slot:03d}",)


class SummaryFlow:
    """``extractive_summary`` or ``detailed_summary`` (``style``): ``config.summaries``
    summaries of the chunk, ``questions_per_summary`` questions on each, an answer to each."""

    def __init__(
        self,
        gen_type: str,
        style: prompts.SummaryStyle,
        config: SummaryConfig,
        ctx: FlowContext,
    ) -> None:
        self.gen_type = gen_type
        self.style: prompts.SummaryStyle = style
        self.config = config
        self.ctx = ctx
        qa = Knobs(config.qa_temperature, config.qa_max_tokens)
        self.qa = QuestionsThenAnswers(config.questions_per_summary, questions=qa, answers=qa)

    async def run(self, seed: SeedRow) -> UnitResult:
        """``Flow.run``: the unit's records, grounded each in its summary."""
        async with self.ctx.unit(seed, self.gen_type) as unit:
            unit.spawn(unit.stage("summary"), "summaries", self._summaries(unit))
        return unit.result()

    def plan(self, seed: SeedRow) -> list[StagePlan]:
        """``Flow.plan``: the summary request(s), then the questions and answers per summary."""
        summaries = self.ctx.asker.first_round(self._summary_ask(seed), self.config.summaries)
        summary = assumed_reply(self.config.max_tokens, 1, seed.document)
        return [
            StagePlan.of(summaries),
            *self.qa.plan(self.ctx, seed, self.gen_type, summary, self.config.summaries, "summary"),
        ]

    def _summary_ask(self, seed: SeedRow, seen: quality.Seen | None = None) -> Ask[Summary]:
        return Ask(
            stage_name(self.gen_type, "summary"),
            prompts.summary_messages(seed, self.style),
            Summary,
            self.config.temperature,
            self.config.max_tokens,
            grounding=grounding(seed, seed.document),
            seen=seen,
        )

    async def _summaries(self, unit: Unit) -> None:
        # The unit's memory makes the N summaries distinct: a repeat is asked again.
        ask = self._summary_ask(unit.seed, unit.seen)

        def on_summary(slot: int, got: Parsed[Summary]) -> None:
            path = _slot_path(slot)
            step = self.qa.questions_step(unit, path, got.value.summary)
            unit.spawn(unit.stage("questions"), path[0], step)

        lost = await unit.asker.many(ask, self.config.summaries, on_summary)
        for item in lost:
            where = ",".join(_slot_path(slot)[0] for slot in item.slots)
            unit.fail(ask.stage, where, item.error)

    def __repr__(self) -> str:
        return f"<SummaryFlow {self.gen_type} x{self.config.summaries}>"
