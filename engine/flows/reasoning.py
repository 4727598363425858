"""Where a teacher put its answer and its reasoning; the answer parsed from where it is.

Reasoning models lay out a reply in several ways, all met in practice:

- a reasoning parser on the server moves the reasoning to ``message.reasoning_content``
  (older vLLM, SGLang, DeepSeek's API), ``message.reasoning`` (newer vLLM, OpenRouter) or
  ``thinking`` blocks of the content (Mistral's API), and ``content`` is the answer;
- with guided decoding and a reasoning parser, vLLM has returned ``content: null`` and the
  JSON answer inside ``reasoning_content`` (vllm #16182);
- without a reasoning parser the thinking is inline, before the answer, between tags:
  ``<think>`` (DeepSeek-R1, QwQ, Qwen3, GLM, MiniMax, Hunyuan, ERNIE), ``<seed:think>``
  (Seed-OSS), ``[THINK]`` (Magistral), ``◁think▷`` (Kimi), ``<|START_THINKING|>`` (Command
  A), ``<|channel>`` (Gemma 4), ``<|begin_of_thought|>`` (Sky-T1, OpenThoughts), gpt-oss's
  analysis channel, Granite's "Here is my thought process:", or a prompted ``<thinking>``,
  ``<reasoning>``, ``<thought>``;
- when the chat template writes the opening tag (DeepSeek-R1, Qwen3 thinking models), the
  reply has only the closing one, and everything before it is reasoning;
- a reply cut off at ``max_tokens`` while thinking has an opening tag and nothing after.

The answer is what gets parsed and the reasoning is kept as reasoning, never the other way
round: only when no answer text is left outside the reasoning is the answer looked for in
it, as the last JSON value there that validates (where #16182 puts it), and never in
reasoning cut off by ``max_tokens``. When no answer is found, the ``InvalidReply`` says
where the text went.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from engine.errors import InvalidReply
from engine.flows.structured import EXCERPT_CHARS, find_reply, parse_reply
from engine.teacher.protocol import Choice

T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Delimiters:
    """How one family of models sets its inline reasoning apart."""

    opening: str  # as messages name it
    closing: str
    open_re: re.Pattern[str]
    close_re: re.Pattern[str]
    # A closing tag without an opening one ends reasoning that the chat template opened.
    template_opens: bool = True


def _tags(opening: str, closing: str) -> Delimiters:
    def exact(tag: str) -> re.Pattern[str]:
        return re.compile(re.escape(tag), re.IGNORECASE)

    return Delimiters(opening, closing, exact(opening), exact(closing))


DELIMITERS: tuple[Delimiters, ...] = (
    _tags("<think>", "</think>"),
    _tags("<thinking>", "</thinking>"),
    _tags("<reasoning>", "</reasoning>"),
    _tags("<thought>", "</thought>"),
    _tags("<seed:think>", "</seed:think>"),
    _tags("[THINK]", "[/THINK]"),
    _tags("◁think▷", "◁/think▷"),
    _tags("<|START_THINKING|>", "<|END_THINKING|>"),
    _tags("<|begin_of_thought|>", "<|end_of_thought|>"),
    _tags("<|channel>", "<channel|>"),
    # gpt-oss without a reasoning parser; "<|end|>" alone is an end of turn for other models.
    Delimiters(
        "<|channel|>analysis<|message|>",
        "<|end|>",
        re.compile(re.escape("<|channel|>analysis<|message|>")),
        re.compile(re.escape("<|end|>")),
        template_opens=False,
    ),
    Delimiters(
        "Here is my thought process:",
        "Here is my response:",
        re.compile(r"Here(?:'s| is) my thought process:"),
        re.compile(r"Here(?:'s| is) my response:"),
        template_opens=False,
    ),
)

_decoder = json.JSONDecoder(strict=False)


@dataclass(frozen=True, slots=True)
class Inline:
    """A content string split into its answer text and its inline reasoning."""

    answer: str
    reasoning: str
    # How the reasoning was set apart, for messages ("" when there was none), e.g.
    # "inside <think>...</think>", "before </think>", "inside <think>, never closed".
    layout: str = ""
    unclosed: bool = False


def split_inline(content: str) -> Inline:
    """Set inline reasoning apart from the answer in ``content``.

    Reasoning blocks count at the start of the content (after white space), one after
    another; failing that, a closing tag whose opening tag the chat template wrote ends
    the reasoning. A tag inside a content that is one JSON value is text, not a delimiter.
    """
    text = content
    thoughts: list[str] = []
    layout = ""
    while found := _opening_at_start(text):
        delimiters, start = found
        close = delimiters.close_re.search(text, start)
        if close is None:
            thoughts.append(text[start:])
            return Inline("", _join(*thoughts), f"inside {delimiters.opening}, never closed", True)
        thoughts.append(text[start : close.start()])
        text = text[close.end() :]
        layout = f"inside {delimiters.opening}...{delimiters.closing}"
    if not thoughts and (orphan := _template_closing(text)):
        delimiters, close = orphan
        thoughts.append(text[: close.start()])
        text = text[close.end() :]
        layout = f"before {delimiters.closing}"
    return Inline(text, _join(*thoughts), layout)


def _opening_at_start(text: str) -> tuple[Delimiters, int] | None:
    """The delimiters whose opening tag starts ``text`` (after white space), and where the
    reasoning after it begins."""
    lead = len(text) - len(text.lstrip())
    for delimiters in DELIMITERS:
        if match := delimiters.open_re.match(text, lead):
            return delimiters, match.end()
    return None


def _template_closing(text: str) -> tuple[Delimiters, re.Match[str]] | None:
    """The first closing tag of reasoning a chat template opens, unless ``text`` is one JSON
    value (an answer about reasoning models may quote the tags)."""
    hits = [
        (match.start(), delimiters, match)
        for delimiters in DELIMITERS
        if delimiters.template_opens and (match := delimiters.close_re.search(text))
    ]
    if not hits or _is_one_json_value(text):
        return None
    _, delimiters, match = min(hits, key=lambda hit: hit[0])
    return delimiters, match


def _is_one_json_value(text: str) -> bool:
    try:
        _decoder.decode(text.strip())
    except json.JSONDecodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Answered(Generic[T]):
    """A reply's parsed answer and the reasoning behind it ("" when there was none)."""

    value: T
    reasoning: str


def answer_of(choice: Choice, model: type[T]) -> Answered[T]:
    """The answer in ``choice`` as ``model``, and its reasoning, whatever the layout.

    Raises ``InvalidReply``: the answer text's own failure (``no_json``, ``schema``) with the
    reasoning's whereabouts added, or ``no_answer`` when there is no answer text and none in
    the reasoning, saying where the text went.
    """
    inline = split_inline(choice.content)
    field = (choice.reasoning or "").strip()
    if inline.answer.strip():
        try:
            value = parse_reply(inline.answer, model)
        except InvalidReply as err:
            raise _with_whereabouts(err, choice, inline, field) from None
        return Answered(value, _join(field, inline.reasoning))
    return _from_reasoning(choice, inline, field, model)


def _from_reasoning(choice: Choice, inline: Inline, field: str, model: type[T]) -> Answered[T]:
    """No answer text outside the reasoning: the last valid JSON value inside it, unless the
    reasoning was cut off by max_tokens."""
    tried: list[str] = []
    if choice.finish_reason != "length":
        places = [(field, True, choice.reasoning_field)]
        if inline.unclosed:
            places.append((inline.reasoning, False, inline.layout))
        for text, in_field, where in places:
            if not text:
                continue
            try:
                value, start, end = find_reply(text, model, last=True)
            except InvalidReply as err:
                tried.append(f"{len(text)} chars {_in(where)}, {_nothing_there(err)}")
                continue
            rest = text[:start] + text[end:]
            reasoning = _join(rest, inline.reasoning) if in_field else _join(field, rest)
            return Answered(value, reasoning)
    raise _no_answer(choice, inline, field, tried)


def _no_answer(choice: Choice, inline: Inline, field: str, tried: list[str]) -> InvalidReply:
    if inline.unclosed:
        parts = [f"everything is {inline.layout} ({len(inline.reasoning)} chars)"]
    elif inline.reasoning:
        parts = [f"nothing after the reasoning ({len(inline.reasoning)} chars {inline.layout})"]
    else:
        parts = ["content empty"]
    if tried:
        parts += tried
    elif field:
        parts.append(f"{len(field)} chars {_in(choice.reasoning_field)}")
    elif not inline.reasoning:
        parts.append("no reasoning either")
    parts.append(f"finish_reason={choice.finish_reason}")
    excerpt = (field or inline.reasoning)[:EXCERPT_CHARS]
    return InvalidReply("no answer: " + "; ".join(parts), check="no_answer", body=excerpt)


def _with_whereabouts(
    err: InvalidReply, choice: Choice, inline: Inline, field: str
) -> InvalidReply:
    """``err`` (about the answer text) with where the reasoning was, if there was any."""
    notes = []
    if inline.reasoning:
        notes.append(f"{len(inline.reasoning)} chars of reasoning {inline.layout} set apart")
    if field:
        notes.append(f"{len(field)} chars {_in(choice.reasoning_field)}")
    if not notes:
        return err
    return InvalidReply(f"{err} ({'; '.join(notes)})", check=err.check, body=err.body)


def _in(where: str) -> str:
    return where if where.startswith("inside") else f"in {where}"


def _nothing_there(err: InvalidReply) -> str:
    if err.check == "no_json":
        return "no JSON there"
    return "its JSON " + str(err).removeprefix("reply ")


def _join(*parts: str) -> str:
    return "\n\n".join(part.strip() for part in parts if part.strip())
