from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from engine.config import Config
from engine.errors import AuthError, RequestRejected
from engine.flows import build_flows
from engine.flows.structured import Mode
from engine.output.records import UnitResult
from engine.teacher.protocol import ChatReply, ChatRequest
from tests.support.fakes import (
    FakeTeacher,
    last_user_text,
    make_config,
    make_seed,
    reply,
    text_reply,
)

SEED = make_seed()
SUMMARY = "extractive_summary"


def summary_config(summaries: int = 3, questions: int = 2, **gen: Any) -> Config:
    teacher = gen.pop("teacher", None)
    retry = gen.pop("retry", None)
    return make_config(
        teacher=teacher,
        retry=retry,
        types=[SUMMARY],
        extractive_summary={"summaries": summaries, "questions_per_summary": questions},
        **gen,
    )


async def run(config: Config, teacher: FakeTeacher, gen_type: str = SUMMARY) -> UnitResult:
    # A flow that waits on itself deadlocks: fail in a second instead of at the suite timeout.
    async with asyncio.timeout(5):
        return await build_flows(config, teacher)[gen_type].run(SEED)


def paths(result: UnitResult) -> list[str]:
    return [r.id.split("-", 2)[2] for r in result.records]


def stage_is(request: ChatRequest, name: str) -> bool:
    return request.stage.endswith("/" + name)


# --- summary flows ------------------------------------------------------------------------


async def test_summary_flow_makes_n_summaries_times_q_pairs() -> None:
    teacher = FakeTeacher()
    result = await run(summary_config(summaries=3, questions=2), teacher)

    assert paths(result) == [f"s00{i}-q0{j}" for i in range(3) for j in range(2)]
    assert len({r.document for r in result.records}) == 3
    assert result.failures == [] and result.judged_out == 0
    assert [r.n for r in teacher.sent("/summary")] == [3]
    assert len(teacher.sent("/questions")) == 3
    assert len(teacher.sent("/answer")) == 6
    assert {r.stage for r in teacher.requests} == {
        "extractive_summary/summary",
        "extractive_summary/questions",
        "extractive_summary/answer",
    }


async def test_summary_flow_knobs_per_stage() -> None:
    config = make_config(
        types=[SUMMARY],
        extractive_summary={
            "summaries": 2,
            "questions_per_summary": 1,
            "temperature": 0.9,
            "max_tokens": 3000,
            "qa_temperature": 0.1,
            "qa_max_tokens": 700,
        },
    )
    teacher = FakeTeacher()
    await run(config, teacher)
    (summary,) = teacher.sent("/summary")
    assert (summary.temperature, summary.max_tokens) == (0.9, 3000)
    for request in teacher.sent("/questions") + teacher.sent("/answer"):
        assert (request.temperature, request.max_tokens, request.n) == (0.1, 700, 1)


async def test_summary_records_are_grounded_in_their_summary() -> None:
    teacher = FakeTeacher()
    result = await run(summary_config(summaries=2, questions=2), teacher)
    answers = [last_user_text(r) for r in teacher.sent("/answer")]
    for record in (r.to_dict() for r in result.records):  # as written, with its field names
        assert record["document"] != SEED.document
        assert record["raw_document"] == SEED.document
        assert record["model"] == "fake-teacher"
        # No reasoning from the teacher: the field is there, empty; no key_fact for summaries.
        assert record["parse_response_dict_reasoning_content"] == ""
        assert "reasoning" not in record and "key_fact" not in record
        grounded = [
            a
            for a in answers
            if f"<document>\n{record['document']}\n</document>" in a
            and f"Question: {record['question']}" in a
        ]
        assert len(grounded) == 1
    questions = [last_user_text(r) for r in teacher.sent("/questions")]
    summaries = {r.document for r in result.records}
    assert all(any(s in q for q in questions) for s in summaries)


async def test_extractive_and_detailed_use_their_own_prompts() -> None:
    config = make_config(
        types=["extractive_summary", "detailed_summary"],
        extractive_summary={"summaries": 1, "questions_per_summary": 1},
        detailed_summary={"summaries": 1, "questions_per_summary": 1},
    )
    teacher = FakeTeacher()
    flows = build_flows(config, teacher)
    extractive = await flows["extractive_summary"].run(SEED)
    detailed = await flows["detailed_summary"].run(SEED)
    (ext_req,) = teacher.sent("extractive_summary/summary")
    (det_req,) = teacher.sent("detailed_summary/summary")
    assert "extractive summary" in last_user_text(ext_req)
    assert "detailed summary" in last_user_text(det_req)
    assert extractive.records[0].gen_type == "extractive_summary"
    assert detailed.records[0].gen_type == "detailed_summary"


async def test_question_prompt_carries_the_icl_example_domain_and_outline() -> None:
    teacher = FakeTeacher()
    await run(summary_config(summaries=1, questions=4), teacher)
    (request,) = teacher.sent("/questions")
    text = last_user_text(request)
    for part in (SEED.icl_document, *SEED.icl_queries, SEED.domain, SEED.document_outline):
        assert part in text
    assert "exactly 4 questions" in text


async def test_without_n_support_summaries_are_separate_requests() -> None:
    teacher = FakeTeacher()
    config = summary_config(summaries=3, questions=2, teacher={"supports_n": False})
    result = await run(config, teacher)
    requests = teacher.sent("/summary")
    assert [r.n for r in requests] == [1, 1, 1]
    assert len(result.records) == 6
    assert len({r.document for r in result.records}) == 3
    # A server deterministic in the prompt must not answer the same thing three times.
    assert len({last_user_text(r) for r in requests}) == 3


async def test_fewer_choices_than_asked_are_topped_up() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "summary") and len(teacher.sent("/summary")) == 1:
            return reply({"summary": "only one"})
        return None

    teacher = FakeTeacher(script)
    result = await run(summary_config(summaries=3, questions=1), teacher)
    assert [r.n for r in teacher.sent("/summary")] == [3, 2]
    assert len(result.records) == 3
    assert len({r.document for r in result.records}) == 3
    assert result.failures == []


async def test_a_server_ignoring_n_costs_no_invalid_attempts() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "summary"):
            return reply({"summary": f"Plants make sugar (take {len(teacher.sent('/summary'))})."})
        return None

    teacher = FakeTeacher(script)
    result = await run(
        summary_config(summaries=4, questions=1, retry={"invalid_reply_attempts": 1}), teacher
    )
    assert [r.n for r in teacher.sent("/summary")] == [4, 3, 2, 1]
    assert len(result.records) == 4 and result.failures == []


async def test_duplicate_summaries_are_asked_again() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "summary") and len(teacher.sent("/summary")) == 1:
            return reply({"summary": "same"}, {"summary": "same"}, {"summary": "other"})
        return None

    teacher = FakeTeacher(script)
    result = await run(summary_config(summaries=3, questions=1), teacher)
    assert [r.n for r in teacher.sent("/summary")] == [3, 1]
    assert len({r.document for r in result.records}) == 3


async def test_invalid_choices_are_kept_apart_from_valid_ones() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "summary") and len(teacher.sent("/summary")) == 1:
            return text_reply('{"summary": "good"}', "oops", '{"summary": ""}')
        return None

    teacher = FakeTeacher(script)
    result = await run(summary_config(summaries=3, questions=1), teacher)
    assert [r.n for r in teacher.sent("/summary")] == [3, 2]
    assert "good" in {r.document for r in result.records}
    assert len(result.records) == 3


async def test_invalid_reply_is_retried_then_recorded_with_attempts() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        # The questions for the second summary never parse.
        if stage_is(request, "questions") and "r1c1.summary" in last_user_text(request):
            return text_reply("Sorry, I can't produce JSON today.")
        return None

    teacher = FakeTeacher(script)
    result = await run(summary_config(summaries=3, questions=2), teacher)

    assert paths(result) == ["s000-q00", "s000-q01", "s002-q00", "s002-q01"]
    (failure,) = result.failures
    assert (failure.stage, failure.item, failure.kind) == (
        "extractive_summary/questions",
        "s001",
        "invalid_reply",
    )
    assert failure.attempts == 3
    assert failure.body_excerpt == "Sorry, I can't produce JSON today."
    assert failure.check == "no_json"
    retried = [r for r in teacher.sent("/questions") if "r1c1.summary" in last_user_text(r)]
    assert len(retried) == 3
    assert "rejected" not in last_user_text(retried[0])
    assert all("rejected" in last_user_text(r) for r in retried[1:])
    # Every re-ask differs (a cache or a deterministic server would repeat the same reply),
    # and no reply that failed is left in a cache for a rerun to replay.
    assert len({last_user_text(r) for r in retried}) == 3
    assert teacher.forgotten == retried


async def test_invalid_reply_attempts_follow_the_config() -> None:
    teacher = FakeTeacher(lambda r: text_reply("nope") if stage_is(r, "answer") else None)
    config = summary_config(summaries=1, questions=1, retry={"invalid_reply_attempts": 2})
    result = await run(config, teacher)
    (failure,) = result.failures
    assert (failure.stage, failure.item, failure.attempts) == (
        "extractive_summary/answer",
        "s000/q00",
        2,
    )
    assert len(teacher.sent("/answer")) == 2 and result.records == []


async def test_one_invalid_reply_then_a_valid_one_loses_nothing() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "answer") and len(teacher.sent("/answer")) == 1:
            return text_reply('{"answer": ', finish_reason="length")
        return None

    teacher = FakeTeacher(script)
    result = await run(summary_config(summaries=2, questions=2), teacher)
    assert len(result.records) == 4 and result.failures == []
    assert len(teacher.sent("/answer")) == 5
    assert "cut off at max_tokens" in last_user_text(teacher.sent("/answer")[1])


async def test_lost_request_loses_only_its_branch() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "answer") and len(teacher.sent("/answer")) == 1:
            raise RequestRejected("HTTP 400: context too long", status=400, body="too long")
        return None

    teacher = FakeTeacher(script)
    result = await run(summary_config(summaries=2, questions=2), teacher)
    assert paths(result) == ["s000-q01", "s001-q00", "s001-q01"]
    (failure,) = result.failures
    assert (failure.stage, failure.item, failure.kind, failure.status) == (
        "extractive_summary/answer",
        "s000/q00",
        "request_rejected",
        400,
    )
    assert failure.body_excerpt == "too long"
    assert len(teacher.sent("/answer")) == 4  # not retried: the client already did


async def test_lost_summary_request_is_one_failure() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "summary"):
            raise RequestRejected("HTTP 413", status=413)
        return None

    result = await run(summary_config(summaries=3, questions=2), FakeTeacher(script))
    assert result.records == []
    (failure,) = result.failures
    assert (failure.stage, failure.item) == ("extractive_summary/summary", "s000,s001,s002")


async def test_lost_separate_summary_loses_only_that_summary() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "summary") and "Variant 2 of 3" in last_user_text(request):
            raise RequestRejected("HTTP 400", status=400)
        return None

    config = summary_config(summaries=3, questions=2, teacher={"supports_n": False})
    result = await run(config, FakeTeacher(script))
    assert paths(result) == ["s000-q00", "s000-q01", "s002-q00", "s002-q01"]
    (failure,) = result.failures
    assert (failure.stage, failure.item) == ("extractive_summary/summary", "s001")


async def test_fatal_error_propagates_unwrapped() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "answer"):
            raise AuthError("http://x/v1", 401)
        return None

    with pytest.raises(AuthError):
        await run(summary_config(summaries=2, questions=2), FakeTeacher(script))


async def test_fatal_error_cancels_the_branches_still_waiting() -> None:
    never = asyncio.Event()

    async def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "answer") and len(teacher.sent("/answer")) == 3:
            raise AuthError("http://x/v1", 403)
        if stage_is(request, "answer"):
            await never.wait()
        return None

    teacher = FakeTeacher(script)
    with pytest.raises(AuthError):
        await run(summary_config(summaries=2, questions=2), teacher)


# --- judge, reasoning, model ----------------------------------------------------------


async def test_judge_drops_unfaithful_pairs_and_counts_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "judge"):
            unfaithful = "questions[1]" in last_user_text(request)
            return reply({"faithful": not unfaithful, "reason": "adds a date not in the text"})
        return None

    teacher = FakeTeacher(script)
    caplog.set_level(logging.INFO, logger="engine.flows")
    result = await run(summary_config(summaries=2, questions=2, judge=True), teacher)

    assert paths(result) == ["s000-q00", "s001-q00"]
    assert result.judged_out == 2 and result.failures == []
    judges = teacher.sent("/judge")
    assert len(judges) == 4
    assert all((r.temperature, r.max_tokens, r.n) == (0.0, 512, 1) for r in judges)
    assert "adds a date not in the text" in caplog.text


async def test_judge_sees_the_grounding_document() -> None:
    teacher = FakeTeacher()
    result = await run(summary_config(summaries=1, questions=1, judge=True), teacher)
    (judge,) = teacher.sent("/judge")
    (record,) = result.records
    text = last_user_text(judge)
    assert record.document in text and record.question in text
    assert record.response in text


async def test_lost_judge_request_is_a_failure_not_a_record() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "judge") and len(teacher.sent("/judge")) == 1:
            raise RequestRejected("HTTP 400", status=400)
        return None

    teacher = FakeTeacher(script)
    result = await run(summary_config(summaries=1, questions=2, judge=True), teacher)
    assert paths(result) == ["s000-q01"]
    (failure,) = result.failures
    assert (failure.stage, failure.item) == ("extractive_summary/judge", "s000/q00")


async def test_judge_is_off_by_default() -> None:
    teacher = FakeTeacher()
    await run(summary_config(summaries=1, questions=1), teacher)
    assert teacher.sent("/judge") == []


async def test_reasoning_and_model_come_from_the_answer_reply() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "summary"):
            return reply({"summary": "S"}, reasoning="summary thoughts")
        if stage_is(request, "answer"):
            return reply({"answer": "A"}, reasoning="answer thoughts", model="teacher-v2")
        return None

    result = await run(summary_config(summaries=1, questions=2), FakeTeacher(script))
    got = [
        (r["parse_response_dict_reasoning_content"], r["model"], r["response"])
        for r in (record.to_dict() for record in result.records)
    ]
    assert got == [("answer thoughts", "teacher-v2", "A")] * 2


async def test_key_facts_reasoning_comes_from_the_qa_reply() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "qa"):
            pair = {"question": "What does the fact say?", "answer": "A."}
            return reply({"pairs": [pair]}, reasoning="qa thoughts")
        return None

    config = make_config(types=["key_facts_to_qa"], key_facts_to_qa={"max_facts": 2})
    result = await run(config, FakeTeacher(script), "key_facts_to_qa")
    assert [r.to_dict()["reasoning"] for r in result.records] == ["qa thoughts"] * 2


# --- no stage barriers ------------------------------------------------------------------


async def test_a_summary_branch_goes_on_while_another_summary_is_pending() -> None:
    """Summary 1's reply is held until summary 0's questions have been asked."""
    questions_asked = asyncio.Event()
    log: list[str] = []

    async def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "questions"):
            questions_asked.set()
        elif stage_is(request, "summary") and "Variant 2" in last_user_text(request):
            await questions_asked.wait()
            log.append("summary 1 replied")
        log.append(request.stage.split("/")[1])
        return None

    teacher = FakeTeacher(script)
    config = summary_config(summaries=2, questions=1, teacher={"supports_n": False})
    result = await run(config, teacher)
    assert log.index("questions") < log.index("summary 1 replied")
    assert len(result.records) == 2


async def test_answer_and_judge_run_while_a_summary_top_up_is_pending() -> None:
    judged = asyncio.Event()

    async def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "judge"):
            judged.set()
        elif stage_is(request, "summary"):
            if len(teacher.sent("/summary")) == 1:
                return reply({"summary": "first"})
            await judged.wait()  # the top-up waits for summary 0's pair to be judged
        return None

    teacher = FakeTeacher(script)
    result = await run(summary_config(summaries=2, questions=1, judge=True), teacher)
    assert len(result.records) == 2
    assert [r.n for r in teacher.sent("/summary")] == [2, 1]


async def test_a_fact_is_judged_while_another_facts_qa_is_pending() -> None:
    judged = asyncio.Event()

    async def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "judge"):
            judged.set()
        elif stage_is(request, "qa") and "facts[0]" in last_user_text(request):
            await judged.wait()
        return None

    config = make_config(
        types=["key_facts_to_qa"], judge=True, key_facts_to_qa={"max_facts": 2, "qa_per_fact": 1}
    )
    result = await run(config, FakeTeacher(script), "key_facts_to_qa")
    assert paths(result) == ["f000-p00", "f001-p00"]


async def test_records_are_ordered_by_path_not_by_arrival() -> None:
    last_asked = asyncio.Event()

    async def script(request: ChatRequest) -> ChatReply | None:
        text = last_user_text(request)
        if stage_is(request, "answer") and "questions[2]" in text:
            last_asked.set()
        elif stage_is(request, "answer") and "questions[0]" in text:
            await last_asked.wait()
        return None

    config = make_config(types=["document_based_qa"], document_based_qa={"questions": 3})
    result = await run(config, FakeTeacher(script), "document_based_qa")
    assert paths(result) == ["q000", "q001", "q002"]


# --- key facts and document QA ------------------------------------------------------------


async def test_key_facts_flow() -> None:
    config = make_config(
        types=["key_facts_to_qa"], key_facts_to_qa={"max_facts": 3, "qa_per_fact": 2}
    )
    teacher = FakeTeacher()
    result = await run(config, teacher, "key_facts_to_qa")

    assert paths(result) == [f"f00{i}-p0{j}" for i in range(3) for j in range(2)]
    (facts_request,) = teacher.sent("/key_facts")
    assert (facts_request.temperature, facts_request.n) == (0.2, 1)
    assert facts_request.response_format is not None
    schema = facts_request.response_format["json_schema"]["schema"]
    assert schema["properties"]["facts"]["maxItems"] == 3
    qa_requests = teacher.sent("/qa")
    assert len(qa_requests) == 3 and all(r.temperature == 0.3 for r in qa_requests)
    for record in result.records:
        fact = record.key_fact
        assert record.document.startswith(fact + "\n\n")
        assert record.document.removeprefix(fact + "\n\n").endswith(".context")


async def test_key_facts_lost_qa_loses_one_fact() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "qa") and "facts[1]" in last_user_text(request):
            raise RequestRejected("HTTP 400", status=400)
        return None

    config = make_config(
        types=["key_facts_to_qa"], key_facts_to_qa={"max_facts": 3, "qa_per_fact": 2}
    )
    result = await run(config, FakeTeacher(script), "key_facts_to_qa")
    assert paths(result) == ["f000-p00", "f000-p01", "f002-p00", "f002-p01"]
    assert [(f.stage, f.item) for f in result.failures] == [("key_facts_to_qa/qa", "f001")]


async def test_document_qa_flow() -> None:
    config = make_config(
        types=["document_based_qa"],
        document_based_qa={"questions": 3, "temperature": 0.8, "qa_temperature": 0.2},
    )
    teacher = FakeTeacher()
    result = await run(config, teacher, "document_based_qa")

    assert paths(result) == ["q000", "q001", "q002"]
    assert all(r.document == SEED.document for r in result.records)
    (questions,) = teacher.sent("/questions")
    assert questions.temperature == 0.8
    assert f"<document>\n{SEED.document}\n</document>" in last_user_text(questions)
    assert questions.response_format is not None
    schema = questions.response_format["json_schema"]["schema"]
    assert schema["properties"]["questions"]["maxItems"] == 3
    assert [r.temperature for r in teacher.sent("/answer")] == [0.2] * 3


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "text"])
async def test_structured_output_modes(mode: Mode) -> None:
    config = make_config(
        teacher={"structured_output": mode},
        types=["document_based_qa"],
        document_based_qa={"questions": 2},
    )
    teacher = FakeTeacher()
    result = await run(config, teacher, "document_based_qa")
    assert len(result.records) == 2
    for request in teacher.requests:
        text = last_user_text(request)
        assert "JSON" in text
        fmt = request.response_format
        if mode == "text":
            assert fmt is None
            assert "<schema>" in text and "</schema>" in text
            continue
        assert fmt is not None and fmt["type"] == mode
        assert "<schema>" not in text
        schema = fmt["schema"] if mode == "json_object" else fmt["json_schema"]["schema"]
        assert json.dumps(schema) in text


async def test_text_mode_accepts_fenced_replies() -> None:
    def script(request: ChatRequest) -> ChatReply | None:
        if stage_is(request, "answer"):
            return text_reply('Here you go:\n```json\n{"answer": "fenced"}\n```\nDone.')
        return None

    config = make_config(
        teacher={"structured_output": "text"},
        types=["document_based_qa"],
        document_based_qa={"questions": 1},
    )
    result = await run(config, FakeTeacher(script), "document_based_qa")
    assert [r.response for r in result.records] == ["fenced"]


# --- build_flows ----------------------------------------------------------------------------


def test_build_flows_follows_the_configured_types() -> None:
    teacher = FakeTeacher()
    assert list(build_flows(make_config(), teacher)) == [
        "extractive_summary",
        "detailed_summary",
        "key_facts_to_qa",
        "document_based_qa",
    ]
    flows = build_flows(make_config(types=["document_based_qa", "extractive_summary"]), teacher)
    assert list(flows) == ["document_based_qa", "extractive_summary"]
    assert all(flow.gen_type == name for name, flow in flows.items())
