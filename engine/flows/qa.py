"""The branch shared by the summary and document QA flows: questions on a text, then answers."""

from __future__ import annotations

from dataclasses import dataclass

from engine import prompts
from engine.flows.ask import Ask
from engine.flows.unit import Pair, Unit, label
from engine.structured import Answer, questions_model


@dataclass(frozen=True, slots=True)
class Knobs:
    temperature: float
    max_tokens: int


@dataclass(frozen=True, slots=True)
class QuestionsThenAnswers:
    """Ask ``count`` questions about a document, then answer each from that document."""

    count: int
    questions: Knobs
    answers: Knobs
    digits: int = 2  # width of the question number in the record path

    async def questions_step(self, unit: Unit, path: tuple[str, ...], document: str) -> None:
        ask = Ask(
            unit.stage("questions"),
            prompts.question_messages(unit.seed, document, self.count),
            questions_model(self.count),
            self.questions.temperature,
            self.questions.max_tokens,
        )
        got = await unit.asker.one(ask)
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
        ask = Ask(
            unit.stage("answer"),
            prompts.answer_messages(unit.seed, document, question),
            Answer,
            self.answers.temperature,
            self.answers.max_tokens,
        )
        got = await unit.asker.one(ask)
        unit.add(Pair(path, document, question, got.value.answer, got.model, got.choice.reasoning))
