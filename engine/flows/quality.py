"""Content checks on teacher replies: what must hold of a text besides the reply's schema.

Each check is a named function with a stable code (``InvalidReply.check``, ``failures.jsonl``,
the run report). A ``Gate`` applies them, in ``CHECKS`` order, to every text of one stage's
reply (``texts``); the first that fails names the rejection. Pure: no I/O, no clock; the
unit's memory of accepted texts (``Seen``) is the only state.

No check depends on a language: a letter is any Unicode letter (categories L*), texts are
compared after ``normalise`` (NFKC, case folding, Unicode punctuation and spacing removed;
``engine.text``), and lengths are characters compared with the text the reply was asked about.

Checks (code: what it rejects):

- ``blank``: nothing but spacing.
- ``no_letters``: not one letter of any script (an answer may be a bare number).
- ``field_name``: the whole text is a name from the reply schemas or a word the prompt quotes
  ("questions", "Answer", "Question 1").
- ``template``: template or chat-markup braces (``{{``, ``{%``, ``<|``) the source lacks.
- ``scaffolding``: a tag of the prompt (``<document>``) or a sentence of its instructions.
- ``example_copy``: one of the seed's example questions, or a sentence of its example
  document, that the source itself does not contain.
- ``question_echo``: an answer that is its question again.
- ``length``: too short or too long for what it was made from (see ``QualityConfig``), or a
  question too short to name what it asks about ("a", "Q?").
- ``duplicate``: a question, fact or summary the unit already has from the same source, or
  that the reply holds twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import groupby
from typing import Any, Literal

from pydantic import BaseModel

from engine.config import QualityConfig
from engine.flows.structured import Answer, KeyFacts, QAPairs, Questions, Summary, Verdict
from engine.text import has_digit, letters, normalise, size

Kind = Literal["summary", "question", "answer", "fact", "context"]
EXCERPT_CHARS = 120
# Characters that open or close template or chat markup, rather than prose.
TEMPLATE_MARKS = ("{{", "}}", "{%", "%}", "{#", "#}", "<|", "|>")
# Quoted texts shorter than this are left in the prompt: taking out every "a" would mangle it.
MIN_QUOTED_CHARS = 3
_TAG = re.compile(r"</?[A-Za-z_][\w-]*>")
# Where a name in CamelCase splits into words ("KeyFacts", "QAPair").
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# A word the prompt's instructions quote ('the "questions" list', 'do not refer to "the text"').
_QUOTED = re.compile(r'"([^"\n]{1,40})"')
# Every reply model: a reply that is a name from any of them ("Question" where questions are
# asked) is the format echoed, not content.
REPLY_MODELS: tuple[type[BaseModel], ...] = (Summary, Answer, Questions, KeyFacts, QAPairs, Verdict)
# Where instruction text splits into sentences: full stops, question and exclamation marks of
# several scripts, semicolons and line ends.
_SENTENCE_END = re.compile(r"[.!?;\n\u3002\uff01\uff1f\u0964\u06d4\u061f]+")
# Kinds that must be distinct within their source.
DISTINCT_KINDS: frozenset[str] = frozenset({"summary", "question", "fact"})


# --- normalising ----------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _normalised(text: str) -> str:
    # Grounding texts (a chunk of up to 60,000 characters) recur in every request of a unit;
    # a few hundred of them cover the units in flight without holding a corpus in memory.
    return normalise(text)


@lru_cache(maxsize=256)
def _size(text: str) -> int:
    # The same grounding texts' sizes, for the length bounds of every text made from them.
    return size(text)


def excerpt(text: str, chars: int = EXCERPT_CHARS) -> str:
    """``text`` on one line (spacing collapsed), cut to ``chars`` characters with an ellipsis,
    for messages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: chars - 1] + "…"


# --- what a reply is judged against --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grounding:
    """What a stage was asked about: the texts its reply is judged against.

    ``source``: the text the reply must come from (the chunk, a summary, a fact and its
    context); ``chunk``: the seed's document (markup it contains is no echo); ``question``:
    for answers, the question asked; ``examples`` and ``example_document``: the seed's
    in-context example, which must not be copied; ``quoted``: other seed texts the prompt
    quotes (outline, domain), which are not instructions either.
    """

    source: str
    chunk: str = ""
    question: str = ""
    examples: tuple[str, ...] = ()
    example_document: str = ""
    quoted: tuple[str, ...] = ()

    @property
    def content(self) -> tuple[str, ...]:
        """The texts the prompt quotes (not instructions)."""
        return (
            self.source,
            self.chunk,
            self.question,
            *self.examples,
            self.example_document,
            *self.quoted,
        )


@dataclass(frozen=True, slots=True)
class Scaffolding:
    """The prompt's own parts, that a reply must not echo: its tags, the schema's names and
    the sentences of its instructions (normalised, at least ``echo_min_chars`` long)."""

    tags: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()
    sentences: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        prompt: Sequence[str],
        schema: type[BaseModel] | None,
        grounding: Grounding,
        echo_min_chars: int,
    ) -> Scaffolding:
        """From the prompt's message texts, less what ``grounding`` quotes in them."""
        text = "\n".join(prompt)
        for quoted in sorted(grounding.content, key=len, reverse=True):
            if len(quoted.strip()) >= MIN_QUOTED_CHARS:
                text = text.replace(quoted, "\n")
        return _scaffolding(text, schema, echo_min_chars)


@lru_cache(maxsize=1024)
def _scaffolding(text: str, schema: type[BaseModel] | None, echo_min_chars: int) -> Scaffolding:
    # Once the quoted texts are out, every request of a stage leaves the same instructions.
    sentences: dict[str, None] = {}
    for line in text.splitlines():
        for sentence in _sentences(line):
            if len(sentence) >= echo_min_chars:
                sentences[sentence] = None
    names = set(schema_names(schema)) if schema is not None else set()
    names.update(n for quoted in _QUOTED.findall(text) if (n := normalise(quoted)))
    return Scaffolding(
        tags=frozenset(_TAG.findall(text)),
        names=frozenset(names),
        sentences=tuple(sentences),
    )


@lru_cache(maxsize=4096)
def _sentences(line: str) -> tuple[str, ...]:
    # Instruction lines repeat in every request of a stage: normalised once.
    return tuple(s for part in _SENTENCE_END.split(line) if (s := normalise(part)))


@lru_cache(maxsize=256)
def schema_names(model: type[BaseModel]) -> frozenset[str]:
    """Every field name and title in ``model``'s JSON schema and in the engine's reply models
    (``REPLY_MODELS``), normalised, also split into words ("KeyFacts": "key facts")."""
    return _names_of(model).union(*(_names_of(m) for m in REPLY_MODELS))


@lru_cache(maxsize=256)
def _names_of(model: type[BaseModel]) -> frozenset[str]:
    raw: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict):
                    raw.update(value)
                elif key == "title" and isinstance(value, str):
                    raw.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(model.model_json_schema())
    names = {normalise(n) for n in raw}
    names.update(normalise(_CAMEL.sub(" ", n)) for n in raw)
    return frozenset(n for n in names if n)


# --- the checks -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    """One text of a reply: where it is in the reply, what it is, and what it says."""

    field: str  # e.g. "questions[2]", "pairs[0].answer"
    kind: Kind
    value: str
    question: str = ""  # for an answer inside a pair: its pair's question
    item: int | None = None  # its item's index in a list reply (questions, facts, pairs)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a reply was rejected: the check's code (``CHECKS``), the field (e.g.
    ``"questions[2]"``) and a reason quoting the offending text; ``str()`` is the message."""

    check: str
    field: str
    reason: str
    # For a list reply: the reply without its rejected items (None when none passed), and
    # how many items were rejected.
    partial: BaseModel | None = None
    dropped: int = 0

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Judged:
    """Everything a check may look at for one text."""

    text: Text
    norm: str
    grounding: Grounding
    scaffolding: Scaffolding
    config: QualityConfig
    # Normalised grounding texts, computed once per reply.
    allowed: str
    norm_allowed: str


def blank(j: Judged) -> str | None:
    """Nothing but spacing."""
    return "empty" if not j.text.value.strip() else None


def no_letters(j: Judged) -> str | None:
    """Not one letter of any script; a bare number is an answer all the same."""
    value = j.text.value
    if letters(value):
        return None
    if j.text.kind == "answer" and has_digit(value):
        return None  # "1998", "6 650": a number answers a question
    return f"no letter of any script in {excerpt(value)!r}"


def field_name(j: Judged) -> str | None:
    """The whole text is a name from the reply schemas or a word the prompt quotes."""
    # "Question 1", "2. Answer": a name numbered like a list item is a name all the same.
    words = " ".join(w for w in j.norm.split() if not w.isdecimal())
    if j.norm in j.scaffolding.names or words in j.scaffolding.names:
        return f"{excerpt(j.text.value)!r} is a name from the reply's schema, not content"
    return None


def template(j: Judged) -> str | None:
    """Template or chat-markup marks (``TEMPLATE_MARKS``) that the grounding texts lack."""
    for mark in TEMPLATE_MARKS:
        if mark in j.text.value and mark not in j.allowed:
            return f"template markup {mark!r} in {excerpt(j.text.value)!r}"
    return None


def scaffolding(j: Judged) -> str | None:
    """A tag of the prompt, or a sentence of its instructions, that the grounding lacks."""
    for tag in j.scaffolding.tags:
        if tag in j.text.value and tag not in j.allowed:
            return f"echoes the prompt's {tag} tag"
    for sentence in j.scaffolding.sentences:
        if sentence in j.norm and sentence not in j.norm_allowed:
            return f"echoes the prompt's instructions: {excerpt(sentence, 80)!r}"
    return None


def example_copy(j: Judged) -> str | None:
    """One of the seed's example questions, or a sentence of its example document, that the
    grounding texts do not contain."""
    g = j.grounding
    for query in g.examples:
        q = _normalised(query)
        if q and q in j.norm and q not in j.norm_allowed:
            return f"copies the seed's example question {excerpt(query, 80)!r}"
    for line in g.example_document.splitlines():
        for sentence in _sentences(line):
            if (
                len(sentence) >= j.config.echo_min_chars
                and sentence in j.norm
                and sentence not in j.norm_allowed
            ):
                return f"copies the seed's example document: {excerpt(sentence, 80)!r}"
    return None


def question_echo(j: Judged) -> str | None:
    """An answer that is its question again (after ``normalise``)."""
    if j.text.kind != "answer":
        return None
    question = _normalised(j.text.question or j.grounding.question)
    if question and j.norm == question:
        return "repeats the question instead of answering it"
    return None


def length(j: Judged) -> str | None:
    """Shorter or longer than ``bounds`` allow for the text it was made from (``size``)."""
    low, high = bounds(j.text.kind, _size(j.grounding.source), j.config)
    n = size(j.text.value)
    if n < low:
        return f"{n} characters, fewer than {low} for a {j.text.kind} of this source"
    if n > high:
        return f"{n} characters, more than {high} for a {j.text.kind} of this source"
    return None


def bounds(kind: Kind, source_chars: int, config: QualityConfig) -> tuple[int, int]:
    """The characters a text of ``kind`` may have, made from a source of ``source_chars``."""
    c = config
    floor = c.length_floor_chars
    if kind == "summary":
        low = int(c.summary_min_ratio * source_chars)
        return low, max(floor, int(c.summary_max_ratio * source_chars))
    if kind == "question":
        high = min(c.question_max_chars, max(floor, int(c.question_max_ratio * source_chars)))
        return c.question_min_chars, high
    if kind == "answer":
        return 1, max(floor, int(c.answer_max_ratio * source_chars))
    return 1, max(floor, int(c.fact_max_ratio * source_chars))


Check = Callable[[Judged], str | None]
# In order: the first that fails names the rejection.
CHECKS: tuple[tuple[str, Check], ...] = (
    ("blank", blank),
    ("no_letters", no_letters),
    ("field_name", field_name),
    ("template", template),
    ("scaffolding", scaffolding),
    ("example_copy", example_copy),
    ("question_echo", question_echo),
    ("length", length),
)
CODES: tuple[str, ...] = (*(code for code, _ in CHECKS), "duplicate")


# --- a reply's texts --------------------------------------------------------------------------


def texts(value: BaseModel) -> Iterator[Text]:
    """Every text of a stage's reply that the checks judge, in reply order.

    Knows the reply models of ``engine.flows.structured`` by their field names; a reply with none
    of them (the judge's verdict) has no texts to judge.
    """
    summary = getattr(value, "summary", None)
    if isinstance(summary, str):
        yield Text("summary", "summary", summary)
    answer = getattr(value, "answer", None)
    if isinstance(answer, str):
        yield Text("answer", "answer", answer)
    for i, question in enumerate(getattr(value, "questions", None) or ()):
        yield Text(f"questions[{i}]", "question", question, item=i)
    for i, fact in enumerate(getattr(value, "facts", None) or ()):
        yield Text(f"facts[{i}].fact", "fact", fact.fact, item=i)
        yield Text(f"facts[{i}].context", "context", fact.context, item=i)
    for i, pair in enumerate(getattr(value, "pairs", None) or ()):
        yield Text(f"pairs[{i}].question", "question", pair.question, item=i)
        yield Text(f"pairs[{i}].answer", "answer", pair.answer, question=pair.question, item=i)


LIST_FIELDS = ("questions", "facts", "pairs")


def without_items(value: BaseModel, dropped: set[int]) -> BaseModel | None:
    """``value`` (a list reply) without the items at ``dropped``; None when none is left."""
    for name in LIST_FIELDS:
        items = getattr(value, name, None)
        if isinstance(items, list):
            kept = [item for i, item in enumerate(items) if i not in dropped]
            return value.model_copy(update={name: kept}) if kept else None
    return None


# --- the unit's memory and the gate ----------------------------------------------------------


@dataclass(slots=True)
class Seen:
    """Normalised texts a unit has accepted, by kind and source: what a new one must not
    repeat. One per unit; a source's texts are compared only with each other (the same
    question about two different summaries makes two different records)."""

    texts: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def has(self, kind: str, source: str, norm: str) -> bool:
        """Whether ``norm`` (a ``normalise``d text) of ``kind`` from ``source`` was accepted."""
        return norm in self.texts.get((kind, source), ())

    def add(self, kind: str, source: str, norms: Sequence[str]) -> None:
        """Remember ``norms`` as accepted texts of ``kind`` from ``source``."""
        self.texts.setdefault((kind, source), set()).update(norms)


@dataclass(frozen=True, slots=True)
class Gate:
    """The checks for one stage's replies; call it on a parsed reply.

    Returns the first ``Rejection``, or None after recording the reply's texts in ``seen`` (a
    reply accepted here is kept: later replies of the unit must differ from it). A list
    reply's items are judged each: the rejection carries the reply without its bad items
    (``partial``), which the Asker keeps when asking again has not brought a clean reply.
    """

    config: QualityConfig
    grounding: Grounding
    scaffolding: Scaffolding
    seen: Seen | None = None
    # The grounding texts as they are and normalised, that a text may share markup and
    # sentences with: built once per gate, not per reply (a chunk may be 60,000 characters).
    allowed: str = field(init=False)
    norm_allowed: str = field(init=False)

    def __post_init__(self) -> None:
        g = self.grounding
        object.__setattr__(self, "allowed", f"{g.source}\n{g.chunk}")
        object.__setattr__(self, "norm_allowed", f"{_normalised(g.source)}\n{_normalised(g.chunk)}")

    @classmethod
    def of(
        cls,
        config: QualityConfig,
        grounding: Grounding,
        prompt: Sequence[str],
        schema: type[BaseModel] | None,
        seen: Seen | None = None,
    ) -> Gate:
        """The gate for replies to ``prompt`` (its message texts) in ``schema``."""
        scaffold = Scaffolding.of(prompt, schema, grounding, config.echo_min_chars)
        return cls(config, grounding, scaffold, seen)

    def __call__(self, value: BaseModel) -> Rejection | None:
        """The first check ``value`` fails (its stage's texts, in ``CHECKS`` order), or None."""
        g = self.grounding
        allowed, norm_allowed = self.allowed, self.norm_allowed
        first: Rejection | None = None
        bad: set[int] = set()
        # Texts of the items that passed so far, by kind: a later repeat is a duplicate.
        taken: dict[str, list[str]] = {}
        for item, group in groupby(texts(value), key=lambda t: t.item):
            mine: list[tuple[str, str]] = []
            rejected = None
            for text in group:
                j = Judged(
                    text, normalise(text.value), g, self.scaffolding, self.config, allowed,
                    norm_allowed,
                )  # fmt: skip
                if (rejected := self._judge(j, taken, mine)) is not None:
                    break
            if rejected is None:
                for kind, norm in mine:
                    taken.setdefault(kind, []).append(norm)
                continue
            first = first or rejected
            if item is None:
                return first  # a single text (summary, answer): nothing else to judge
            bad.add(item)
        if first is not None:
            return Rejection(
                first.check, first.field, first.reason, without_items(value, bad), len(bad)
            )
        if self.seen is not None:
            for kind, norms in taken.items():
                self.seen.add(kind, g.source, norms)
        return None

    def _judge(
        self, j: Judged, taken: dict[str, list[str]], pending: list[tuple[str, str]]
    ) -> Rejection | None:
        """The first check ``j`` fails, the duplicate check last (against the unit, the items
        passed so far and ``pending``, its own item's texts; a new text joins ``pending``)."""
        for code, check in CHECKS:
            reason = check(j)
            if reason is not None:
                return Rejection(code, j.text.field, reason)
        kind = j.text.kind
        if kind not in DISTINCT_KINDS:
            return None
        earlier = taken.get(kind, ())
        mine = [n for k, n in pending if k == kind]
        in_reply = j.norm in earlier or j.norm in mine
        if in_reply or (
            self.seen is not None and self.seen.has(kind, self.grounding.source, j.norm)
        ):
            what = "this reply" if in_reply else "the unit"
            reason = f"{excerpt(j.text.value)!r} repeats an earlier {kind} of {what}"
            return Rejection("duplicate", j.text.field, reason)
        pending.append((kind, j.norm))
        return None
