from __future__ import annotations

import pytest

from engine.config import GEN_TYPES
from engine.output.records import REASONING_FIELD, make_record, record_fields
from tests.support.fakes import make_seed

SEED = make_seed("The chunk.")


def record(gen_type: str, **extra: str) -> dict[str, object]:
    return make_record(
        SEED, gen_type, ("q00",), document="D", question="Q?", response="A", model="m", **extra
    )


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
