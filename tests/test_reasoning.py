from __future__ import annotations

import json

import pytest

from engine.errors import InvalidReply
from engine.flows.ask import Ask, Asker
from engine.reasoning import answer_of, split_inline
from engine.structured import Answer
from engine.teacher import Choice, Message
from tests.fakes import FakeTeacher, text_reply

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
