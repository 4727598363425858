from __future__ import annotations

import dataclasses

import orjson
import pytest

from engine.config import GEN_TYPES
from engine.output.records import REASONING_FIELD, make_record, record_fields
from tests.support.fakes import make_seed

SEED = make_seed("The chunk.")


def record(gen_type: str, **extra: str) -> dict[str, object]:
    """A record of ``gen_type`` as its line's JSON object."""
    return make_record(
        SEED, gen_type, ("q00",), document="D", question="Q?", response="A", model="m", **extra
    ).to_dict()


@pytest.mark.parametrize(
    ("gen_type", "chunk", "reasoning"),
    [
        ("extractive_summary", "raw_document", "parse_response_dict_reasoning_content"),
        ("detailed_summary", "raw_document", "parse_response_dict_reasoning_content"),
        ("key_facts_to_qa", "raw_document", "reasoning"),
        ("document_based_qa", "base_document", "reasoning"),
    ],
)
def test_each_type_names_the_chunk_and_the_reasoning_as_module_4_reads_them(
    gen_type: str, chunk: str, reasoning: str
) -> None:
    extra = {"key_fact": "F"} if gen_type == "key_facts_to_qa" else {}
    got = record(gen_type, reasoning="R", **extra)
    assert list(got) == list(record_fields(gen_type))
    assert (got[chunk], got[reasoning]) == ("The chunk.", "R")
    others = {"raw_document", "base_document", "reasoning", "parse_response_dict_reasoning_content"}
    assert not (others - {chunk, reasoning}) & set(got)  # nothing stored under a second name


@pytest.mark.parametrize("gen_type", GEN_TYPES)
def test_reasoning_is_always_there_empty_when_the_teacher_gave_none(gen_type: str) -> None:
    extra = {"key_fact": "F"} if gen_type == "key_facts_to_qa" else {}
    got = record(gen_type, **extra)
    assert list(got) == list(record_fields(gen_type))
    assert got[REASONING_FIELD[gen_type]] == ""


def test_a_key_facts_record_needs_its_fact() -> None:
    with pytest.raises(ValueError, match="key_fact"):
        record("key_facts_to_qa")
    assert record("key_facts_to_qa", key_fact="F")["key_fact"] == "F"


def test_a_key_fact_belongs_to_key_facts_records_only() -> None:
    with pytest.raises(ValueError, match="document_based_qa record has no key_fact"):
        record("document_based_qa", key_fact="F")


def test_an_unknown_type_has_no_record() -> None:
    with pytest.raises(ValueError, match="no record fields for generation type 'summaries'"):
        record("summaries")


# The bytes of one line per type, as every engine version of output schema 2 wrote them:
# resumed output must not change shape within a file. Non-ASCII text stays UTF-8, unescaped.
ROW = make_seed("Der Fluss „Rhein“ fließt.")
LINES = {
    "extractive_summary": (
        '{"id":"a876ea0e970fce0b-extractive_summary-s001-q02","doc_id":"a876ea0e970fce0b",'
        '"gen_type":"extractive_summary","document":"Zusammenfassung",'
        '"raw_document":"Der Fluss „Rhein“ fließt.","document_outline":"Photosynthesis",'
        '"domain":"biology","question":"Wo?","response":"Am \\"Rhein\\".",'
        '"parse_response_dict_reasoning_content":"weil","model":"m-1"}'
    ),
    "detailed_summary": (
        '{"id":"a876ea0e970fce0b-detailed_summary-s001-q02","doc_id":"a876ea0e970fce0b",'
        '"gen_type":"detailed_summary","document":"Zusammenfassung",'
        '"raw_document":"Der Fluss „Rhein“ fließt.","document_outline":"Photosynthesis",'
        '"domain":"biology","question":"Wo?","response":"Am \\"Rhein\\".",'
        '"parse_response_dict_reasoning_content":"weil","model":"m-1"}'
    ),
    "key_facts_to_qa": (
        '{"id":"a876ea0e970fce0b-key_facts_to_qa-s001-q02","doc_id":"a876ea0e970fce0b",'
        '"gen_type":"key_facts_to_qa","document":"Zusammenfassung",'
        '"raw_document":"Der Fluss „Rhein“ fließt.","document_outline":"Photosynthesis",'
        '"domain":"biology","question":"Wo?","response":"Am \\"Rhein\\".","key_fact":"F",'
        '"reasoning":"weil","model":"m-1"}'
    ),
    "document_based_qa": (
        '{"id":"a876ea0e970fce0b-document_based_qa-s001-q02","doc_id":"a876ea0e970fce0b",'
        '"gen_type":"document_based_qa","document":"Zusammenfassung",'
        '"base_document":"Der Fluss „Rhein“ fließt.","document_outline":"Photosynthesis",'
        '"domain":"biology","question":"Wo?","response":"Am \\"Rhein\\".",'
        '"reasoning":"weil","model":"m-1"}'
    ),
}


@pytest.mark.parametrize("gen_type", GEN_TYPES)
def test_a_record_serialises_to_the_bytes_of_its_type(gen_type: str) -> None:
    extra = {"key_fact": "F"} if gen_type == "key_facts_to_qa" else {}
    got = make_record(
        ROW,
        gen_type,
        ("s001", "q02"),
        document="Zusammenfassung",
        question="Wo?",
        response='Am "Rhein".',
        model="m-1",
        reasoning="weil",
        **extra,
    )
    assert got.to_json() == LINES[gen_type].encode()
    assert list(orjson.loads(got.to_json())) == list(got.fields) == list(record_fields(gen_type))
    # One attribute name for every type, whatever the field is called in the file.
    assert (got.raw_document, got.reasoning) == (ROW.document, "weil")


def test_a_record_cannot_change_once_made() -> None:
    made = make_record(
        SEED, "document_based_qa", ("q00",), document="D", question="Q?", response="A", model="m"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.question = "changed"  # type: ignore[misc]
