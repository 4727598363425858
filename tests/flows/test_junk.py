"""Junk replies, of every kind seen from real teachers, through the flows (a scripted teacher)
and through the whole engine over HTTP (the simulator with a fault plan): none reaches a
record, each is counted under its check, the good replies of the same unit are kept, and
junk that persists is a failure that names its check."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.config import Config
from engine.flows import build_flows
from engine.flows.prompts import _ANSWER_RULES
from engine.output.records import UnitResult
from engine.teacher.protocol import ChatReply, ChatRequest
from tests.support.fakes import FakeTeacher, last_user_text, make_config, make_seed, reply
from tests.support.faults import Outcome, Seen, completion
from tests.support.runs import (
    EXPECTED_PER_DOC,
    SAMPLE_SEEDS,
    TOTAL,
    assert_complete_output,
    failure_lines,
    faulted_run,
    read_gen,
)

SEED = make_seed(
    "Photosynthesis in plants takes place in the chloroplasts of leaf cells. Light energy "
    "splits water, releasing oxygen, and powers the Calvin cycle, where the enzyme RuBisCO "
    "fixes carbon dioxide into sugar."
)
EXAMPLE_BLOCK = f"<example_document>\n{SEED.icl_document}\n</example_document>"
INSTRUCTION = _ANSWER_RULES.splitlines()[0].removeprefix("- ")
_QUESTION = re.compile(r"^Question: (.*)$", re.MULTILINE)


def asked_question(request: ChatRequest) -> str:
    match = _QUESTION.search(last_user_text(request))
    assert match is not None
    return match.group(1)


def first_try(request: ChatRequest) -> bool:
    return "(Try " not in last_user_text(request)


Junk = Callable[[ChatRequest], ChatReply]
# (type, stage, junk for the stage's first request, the check that must reject it)
CASES: list[tuple[str, str, Junk, str]] = [
    ("document_based_qa", "questions", lambda r: reply({"questions": ["]", "Why?"]}), "no_letters"),
    ("document_based_qa", "answer", lambda r: reply({"answer": "]["}), "no_letters"),
    ("document_based_qa", "answer", lambda r: reply({"answer": "{{}}"}), "no_letters"),
    ("extractive_summary", "summary", lambda r: reply({"summary": "{{JSON }}"}), "template"),
    (
        "document_based_qa",
        "questions",
        lambda r: reply({"questions": [EXAMPLE_BLOCK]}),
        "scaffolding",
    ),
    (
        "key_facts_to_qa",
        "qa",
        lambda r: reply(
            {"pairs": [{"question": "What does RuBisCO fix?", "answer": SEED.icl_query_1}]}
        ),
        "example_copy",
    ),
    ("document_based_qa", "questions", lambda r: reply({"questions": ["questions"]}), "field_name"),
    ("document_based_qa", "answer", lambda r: reply({"answer": "Answer"}), "field_name"),
    ("document_based_qa", "answer", lambda r: reply({"answer": ""}), "blank"),
    ("extractive_summary", "summary", lambda r: reply({"summary": ""}), "blank"),
    ("document_based_qa", "answer", lambda r: reply({"answer": INSTRUCTION}), "scaffolding"),
    # The schemas' own descriptions, as SmolLM2 copies them (the demo teacher's records).
    (
        "document_based_qa",
        "answer",
        lambda r: reply({"answer": "The answer stage's reply: one answer to one question."}),
        "scaffolding",
    ),
    (
        "key_facts_to_qa",
        "key_facts",
        lambda r: reply(
            {
                "facts": [
                    {
                        "fact": "One key fact of a chunk, with the sentences of the chunk it "
                        "comes from.",
                        "context": "RuBisCO fixes carbon dioxide.",
                    }
                ]
            }
        ),
        "scaffolding",
    ),
    (
        "document_based_qa",
        "questions",
        lambda r: reply({"questions": ["What does RuBisCO fix?"] * 5}),
        "duplicate",
    ),
    (
        "document_based_qa",
        "answer",
        lambda r: reply({"answer": asked_question(r)}),
        "question_echo",
    ),
    (
        "key_facts_to_qa",
        "key_facts",
        lambda r: reply({"facts": [{"fact": "x" * 2000, "context": "c"}]}),
        "length",
    ),
]


def config(gen_type: str) -> Config:
    return make_config(
        types=[gen_type],
        extractive_summary={"summaries": 3, "questions_per_summary": 2},
        key_facts_to_qa={"max_facts": 2, "qa_per_fact": 2},
        document_based_qa={"questions": 5},
    )


async def run(gen_type: str, teacher: FakeTeacher) -> tuple[UnitResult, Counter[tuple[str, str]]]:
    tally: Counter[tuple[str, str]] = Counter()
    flows = build_flows(
        config(gen_type), teacher, tally=lambda stage, check: tally.update([(stage, check)])
    )
    async with asyncio.timeout(5):
        return await flows[gen_type].run(SEED), tally


# Where each field of a reply ends up in a record.
RECORD_FIELD = {"summary": "document", "questions": "question", "question": "question",
                "answer": "response", "fact": "key_fact"}  # fmt: skip


def junk_fields(junk: ChatReply) -> list[tuple[str, str]]:
    """(record field, text) for every text of a junk reply that a record could carry."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and key in RECORD_FIELD:
            found.append((RECORD_FIELD[key], value))

    for choice in junk.choices:
        walk(orjson.loads(choice.content), "")
    return found


def texts(result: UnitResult) -> list[str]:
    fields = ("question", "response", "document", "key_fact")
    return [line[f] for line in (r.to_dict() for r in result.records) for f in fields if f in line]


EXPECTED = {"document_based_qa": 5, "extractive_summary": 6, "key_facts_to_qa": 4}


@pytest.mark.parametrize(
    ("gen_type", "stage", "junk", "check"), CASES, ids=[f"{c[3]}-{c[1]}" for c in CASES]
)
async def test_junk_is_asked_again_and_never_kept(
    gen_type: str, stage: str, junk: Junk, check: str
) -> None:
    junked: list[ChatRequest] = []

    def script(request: ChatRequest) -> ChatReply | None:
        if request.stage.endswith("/" + stage) and not junked:
            junked.append(request)
            return junk(request)
        return None

    teacher = FakeTeacher(script)
    result, tally = await run(gen_type, teacher)
    # Asked again, the good replies fill the unit: nothing is lost, nothing junk is kept.
    assert result.failures == []
    assert len(result.records) == EXPECTED[gen_type]
    for field, value in junk_fields(junk(junked[0])):
        assert all(r.to_dict().get(field) != value for r in result.records), (field, value)
    full_stage = f"{gen_type}/{stage}"
    assert tally[(full_stage, check)] == 1
    assert sum(n for (s, c), n in tally.items() if c) == 1  # only that one was rejected
    # The re-ask says what was wrong, and the junk is not left for a cache to replay.
    again = [r for r in teacher.sent("/" + stage) if not first_try(r)]
    assert again and "rejected" in last_user_text(again[0])
    assert junked[0] in teacher.forgotten


async def test_good_choices_of_a_reply_with_junk_are_kept() -> None:
    good = [
        "Chloroplasts hold chlorophyll, which absorbs light for photosynthesis.",
        "RuBisCO fixes carbon dioxide in the Calvin cycle.",
    ]

    def script(request: ChatRequest) -> ChatReply | None:
        if request.stage.endswith("/summary") and first_try(request):
            return reply({"summary": good[0]}, {"summary": "{{JSON }}"}, {"summary": good[1]})
        return None

    teacher = FakeTeacher(script)
    result, tally = await run("extractive_summary", teacher)
    assert [r.n for r in teacher.sent("/summary")] == [3, 1]  # only the junk one asked again
    assert set(good) <= {r.document for r in result.records}
    assert "{{JSON }}" not in texts(result)
    assert tally[("extractive_summary/summary", "template")] == 1
    assert tally[("extractive_summary/summary", "")] == 3


async def test_junk_that_persists_is_a_failure_naming_its_check() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if request.stage.endswith("/answer") and "questions[1]" in last_user_text(request):
            return reply({"answer": "]["})
        return None

    teacher = FakeTeacher(script)
    result, tally = await run("document_based_qa", teacher)
    (failure,) = result.failures
    assert (failure.stage, failure.item, failure.kind, failure.check, failure.attempts) == (
        "document_based_qa/answer",
        "q001",
        "invalid_reply",
        "no_letters",
        3,
    )
    assert "no letter" in failure.message and "][" in failure.body_excerpt
    # The other questions of the same unit are answered and kept.
    assert [r.id.rsplit("-", 1)[1] for r in result.records] == ["q000", "q002", "q003", "q004"]
    assert tally[("document_based_qa/answer", "no_letters")] == 3


async def test_duplicate_questions_are_asked_again_within_their_source_only() -> None:
    """Within one fact's pairs a repeated question is asked again; the same question about
    another fact is another record."""
    q = "Where does the Calvin cycle run?"

    def script(request: ChatRequest) -> ChatReply | None:
        if not request.stage.endswith("/qa"):
            return None
        text = last_user_text(request)
        if "facts[0]" in text:
            return reply({"pairs": [{"question": q, "answer": "In the stroma."}]})
        if first_try(request):  # fact 1: the same question twice in one reply
            pairs = [{"question": q, "answer": "In the stroma."}]
            return reply({"pairs": [*pairs, {"question": f" {q.upper()}", "answer": "There."}]})
        return reply({"pairs": [{"question": q, "answer": "In the chloroplast stroma."}]})

    result, tally = await run("key_facts_to_qa", FakeTeacher(script))
    assert result.failures == []
    assert tally[("key_facts_to_qa/qa", "duplicate")] == 1
    assert [(r.id.split("-", 2)[2], r.question) for r in result.records] == [
        ("f000-p00", q),
        ("f001-p00", q),
    ]


async def test_checks_off_keep_what_parses() -> None:
    gen_config = config("document_based_qa")
    off = gen_config.model_copy(
        update={"quality": gen_config.quality.model_copy(update={"enabled": False})}
    )
    teacher = FakeTeacher(
        lambda r: reply({"answer": "Answer"}) if r.stage.endswith("/answer") else None
    )
    result = await build_flows(off, teacher)["document_based_qa"].run(SEED)
    assert [r.response for r in result.records] == ["Answer"] * 5


# --- through HTTP: the simulator answers junk for some requests --------------------------------

SEEDS = [orjson.loads(line) for line in SAMPLE_SEEDS.read_bytes().splitlines()]
DOCS = [s["document"] for s in SEEDS]


def summary_of(doc: str, part: int) -> str:
    """A good summary: one half of the document."""
    half = len(doc) // 2
    return doc[:half] if part == 0 else doc[half:]


def first_round(seen: Seen) -> bool:
    return "(Try " not in seen.prompt


def doc_index(seen: Seen) -> int | None:
    return next(
        (i for i, d in enumerate(DOCS) if f"<document>\n{d}\n</document>" in seen.prompt), None
    )


def summary_junk(seen: Seen) -> Outcome:
    """Doc 0's first summaries: template markup beside two good ones; a duplicate pair."""
    if doc_index(seen) != 0 or not first_round(seen):
        return None
    halves = [orjson.dumps({"summary": summary_of(DOCS[0], i)}).decode() for i in (0, 1)]
    if seen.prompt.startswith("Write an extractive summary"):
        return completion('{"summary": "{{JSON }}"}', *halves)
    if seen.prompt.startswith("Write a detailed summary"):
        return completion(halves[0], halves[0], halves[1])
    return None


def questions_junk(seen: Seen) -> Outcome:
    """Each chunk's own questions: doc 0 "]" then one question four times, doc 1 the schema's
    field name, doc 2 the prompt's example-document block echoed."""
    doc = doc_index(seen)
    if not seen.prompt.startswith("Write exactly 4 questions") or doc is None:
        return None
    icl = SEEDS[doc]["icl_document"]
    rounds = [
        ["]"], ["What is fixed?"] * 4
    ] if doc == 0 else [["questions"]] if doc == 1 else [
        [f"<example_document>\n{icl}\n</example_document>"]
    ]  # fmt: skip
    again = re.search(r"\(Try (\d+):", seen.prompt)
    attempt = int(again.group(1)) - 1 if again else 0
    if attempt < len(rounds):
        return completion(orjson.dumps({"questions": rounds[attempt]}).decode())
    return None


class JunkPlan:
    """Junk for some first-round requests, one kind each; re-asks are answered normally.
    ``expected``: the rejections it must cause, by stage and check."""

    expected: dict[str, Counter[str]] = {  # noqa: RUF012 (read only)
        "extractive_summary/summary": Counter({"template": 1}),
        "detailed_summary/summary": Counter({"duplicate": 1}),
        "document_based_qa/questions": Counter(
            {"no_letters": 1, "duplicate": 1, "field_name": 1, "scaffolding": 1}
        ),
        "document_based_qa/answer": Counter(
            {"no_letters": 2, "blank": 1, "field_name": 1, "scaffolding": 1, "question_echo": 1}
        ),
        "key_facts_to_qa/qa": Counter({"example_copy": 1, "question_echo": 1}),
    }

    def __init__(self) -> None:
        self.answer_junk = ["][", "{{}}", "", "Answer", INSTRUCTION, "<echo>"]
        self.qa_junk = ["example_copy", "question_echo"]

    def __call__(self, seen: Seen) -> Outcome:
        for part in (summary_junk, questions_junk, self.answer, self.pairs):
            if (outcome := part(seen)) is not None:
                return outcome
        return None

    def answer(self, seen: Seen) -> Outcome:
        """The first six document answers to arrive, one kind of junk each."""
        prompt = seen.prompt
        if not prompt.startswith("Answer the question below") or doc_index(seen) is None:
            return None
        if not first_round(seen) or not self.answer_junk:
            return None
        junk = self.answer_junk.pop(0)
        if junk == "<echo>":
            junk = _QUESTION.search(prompt).group(1)  # type: ignore[union-attr]
        return completion(orjson.dumps({"answer": junk}).decode())

    def pairs(self, seen: Seen) -> Outcome:
        """The first two key-fact pair replies: an example question copied as an answer, then
        an answer that is its question again, each beside two good pairs."""
        prompt = seen.prompt
        if not prompt.startswith("Write exactly 3 question-answer pairs"):
            return None
        if not first_round(seen) or not self.qa_junk:
            return None
        good = [
            {"question": "Which molecule carries the energy?", "answer": "ATP carries it."},
            {"question": "Which organelle is involved?", "answer": "The chloroplast."},
        ]
        if self.qa_junk.pop(0) == "example_copy":
            # The example question of this prompt's own seed, copied as an answer.
            icl = next(s["icl_query_1"] for s in SEEDS if s["icl_query_1"] in prompt)
            bad = {"question": "What is asked in the example?", "answer": icl}
        else:
            bad = {"question": "Is it an echo?", "answer": "Is it an echo?"}
        return completion(orjson.dumps({"pairs": [*good, bad]}).decode())


async def test_junk_over_http_is_rejected_counted_and_asked_again(tmp_path: Path) -> None:
    plan = JunkPlan()
    expected = plan.expected
    run = await faulted_run(tmp_path, plan)
    rejected = {stage: counts for stage, counts in run.stats.rejected.items() if counts}
    assert rejected == expected
    # Every rejection cost exactly one more request; the output is complete and clean.
    assert run.stats.teacher.requests_sent == TOTAL + sum(c.total() for c in expected.values())
    assert_complete_output(tmp_path)
    junk = {"]", "][", "{{}}", "{{JSON }}", "questions", "Answer", INSTRUCTION, "Is it an echo?",
            "What is fixed?", *(s["icl_query_1"] for s in SEEDS)}  # fmt: skip
    for gen_type in EXPECTED_PER_DOC:
        for record in read_gen(tmp_path, gen_type):
            assert not {record["question"], record["response"], record["document"]} & junk
            assert "<example_document>" not in record["question"]
    # The good summaries in the replies that also held junk were kept.
    documents = {r["document"] for r in read_gen(tmp_path, "extractive_summary")}
    assert {summary_of(DOCS[0], 0), summary_of(DOCS[0], 1)} <= documents


async def test_junk_over_http_that_persists_is_in_failures_with_its_check(tmp_path: Path) -> None:
    def plan(seen: Seen) -> Outcome:
        if seen.prompt.startswith("Answer the question below") and doc_index(seen) == 0:
            return completion('{"answer": "]["}')
        return None

    run = await faulted_run(tmp_path, plan)
    lines = failure_lines(tmp_path)
    assert len(lines) == 4  # doc 0's four document answers
    assert {(f["stage"], f["kind"], f["check"], f["attempts"]) for f in lines} == {
        ("document_based_qa/answer", "invalid_reply", "no_letters", 3)
    }
    assert all("][" in f["body_excerpt"] for f in lines)
    assert run.stats.rejected["document_based_qa/answer"] == Counter({"no_letters": 12})
    records = read_gen(tmp_path, "document_based_qa")
    assert len(records) == 2 * 4 and all(r["response"] != "][" for r in records)
    # Everything else of the same run is complete.
    for gen_type in ("extractive_summary", "detailed_summary", "key_facts_to_qa"):
        assert len(read_gen(tmp_path, gen_type)) == len(DOCS) * EXPECTED_PER_DOC[gen_type]


async def test_the_good_items_of_a_list_that_never_comes_clean_are_kept() -> None:
    """Asked three times, the questions always hold one junk item: the four good ones of the
    best try are kept, the junk one is the unit's failure, with its check."""
    good = [f"Which step of photosynthesis is number {i}?" for i in range(4)]

    def script(request: ChatRequest) -> ChatReply | None:
        if request.stage.endswith("/questions"):
            return reply({"questions": [good[0], "]", *good[1:]]})
        return None

    result, tally = await run("document_based_qa", FakeTeacher(script))
    assert [r.question for r in result.records] == good
    (failure,) = result.failures
    assert (failure.stage, failure.item, failure.check, failure.attempts) == (
        "document_based_qa/questions",
        "questions",
        "no_letters",
        3,
    )
    assert failure.message.startswith("kept 4 of 5 items; left out: questions[1]: no letter")
    assert tally[("document_based_qa/questions", "no_letters")] == 3
