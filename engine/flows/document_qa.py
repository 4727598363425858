"""``document_based_qa``: questions straight from the chunk, each answered from the chunk."""

from __future__ import annotations

from engine.config import DocumentQAConfig
from engine.flows.planning import StagePlan
from engine.flows.qa import Knobs, QuestionsThenAnswers
from engine.flows.unit import FlowContext
from engine.output.records import UnitResult
from engine.seeds import SeedRow


class DocumentQAFlow:
    """``document_based_qa``: ``questions`` questions on the chunk, each answered from it."""

    gen_type = "document_based_qa"

    def __init__(self, config: DocumentQAConfig, ctx: FlowContext) -> None:
        self.config = config
        self.ctx = ctx
        self.qa = QuestionsThenAnswers(
            config.questions,
            questions=Knobs(config.temperature, config.max_tokens),
            answers=Knobs(config.qa_temperature, config.qa_max_tokens),
            digits=3,
        )

    async def run(self, seed: SeedRow) -> UnitResult:
        """``Flow.run``: the unit's records, grounded each in the chunk itself."""
        async with self.ctx.unit(seed, self.gen_type) as unit:
            step = self.qa.questions_step(unit, (), seed.document)
            unit.spawn(unit.stage("questions"), "questions", step)
        return unit.result()

    def plan(self, seed: SeedRow) -> list[StagePlan]:
        """``Flow.plan``: the questions request, then one answer request per question."""
        return self.qa.plan(self.ctx, seed, self.gen_type, seed.document, 1, "chunk")

    def __repr__(self) -> str:
        return f"<DocumentQAFlow x{self.config.questions}>"
