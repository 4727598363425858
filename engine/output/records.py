"""The output records: which fields each type's ``gen.jsonl`` lines carry, and their version.

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
"""

from __future__ import annotations

from typing import Any

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


def record_fields(gen_type: str) -> tuple[str, ...]:
    """The fields of every record of ``gen_type``, in the order they are written."""
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
) -> dict[str, Any]:
    """One output line of ``gen_type`` (fields as ``record_fields``). ``path`` locates the
    pair in the unit (e.g. ("s003", "q01")); with the document id and type it makes an id
    that is the same in every run. ``key_fact`` is required for ``key_facts_to_qa``."""
    record: dict[str, Any] = {
        "id": "-".join((seed.doc_id, gen_type, *path)),
        "doc_id": seed.doc_id,
        "gen_type": gen_type,
        "document": document,
        RAW_DOCUMENT_FIELD[gen_type]: seed.document,
        "document_outline": seed.document_outline,
        "domain": seed.domain,
        "question": question,
        "response": response,
    }
    if gen_type == "key_facts_to_qa":
        if key_fact is None:
            raise ValueError("a key_facts_to_qa record needs its key_fact")
        record["key_fact"] = key_fact
    record[REASONING_FIELD[gen_type]] = reasoning
    record["model"] = model
    return record
