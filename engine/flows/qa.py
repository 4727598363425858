"""The branch shared by the summary and document QA flows: questions on a text, then answers."""

from __future__ import annotations

from dataclasses import dataclass

from engine.flows import prompts, quality
from engine.flows.ask import Ask
from engine.flows.planning import StagePlan, assumed_reply
from engine.flows.structured import Answer, Questions, questions_model
from engine.flows.unit import FlowContext, Pair, Unit, grounding, label, stage_name
from engine.seeds import SeedRow


@dataclass(frozen=True, slots=True)
class Knobs:
    """One stage's sampling settings: temperature and ``max_tokens`` (completion tokens)."""

    temperature: float
    max_tokens: int


@dataclass(frozen=True, slots=True)
class QuestionsThenAnswers:
    """Ask ``count`` questions about a document, then answer each from that document."""

    count: int
    questions: Knobs
    answers: Knobs
    digits: int = 2  # width of the question number in the record path

    def questions_ask(
        self, seed: SeedRow, stage: str, document: str, seen: quality.Seen | None = None
    ) -> Ask[Questions]:
        """The request for ``count`` questions about ``document`` (distinct from ``seen``)."""
        return Ask(
            stage,
            prompts.question_messages(seed, document, self.count),
            questions_model(self.count),
            self.questions.temperature,
            self.questions.max_tokens,
            grounding=grounding(seed, document),
            seen=seen,
        )

    def answer_ask(self, seed: SeedRow, stage: str, document: str, question: str) -> Ask[Answer]:
        """The request for the answer to ``question`` from ``document``."""
        return Ask(
            stage,
            prompts.answer_messages(seed, document, question),
            Answer,
            self.answers.temperature,
            self.answers.max_tokens,
            grounding=grounding(seed, document, question),
        )

    async def questions_step(self, unit: Unit, path: tuple[str, ...], document: str) -> None:
        """Ask the questions about ``document``; spawn an answer branch for each, at
        ``path`` + ``q<j>``. An ``ItemError`` ends this branch (the unit records it)."""
        ask = self.questions_ask(unit.seed, unit.stage("questions"), document, unit.seen)
        got = await unit.ask(ask, label(path) or "questions")
        for j, question in enumerate(got.value.questions):
            qpath = (*path, f"q{j:0{self.digits}d}")
            unit.spawn(
                unit.stage("answer"),
                label(qpath),
                self.answer_step(unit, qpath, document, question),
            )

    async def answer_step(
        self, unit: Unit, path: tuple[str, ...], document: str, question: str
    ) -> None:
        """Ask the answer to ``question``; add the pair to the unit at ``path``."""
        ask = self.answer_ask(unit.seed, unit.stage("answer"), document, question)
        got = await unit.asker.one(ask)
        unit.add(Pair(path, document, question, got.value.answer, got.model, got.reasoning))

    def plan(
        self, ctx: FlowContext, seed: SeedRow, gen_type: str, document: str, documents: int, of: str
    ) -> list[StagePlan]:
        """The requests for ``documents`` documents like ``document`` (``of`` names them in
        the assumption), assuming the teacher returns ``count`` questions for each."""
        question = assumed_reply(self.questions.max_tokens, self.count, seed.document)
        response = assumed_reply(self.answers.max_tokens, 1, seed.document)
        questions = self.questions_ask(seed, stage_name(gen_type, "questions"), document)
        answers = self.answer_ask(seed, stage_name(gen_type, "answer"), document, question)
        pairs = documents * self.count
        assumes = f"{self.count} questions per {of}"
        return [
            StagePlan.of(ctx.asker.first_round(questions), documents),
            StagePlan.of(ctx.asker.first_round(answers), pairs, assumes),
            *ctx.judge_plan(gen_type, pairs, (document, question, response), assumes),
        ]
