"""What the writer writes: ``Record`` (a ``gen.jsonl`` line), ``Failure`` (a ``failures.jsonl``
line) and ``UnitResult`` (all of one unit), with the fields each type's lines carry.

The fields follow what Module 4 (red-hat-ai-examples, ``04_Knowledge_Mixing``) reads. It
loads each type's folder with ``datasets.load_dataset("json", data_dir=...)``; for
``document_based_qa`` only it renames ``base_document`` to ``raw_document``; it requires
``question``, ``response``, ``document``, ``raw_document`` and ``document_outline``. Reasoning
it takes from ``reasoning`` for key facts and document QA, but for the summary types only
from ``parse_response_dict_reasoning_content`` (the first per summary, after grouping the
rows by ``document``). The README's output table says the same per type.

Every line of a type has every field of that type, reasoning as ``""`` when the teacher gave
none: ``datasets`` reads a file in blocks and refuses a field that is missing or null in the
first block and present in a later one ("Couldn't cast ... column names don't match").

The flows build these; the writer (``engine.output.writer``) reads their attributes and
writes them. Nothing here knows of the flows or the teacher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import orjson

from engine.errors import InvalidReply, ItemError
from engine.seeds import SeedRow

# Version 1: every type had raw_document, reasoning only when present. Version 2: the
# per-type fields below. A resume never mixes two versions in one directory (manifest.py).
OUTPUT_SCHEMA = 2

# The field holding the raw chunk. Module 4 renames base_document to raw_document for
# document_based_qa, and fails if raw_document is there already.
RAW_DOCUMENT_FIELD: dict[str, str] = {
    "extractive_summary": "raw_document",
    "detailed_summary": "raw_document",
    "key_facts_to_qa": "raw_document",
    "document_based_qa": "base_document",
}
# The field holding the reasoning behind ``response``: the only name Module 4's summary
# sampler keeps for the two summary types, ``reasoning`` for the others.
REASONING_FIELD: dict[str, str] = {
    "extractive_summary": "parse_response_dict_reasoning_content",
    "detailed_summary": "parse_response_dict_reasoning_content",
    "key_facts_to_qa": "reasoning",
    "document_based_qa": "reasoning",
}
# The ``Record`` attribute behind each field name that differs from it.
_ATTRIBUTE = {
    "base_document": "raw_document",
    "parse_response_dict_reasoning_content": "reasoning",
}
# How much of a failed reply's body a failure line keeps, in characters.
BODY_EXCERPT_CHARS = 300


def record_fields(gen_type: str) -> tuple[str, ...]:
    """The fields of every record of ``gen_type``, in the order they are written.

    Raises ``KeyError`` for a type that is not one of the four.
    """
    key_fact = ("key_fact",) if gen_type == "key_facts_to_qa" else ()
    return (
        "id",
        "doc_id",
        "gen_type",
        "document",
        RAW_DOCUMENT_FIELD[gen_type],
        "document_outline",
        "domain",
        "question",
        "response",
        *key_fact,
        REASONING_FIELD[gen_type],
        "model",
    )


@dataclass(frozen=True, slots=True)
class Record:
    """One line of ``<type>/gen.jsonl``: a question/answer pair, the text it is grounded in
    and the chunk it comes from.

    Attributes have one name for every type; ``to_json`` writes them under the type's field
    names (``record_fields``): ``raw_document`` as ``base_document`` for document_based_qa,
    ``reasoning`` as ``parse_response_dict_reasoning_content`` for the summary types.
    Raises ``ValueError`` for an unknown type, or when ``key_fact`` is missing from a
    key_facts_to_qa record or given to another type.
    """

    id: str  # "<doc_id>-<gen_type>-<path>", e.g. "3f2a...-key_facts_to_qa-f001-p00"
    doc_id: str
    gen_type: str
    document: str  # the grounding text: the chunk, a summary, or a fact and its context
    raw_document: str  # the seed's chunk
    document_outline: str
    domain: str
    question: str
    response: str
    reasoning: str  # "" when the teacher gave none
    model: str  # the model that answered, as the endpoint named it
    key_fact: str | None = None  # key_facts_to_qa only, and always there

    def __post_init__(self) -> None:
        if self.gen_type not in RAW_DOCUMENT_FIELD:
            raise ValueError(f"no record fields for generation type {self.gen_type!r}")
        if (self.key_fact is None) == (self.gen_type == "key_facts_to_qa"):
            raise ValueError(
                "a key_facts_to_qa record needs its key_fact"
                if self.key_fact is None
                else f"a {self.gen_type} record has no key_fact"
            )

    @property
    def fields(self) -> tuple[str, ...]:
        """The field names this record is written with (``record_fields``)."""
        return _FIELDS[self.gen_type]

    def to_dict(self) -> dict[str, Any]:
        """The line's JSON object: field name to text, in ``fields`` order."""
        return dict(zip(_FIELDS[self.gen_type], _VALUES[self.gen_type](self), strict=True))

    def to_json(self) -> bytes:
        """The line as UTF-8 JSON bytes, without the newline."""
        return orjson.dumps(self.to_dict())


# Per type: the field names, and the attributes behind them in the same order.
_FIELDS = {gen_type: record_fields(gen_type) for gen_type in RAW_DOCUMENT_FIELD}
_VALUES = {
    gen_type: attrgetter(*(_ATTRIBUTE.get(name, name) for name in fields))
    for gen_type, fields in _FIELDS.items()
}


def make_record(
    seed: SeedRow,
    gen_type: str,
    path: tuple[str, ...],
    *,
    document: str,
    question: str,
    response: str,
    model: str,
    reasoning: str = "",
    key_fact: str | None = None,
) -> Record:
    """One output record of ``gen_type`` for ``seed``. ``path`` locates the pair in the unit
    (e.g. ("s003", "q01")); with the document id and type it makes an id that is the same in
    every run. ``key_fact`` is required for ``key_facts_to_qa`` and only there
    (``ValueError``)."""
    return Record(
        id="-".join((seed.doc_id, gen_type, *path)),
        doc_id=seed.doc_id,
        gen_type=gen_type,
        document=document,
        raw_document=seed.document,
        document_outline=seed.document_outline,
        domain=seed.domain,
        question=question,
        response=response,
        reasoning=reasoning,
        model=model,
        key_fact=key_fact,
    )


@dataclass(frozen=True, slots=True)
class Failure:
    """One lost item of a unit, as written to ``failures.jsonl`` (with the unit's document
    id, type and seed line, by the writer)."""

    stage: str  # the full stage name, e.g. "document_based_qa/answer"
    item: str  # where in the unit, e.g. "s003/q01"
    kind: str  # ``ItemError.kind``: request_rejected, retries_exhausted, invalid_reply...
    message: str
    status: int | None = None  # the last HTTP status, if the teacher answered
    attempts: int = 1  # requests sent for the item, re-asks included
    body_excerpt: str = ""  # the start of the last reply's body, BODY_EXCERPT_CHARS at most
    # For an invalid reply, what it failed (``InvalidReply.check``); "" otherwise.
    check: str = ""
    at: float = field(default_factory=time.time)  # Unix time, seconds

    @classmethod
    def from_error(cls, stage: str, item: str, err: ItemError) -> Failure:
        """The failure entry for ``item`` of ``stage``, lost to ``err``."""
        return cls(
            stage=stage,
            item=item,
            kind=err.kind,
            message=str(err),
            status=err.status,
            attempts=err.attempts,
            body_excerpt=err.body[:BODY_EXCERPT_CHARS],
            check=err.check if isinstance(err, InvalidReply) else "",
        )


@dataclass(slots=True)
class UnitResult:
    """Everything one (document, type) unit produced, written by the writer in one piece:
    its records in path order, its lost items, and how many pairs the judge threw out."""

    records: list[Record] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    judged_out: int = 0
