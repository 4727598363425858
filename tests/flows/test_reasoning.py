from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.errors import InvalidReply
from engine.flows.ask import Ask, Asker
from engine.flows.reasoning import answer_of, split_inline
from engine.flows.structured import Answer
from engine.output.checkpoint import FAILURES_FILE
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.teacher.protocol import Choice, Message
from engine.testing.simulator import DRAFT_MARK, ReasoningLayout, SimulatorConfig, running_simulator
from tests.support.fakes import FakeTeacher, text_reply
from tests.support.runs import assert_complete_output, config_for, read_gen, seed_count

A = json.dumps({"answer": "final"})
DRAFT = json.dumps({"answer": "draft"})


# --- inline reasoning: (content, answer text, reasoning, layout) -----------------------------


@pytest.mark.parametrize(
    ("content", "answer", "reasoning", "layout"),
    [
        (A, A, "", ""),
        (f"<think>I weigh {DRAFT}</think>\n{A}", f"\n{A}", f"I weigh {DRAFT}", "<think>"),
        (f" \n<think>t</think>{A}", A, "t", "<think>"),
        (f"<THINK>t</Think>{A}", A, "t", "<think>"),
        (f"<thinking>t</thinking>{A}", A, "t", "<thinking>"),
        (f"<reasoning>t</reasoning>{A}", A, "t", "<reasoning>"),
        (f"<thought>t</thought>{A}", A, "t", "<thought>"),
        (f"<seed:think>t</seed:think>{A}", A, "t", "<seed:think>"),  # Seed-OSS
        (f"[THINK]t[/THINK]{A}", A, "t", "[THINK]"),  # Magistral
        (f"◁think▷t◁/think▷{A}", A, "t", "◁think▷"),  # Kimi
        (  # Command A Reasoning
            f"<|START_THINKING|>t<|END_THINKING|><|START_RESPONSE|>{A}<|END_RESPONSE|>",
            f"<|START_RESPONSE|>{A}<|END_RESPONSE|>",
            "t",
            "<|START_THINKING|>",
        ),
        (  # Sky-T1, OpenThoughts
            f"<|begin_of_thought|>t<|end_of_thought|>{A}",
            A,
            "t",
            "<|begin_of_thought|>",
        ),
        (f"<|channel>thought\nt<channel|>{A}", A, "thought\nt", "<|channel>"),  # Gemma 4
        (  # gpt-oss served without a reasoning parser
            f"<|channel|>analysis<|message|>t<|end|><|start|>assistant<|channel|>final"
            f"<|message|>{A}<|return|>",
            f"<|start|>assistant<|channel|>final<|message|>{A}<|return|>",
            "t",
            "<|channel|>analysis<|message|>",
        ),
        (  # Granite 3.2
            f"Here is my thought process:\nt\nHere is my response:\n{A}",
            f"\n{A}",
            "t",
            "Here is my thought process:",
        ),
        (f"Here's my thought process: t Here's my response: {A}", f" {A}", "t", "Here is my"),
        (  # Hunyuan: the answer in its own tags after the thinking
            f"<think>t</think>\n<answer>{A}</answer>",
            f"\n<answer>{A}</answer>",
            "t",
            "<think>",
        ),
        (f"<think>a</think><think>b</think>{A}", A, "a\n\nb", "<think>"),  # one after another
    ],
)
def test_reasoning_blocks_at_the_start_are_set_apart(
    content: str, answer: str, reasoning: str, layout: str
) -> None:
    got = split_inline(content)
    assert (got.answer, got.reasoning, got.unclosed) == (answer, reasoning, False)
    assert layout in got.layout if layout else got.layout == ""


@pytest.mark.parametrize(
    ("content", "answer", "reasoning", "closing"),
    [
        # The chat template wrote <think> (DeepSeek-R1, Qwen3 thinking models).
        (f"I weigh {DRAFT}\n</think>\n\n{A}", f"\n\n{A}", f"I weigh {DRAFT}", "</think>"),
        (f"t</seed:think>{A}", A, "t", "</seed:think>"),
        (f"t<channel|>{A}", A, "t", "<channel|>"),
        (f"t</thinking>{A}", A, "t", "</thinking>"),
    ],
)
def test_a_closing_tag_alone_ends_reasoning_the_template_opened(
    content: str, answer: str, reasoning: str, closing: str
) -> None:
    got = split_inline(content)
    assert (got.answer, got.reasoning, got.layout) == (answer, reasoning, f"before {closing}")


@pytest.mark.parametrize(
    "content",
    [
        json.dumps({"answer": "R1 ends its thinking with </think> and then answers."}),
        json.dumps({"answer": "<think> opens it"}),
        "Sure, " + json.dumps({"answer": "the model writes <think> first"}),
        f"{A}<|end|>",  # an end of turn, not reasoning
        f"Here is my response: {A}",
        "The tag <think> is how it starts.",
    ],
)
def test_tags_that_are_not_delimiters_are_text(content: str) -> None:
    got = split_inline(content)
    assert (got.answer, got.reasoning, got.layout) == (content, "", "")


def test_an_opening_tag_never_closed_is_all_reasoning() -> None:
    got = split_inline(f"<think>I weigh {DRAFT} and then")
    assert (got.answer, got.reasoning, got.unclosed) == ("", f"I weigh {DRAFT} and then", True)
    assert got.layout == "inside <think>, never closed"


# --- the answer and the reasoning of a choice ----------------------------------------------


@pytest.mark.parametrize(
    ("choice", "reasoning"),
    [
        (Choice(A), ""),
        (Choice(A, reasoning="R", reasoning_field="reasoning_content"), "R"),
        # vllm #16182: guided decoding with a reasoning parser, the answer in the reasoning.
        (Choice("", reasoning=A, reasoning_field="reasoning_content"), ""),
        (
            Choice("", reasoning=f"First {DRAFT}, then: {A}. Done.", reasoning_field="reasoning"),
            f"First {DRAFT}, then: . Done.",
        ),
        (Choice(f"<think>I weigh {DRAFT}</think>{A}"), f"I weigh {DRAFT}"),
        (Choice(f"I weigh {DRAFT}</think>{A}"), f"I weigh {DRAFT}"),
        (Choice(f"<think>T</think>{A}", reasoning="F"), "F\n\nT"),
        (Choice(f"<think>T {A}", finish_reason="stop"), "T"),  # closed by the end of the reply
        (Choice(f"Here it is: {A} {DRAFT}"), ""),  # in the answer text, the first one counts
    ],
)
def test_the_answer_is_parsed_and_the_reasoning_kept(choice: Choice, reasoning: str) -> None:
    got = answer_of(choice, Answer)
    assert (got.value.answer, got.reasoning) == ("final", reasoning)


@pytest.mark.parametrize(
    ("choice", "check", "message", "body"),
    [
        (
            Choice(
                "",
                reasoning="I thought a lot.",
                reasoning_field="reasoning_content",
                finish_reason="stop",
            ),
            "no_answer",
            "no answer: content empty; 16 chars in reasoning_content, no JSON there; "
            "finish_reason=stop",
            "I thought a lot.",
        ),
        (
            Choice("", reasoning='{"wrong": 1}', reasoning_field="reasoning"),
            "no_answer",
            "content empty; 12 chars in reasoning, its JSON does not match Answer: "
            "answer: Field required",
            '{"wrong": 1}',
        ),
        (
            Choice("", finish_reason="stop"),
            "no_answer",
            "no answer: content empty; no reasoning either; finish_reason=stop",
            "",
        ),
        (  # cut off while thinking: a draft there is not the answer
            Choice(f"<think>T {DRAFT}", finish_reason="length"),
            "no_answer",
            "no answer: everything is inside <think>, never closed (21 chars); "
            "finish_reason=length",
            f"T {DRAFT}",
        ),
        (
            Choice("", reasoning=A, reasoning_field="reasoning_content", finish_reason="length"),
            "no_answer",
            "content empty; 19 chars in reasoning_content; finish_reason=length",
            A,
        ),
        (  # the thinking was closed: the answer belonged after it, not inside
            Choice(f"<think>{DRAFT}</think>"),
            "no_answer",
            "no answer: nothing after the reasoning (19 chars inside <think>...</think>)",
            DRAFT,
        ),
        (
            Choice("<think>T</think>Sorry, no JSON today."),
            "no_json",
            "no JSON value in the reply (21 chars) (1 chars of reasoning inside "
            "<think>...</think> set apart)",
            "Sorry, no JSON today.",
        ),
    ],
)
def test_a_missing_answer_says_where_the_text_went(
    choice: Choice, check: str, message: str, body: str
) -> None:
    with pytest.raises(InvalidReply) as caught:
        answer_of(choice, Answer)
    assert (caught.value.check, caught.value.body) == (check, body)
    assert message in str(caught.value)


async def test_a_reply_cut_off_while_thinking_is_a_cut_off_failure_saying_so() -> None:
    teacher = FakeTeacher(lambda _r: text_reply("<think>Let me see", finish_reason="length"))
    asker = Asker(teacher, mode="json_schema", attempts=2, supports_n=True)
    ask = Ask("x/answer", (Message("user", "Q?"),), Answer, 0.7, 64)
    with pytest.raises(InvalidReply) as caught:
        await asker.one(ask)
    assert caught.value.check == "cut_off"
    assert str(caught.value) == (
        "cut off at max_tokens=64: no answer: everything is inside <think>, never closed "
        "(10 chars); finish_reason=length"
    )


# --- over HTTP: every layout, a whole run ----------------------------------------------------

# Where Module 4 reads each type's reasoning (see test_module4.py).
REASONING_OF = {
    "extractive_summary": "parse_response_dict_reasoning_content",
    "detailed_summary": "parse_response_dict_reasoning_content",
    "key_facts_to_qa": "reasoning",
    "document_based_qa": "reasoning",
}
TAGS = [
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("<reasoning>", "</reasoning>"),
    ("<seed:think>", "</seed:think>"),
    ("[THINK]", "[/THINK]"),
    ("◁think▷", "◁/think▷"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
    ("<|channel|>analysis<|message|>", "<|end|>"),
    ("Here is my thought process:", "Here is my response:"),
]
LAYOUTS = [
    pytest.param("field", {"reasoning_field": "reasoning_content"}, "json_schema", id="field"),
    pytest.param("field", {"reasoning_field": "reasoning"}, "json_schema", id="field-newer"),
    pytest.param("thinking_blocks", {}, "json_schema", id="thinking-blocks"),
    *(
        pytest.param("inline", {"think_tags": tags}, "json_schema", id=f"inline-{tags[0]}")
        for tags in TAGS
    ),
    pytest.param("inline", {}, "text", id="inline-text-mode"),
    pytest.param("template_opened", {}, "json_schema", id="template-opened"),
    pytest.param(
        "template_opened",
        {"think_tags": ("<seed:think>", "</seed:think>")},
        "text",
        id="template-opened-seed-text-mode",
    ),
]


async def generate(out: Path, sim_config: SimulatorConfig, mode: str = "json_schema") -> Stats:
    stats = Stats()
    async with running_simulator(sim_config) as sim:
        config = config_for(sim.base_url, out, f'teacher.structured_output="{mode}"')
        await run_job(config, stats)
    return stats


@pytest.mark.parametrize(("layout", "knobs", "mode"), LAYOUTS)
async def test_each_layout_gives_answers_as_records_and_thinking_as_reasoning(
    tmp_path: Path, layout: ReasoningLayout, knobs: dict[str, Any], mode: str
) -> None:
    await generate(tmp_path, SimulatorConfig(reasoning_layout=layout, **knobs), mode)
    assert_complete_output(tmp_path)  # every record there, no failure
    for gen_type, field in REASONING_OF.items():
        for record in read_gen(tmp_path, gen_type):
            # The thinking, with the draft answer it holds, is the record's reasoning...
            assert record[field].startswith("Let me think this through.")
            assert DRAFT_MARK in record[field]
            # ... and never its answer, question or grounding document.
            for name in ("document", "question", "response", "key_fact"):
                assert DRAFT_MARK not in record.get(name, ""), (gen_type, name)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_json_answer_in_the_reasoning_field_is_the_answer(tmp_path: Path, field: str) -> None:
    # vllm #16182: guided decoding with a reasoning parser, content null.
    await generate(
        tmp_path, SimulatorConfig(reasoning_layout="answer_in_field", reasoning_field=field)
    )
    assert_complete_output(tmp_path)
    for gen_type, name in REASONING_OF.items():
        assert all(r[name] == "" for r in read_gen(tmp_path, gen_type))  # it held only the answer


async def test_a_teacher_cut_off_while_thinking_loses_each_item_saying_where(
    tmp_path: Path,
) -> None:
    stats = await generate(tmp_path, SimulatorConfig(reasoning_layout="cut_off"))
    assert sum(stats.records.values()) == 0
    failures = [orjson.loads(line) for line in (tmp_path / FAILURES_FILE).read_bytes().splitlines()]
    assert len(failures) == seed_count() * len(REASONING_OF)  # the first stage of every unit
    for failure in failures:
        assert (failure["check"], failure["attempts"]) == ("cut_off", 3)
        assert "no answer: everything is inside <think>, never closed" in failure["message"]
        assert "finish_reason=length" in failure["message"]
        assert failure["body_excerpt"].startswith("Let me think this through.")
