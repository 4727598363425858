# Text in many scripts on purpose: their look-alike letters and punctuation are the point.
# ruff: noqa: RUF001
"""The content checks: each check on a table of cases, the gate on whole replies with the real
prompts, and a fixture of good replies in eight languages that must pass every gate."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from engine.config import QualityConfig
from engine.flows import prompts, quality
from engine.flows.ask import Ask, Asker
from engine.flows.quality import Gate, Grounding, Judged, Rejection, Scaffolding, Seen, Text
from engine.flows.structured import (
    Answer,
    Mode,
    Summary,
    key_facts_model,
    qa_pairs_model,
    questions_model,
)
from engine.flows.unit import grounding
from engine.seeds import SeedRow
from engine.text import normalise
from tests.support.fakes import FakeTeacher, make_seed
from tests.support.good_replies import CASES, Case

CONFIG = QualityConfig()
MODES: tuple[Mode, ...] = ("json_schema", "json_object", "text")
SEED = make_seed(
    "Photosynthesis in plants takes place in the chloroplasts of leaf cells. Light energy "
    "splits water, releasing oxygen, and powers the Calvin cycle, where the enzyme RuBisCO "
    "fixes carbon dioxide into sugar."
)


# --- each check on a table -------------------------------------------------------------------


def judged(
    value: str,
    kind: quality.Kind = "question",
    *,
    source: str = SEED.document,
    question: str = "",
    scaffold: Scaffolding | None = None,
    config: QualityConfig = CONFIG,
) -> Judged:
    g = grounding(SEED, source, question)
    allowed = f"{g.source}\n{g.chunk}"
    if scaffold is None:
        scaffold = Scaffolding.of(
            [m.content for m in prompts.question_messages(SEED, source, 3)],
            questions_model(3),
            g,
            config.echo_min_chars,
        )
    return Judged(
        Text("x", kind, value, question),
        normalise(value),
        g,
        scaffold,
        config,
        allowed,
        f"{normalise(g.source)}\n{normalise(g.chunk)}",
    )


@pytest.mark.parametrize(
    ("check", "value", "kind", "rejected"),
    [
        (quality.blank, "", "answer", True),
        (quality.blank, " \n\t ", "answer", True),
        (quality.blank, "Yes.", "answer", False),
        (quality.no_letters, "]", "question", True),
        (quality.no_letters, "][", "answer", True),
        (quality.no_letters, "{{}}", "answer", True),
        (quality.no_letters, "...", "summary", True),
        (quality.no_letters, "1998", "question", True),
        (quality.no_letters, "1998", "answer", False),  # a number answers a question
        (quality.no_letters, "6 650", "answer", False),
        (quality.no_letters, "长江", "answer", False),
        (quality.no_letters, "?", "answer", True),
        (quality.field_name, "questions", "question", True),
        (quality.field_name, "Questions:", "question", True),
        (quality.field_name, "QUESTION", "question", True),  # any reply model's name
        (quality.field_name, "the passage", "question", True),  # a word the prompt quotes
        (quality.field_name, "Question 1", "question", True),
        (quality.field_name, "2. Answer", "answer", True),
        (quality.field_name, "Question 1 of the Treaty?", "question", False),
        (quality.field_name, "Which questions does RuBisCO answer?", "question", False),
        (quality.template, "{{JSON }}", "summary", True),
        (quality.template, "{% for q in questions %}", "question", True),
        (quality.template, "<|im_start|>assistant", "answer", True),
        (quality.template, "A set {1, 2} of numbers.", "answer", False),
        (quality.scaffolding, "<document>Photosynthesis</document>", "summary", True),
        (quality.scaffolding, "What is in <example_questions>?", "question", True),
        (
            quality.scaffolding,
            "Every question must be answerable from the document alone.",
            "question",
            True,
        ),
        (
            quality.scaffolding,
            "You are a careful subject-matter expert who writes training material for a "
            "student language model.",
            "answer",
            True,
        ),
        (quality.scaffolding, "Where does the Calvin cycle take place?", "question", False),
        (quality.example_copy, "What do mitochondria make?", "question", True),
        (quality.example_copy, "what do mitochondria make", "answer", True),
        (quality.example_copy, "Mitochondria make ATP.", "answer", True),  # the example document
        (quality.example_copy, "Mitochondria make it.", "answer", False),
        (quality.example_copy, "What does RuBisCO fix?", "question", False),
        (quality.length, "x" * 1001, "question", True),
        (quality.length, "a", "question", True),
        (quality.length, "Q?", "question", True),
        (quality.length, "Why?", "question", False),
        (quality.length, "长江多长？", "question", False),
        (quality.length, "Where is RuBisCO found?", "question", False),
    ],
)
def test_each_check(check: quality.Check, value: str, kind: quality.Kind, rejected: bool) -> None:
    assert (check(judged(value, kind)) is not None) is rejected


def test_question_echo_is_the_question_again_after_normalising() -> None:
    question = "Where does the Calvin cycle take place?"
    for echo in (
        question,
        "where does the calvin cycle take place",
        " Where does the Calvin cycle take place ? ",
    ):
        assert quality.question_echo(judged(echo, "answer", question=question)) is not None
    answer = "In the stroma of the chloroplasts."
    assert quality.question_echo(judged(answer, "answer", question=question)) is None
    # Only answers are compared with their question.
    assert quality.question_echo(judged(question, "question", question=question)) is None


def test_the_example_document_is_not_to_be_copied_unless_the_source_says_it_too() -> None:
    long_example = "Mitochondria turn the energy of glucose into ATP in every cell."
    seed = make_seed(SEED.document, icl_document=long_example)
    g = grounding(seed, seed.document)
    scaffold = Scaffolding.of([], None, g, 20)
    copy = Judged(
        Text("q", "question", f"Explain: {long_example}"),
        normalise(f"Explain: {long_example}"),
        g,
        scaffold,
        CONFIG,
        seed.document,
        normalise(seed.document),
    )
    assert quality.example_copy(copy) is not None
    # The same sentence in the source itself (a seed whose example comes from its document).
    source = f"{seed.document} {long_example}"
    also = Judged(copy.text, copy.norm, g, scaffold, CONFIG, source, normalise(source))
    assert quality.example_copy(also) is None


def test_markup_the_document_itself_has_is_no_echo() -> None:
    source = "Jinja templates write {{ name }} for a variable and {% for %} for a loop."
    assert quality.template(judged("What does {{ name }} stand for?", source=source)) is None
    assert quality.template(judged("What does {{ name }} stand for?")) is not None


@pytest.mark.parametrize(
    ("kind", "source_chars", "low", "high"),
    [
        ("summary", 1000, 50, 2000),
        ("summary", 40, 2, 200),  # the floor for short sources
        ("question", 1000, 4, 1000),
        ("question", 5000, 4, 1000),  # question_max_chars
        ("question", 100, 4, 200),
        ("answer", 1000, 1, 2000),
        ("fact", 1000, 1, 1500),
        ("context", 100, 1, 200),
    ],
)
def test_length_bounds_are_relative_to_the_source(
    kind: quality.Kind, source_chars: int, low: int, high: int
) -> None:
    assert quality.bounds(kind, source_chars, CONFIG) == (low, high)


def test_length_bounds_follow_the_config() -> None:
    config = QualityConfig(summary_min_ratio=0.5, length_floor_chars=10)
    assert quality.bounds("summary", 100, config) == (50, 200)
    too_short = judged("A short one.", "summary", config=config)
    assert quality.length(too_short) is not None


def test_checks_are_named_once_and_in_order() -> None:
    assert quality.CODES == (
        "blank",
        "no_letters",
        "field_name",
        "template",
        "scaffolding",
        "example_copy",
        "question_echo",
        "length",
        "duplicate",
    )


# --- the gate on whole replies, with the real prompts ------------------------------------------


def asker(mode: Mode = "json_schema", config: QualityConfig = CONFIG) -> Asker:
    return Asker(FakeTeacher(), mode=mode, attempts=3, supports_n=True, quality=config)


def stage_asks(
    seed: SeedRow, case: Case | None = None, seen: Seen | None = None
) -> dict[str, Ask[Any]]:
    """Every stage's ask for ``seed``, as the flows build them (grounding included)."""
    summary = case.summaries[0] if case else "A summary of the chunk."
    fact, context = case.facts[0] if case else ("A fact.", "Its context.")
    question = case.questions[0] if case else "A question?"
    fact_source = f"{fact}\n\n{context}"

    def ask(stage: str, messages: Any, reply: type[BaseModel], g: Grounding) -> Ask[Any]:
        return Ask(stage, messages, reply, 0.3, 512, grounding=g, seen=seen)

    return {
        "summary": ask(
            "s", prompts.summary_messages(seed, "detailed"), Summary, grounding(seed, seed.document)
        ),
        "questions": ask(
            "q",
            prompts.question_messages(seed, seed.document, 3),
            questions_model(3),
            grounding(seed, seed.document),
        ),
        "summary_questions": ask(
            "sq",
            prompts.question_messages(seed, summary, 3),
            questions_model(3),
            grounding(seed, summary),
        ),
        "answer": ask(
            "a",
            prompts.answer_messages(seed, seed.document, question),
            Answer,
            grounding(seed, seed.document, question),
        ),
        "key_facts": ask(
            "k",
            prompts.key_facts_messages(seed, 5),
            key_facts_model(5),
            grounding(seed, seed.document),
        ),
        "qa": ask(
            "p",
            prompts.fact_qa_messages(seed, fact, context, 2),
            qa_pairs_model(2),
            grounding(seed, fact_source),
        ),
    }


def good_replies(case: Case) -> list[tuple[str, BaseModel]]:
    replies: list[tuple[str, BaseModel]] = [("summary", Summary(summary=s)) for s in case.summaries]
    replies.append(("questions", questions_model(3)(questions=list(case.questions))))
    replies.append(("summary_questions", questions_model(3)(questions=list(case.questions[:2]))))
    key_facts = [{"fact": f, "context": c} for f, c in case.facts]
    replies.append(("key_facts", key_facts_model(5).model_validate({"facts": key_facts})))
    pairs = [{"question": q, "answer": a} for q, a in case.pairs]
    replies.append(("qa", qa_pairs_model(2).model_validate({"pairs": pairs})))
    return replies


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.language for c in CASES])
def test_good_replies_in_every_language_pass_every_gate(case: Case, mode: Mode) -> None:
    seed = case.seed()
    seen = Seen()
    a = asker(mode)
    asks = stage_asks(seed, case, seen)
    for stage, value in good_replies(case):
        assert a.gate(asks[stage])(value) is None, (case.language, stage, value)
    # Every answer to its own question.
    for question, answer in zip(case.questions, case.answers, strict=True):
        ask = Ask(
            "a",
            prompts.answer_messages(seed, seed.document, question),
            Answer,
            0.3,
            512,
            grounding=grounding(seed, seed.document, question),
        )
        assert a.gate(ask)(Answer(answer=answer)) is None, (case.language, question)


def test_the_gate_is_off_when_disabled_or_without_a_grounding() -> None:
    junk = Summary(summary="{{JSON }}")
    asks = stage_asks(SEED)
    assert asker().gate(asks["summary"])(junk) is not None
    assert asker(config=QualityConfig(enabled=False)).gate(asks["summary"])(junk) is None
    plain = Ask("judge", asks["summary"].messages, Summary, 0.0, 16)
    assert asker().gate(plain)(junk) is None


JUNK: list[tuple[str, str, dict[str, Any]]] = [
    # (stage, expected check, reply) -- the kinds of junk seen from small and large teachers.
    ("questions", "no_letters", {"questions": ["]", "Where is RuBisCO found?"]}),
    ("answer", "no_letters", {"answer": "]["}),
    ("answer", "no_letters", {"answer": "{{}}"}),
    ("summary", "template", {"summary": "{{JSON }}"}),
    (
        "questions",
        "scaffolding",
        {"questions": [f"<example_document>\n{SEED.icl_document}\n</example_document>"]},
    ),
    ("questions", "example_copy", {"questions": [SEED.icl_document + " What is made?"]}),
    (
        "qa",
        "example_copy",
        {"pairs": [{"question": "What does RuBisCO fix?", "answer": SEED.icl_query_1}]},
    ),
    ("questions", "field_name", {"questions": ["questions"]}),
    ("qa", "field_name", {"pairs": [{"question": "Where is RuBisCO found?", "answer": "Answer"}]}),
    ("answer", "field_name", {"answer": "Answer"}),
    (
        "questions",
        "scaffolding",
        {
            "questions": [
                "Cover different parts of the document; no two questions may ask for the same "
                "information."
            ]
        },
    ),
    (
        "answer",
        "scaffolding",
        {"answer": "Use only information from the document; add nothing that it does not support."},
    ),
    ("questions", "duplicate", {"questions": ["What does RuBisCO fix?"] * 5}),
    (
        "questions",
        "duplicate",
        {"questions": ["What does RuBisCO fix?", "what does rubisco FIX ?!"]},
    ),
    ("answer", "question_echo", {"answer": "A question?"}),
    (
        "qa",
        "question_echo",
        {"pairs": [{"question": "Where is RuBisCO?", "answer": "Where is RuBisCO?"}]},
    ),
    ("summary", "length", {"summary": "Sugar."}),
    ("key_facts", "length", {"facts": [{"fact": "Plants. " * 100, "context": "Leaves."}]}),
]


@pytest.mark.parametrize(("stage", "check", "reply"), JUNK, ids=[f"{c}-{s}" for s, c, _ in JUNK])
def test_junk_is_rejected_by_its_check(stage: str, check: str, reply: dict[str, Any]) -> None:
    ask = stage_asks(SEED)[stage]
    got = asker().gate(ask)(ask.reply.model_validate(reply))
    assert isinstance(got, Rejection)
    assert got.check == check, got
    assert got.field and got.reason


def test_duplicates_are_per_source_within_the_unit() -> None:
    seen = Seen()
    asks = stage_asks(SEED, seen=seen)
    gate = asker().gate(asks["questions"])
    model = questions_model(3)
    assert gate(model(questions=["What does RuBisCO fix?"])) is None
    again = gate(model(questions=["Where does it happen?", "What does RuBisCO fix"]))
    assert again is not None and again.check == "duplicate" and again.field == "questions[1]"
    # A rejected reply leaves nothing behind: its first question is still new.
    assert gate(model(questions=["Where does it happen?"])) is None
    # The same question about another source (a summary) is another record.
    other = asker().gate(asks["summary_questions"])
    assert other(model(questions=["What does RuBisCO fix?"])) is None


def test_summaries_of_one_chunk_are_distinct() -> None:
    seen = Seen()
    gate = asker().gate(stage_asks(SEED, seen=seen)["summary"])
    first = "Photosynthesis happens in chloroplasts, where RuBisCO fixes carbon dioxide."
    assert gate(Summary(summary=first)) is None
    repeat = gate(Summary(summary=first.upper()))
    assert repeat is not None and repeat.check == "duplicate"
    assert gate(Summary(summary="Light splits water and powers the Calvin cycle.")) is None


def test_a_gate_without_a_unit_memory_still_rejects_repeats_within_a_reply() -> None:
    gate = Gate.of(CONFIG, grounding(SEED, SEED.document), [], questions_model(3))
    twice = questions_model(3)(questions=["Why is it?", "why is it"])
    got = gate(twice)
    assert got is not None and got.check == "duplicate"


def test_a_rejected_list_reply_carries_its_items_that_passed() -> None:
    asks = stage_asks(SEED)
    good = ["Where is RuBisCO found?", "What does light split?"]
    got = asker().gate(asks["questions"])(questions_model(3)(questions=[good[0], "]", good[1]]))
    assert got is not None and (got.check, got.field, got.dropped) == (
        "no_letters",
        "questions[1]",
        1,
    )
    assert isinstance(got.partial, BaseModel) and got.partial.model_dump() == {"questions": good}
    # A pair goes as a whole when its answer fails; a repeat of a kept item is dropped too.
    pairs = [
        {"question": "What does RuBisCO fix?", "answer": "Carbon dioxide."},
        {"question": "Where is it?", "answer": "Answer"},
        {"question": "what does rubisco fix", "answer": "CO2."},
    ]
    got = asker().gate(asks["qa"])(qa_pairs_model(3).model_validate({"pairs": pairs}))
    assert got is not None and got.check == "field_name" and got.dropped == 2
    assert got.partial is not None and got.partial.model_dump() == {"pairs": pairs[:1]}
    # Nothing passed, or a single text: nothing to keep.
    none_left = asker().gate(asks["questions"])(questions_model(3)(questions=["]", "[]"]))
    assert none_left is not None and none_left.partial is None and none_left.dropped == 2
    single = asker().gate(asks["answer"])(Answer(answer="]["))
    assert single is not None and single.partial is None
