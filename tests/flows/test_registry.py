"""The flow registry: every generation type has a flow, built in the config's order, each
flow producing records of its own type."""

from __future__ import annotations

from engine.config import GEN_TYPES
from engine.flows import FLOWS, build_flows, stage_settings
from tests.support.fakes import FakeTeacher, make_config, make_seed


def test_every_type_has_a_flow() -> None:
    assert set(FLOWS) == set(GEN_TYPES)


def test_build_flows_makes_the_configured_types_in_their_order() -> None:
    types = ["document_based_qa", "extractive_summary"]
    flows = build_flows(make_config(types=types), FakeTeacher())
    assert list(flows) == types
    assert [flow.gen_type for flow in flows.values()] == types


async def test_each_flow_makes_records_of_its_own_type() -> None:
    small = {"summaries": 1, "questions_per_summary": 1}
    config = make_config(
        types=list(GEN_TYPES),
        extractive_summary=small,
        detailed_summary=small,
        key_facts_to_qa={"max_facts": 1, "qa_per_fact": 1},
        document_based_qa={"questions": 1},
    )
    for gen_type, flow in build_flows(config, FakeTeacher()).items():
        result = await flow.run(make_seed())
        assert result.records and result.failures == []
        assert {record.gen_type for record in result.records} == {gen_type}


def test_stage_settings_name_each_stage_s_config_keys() -> None:
    config = make_config(judge=True, extractive_summary={"summaries": 3})
    got = {
        stage: (s.max_tokens_key.removeprefix("generation."), s.samples)
        for stage, s in stage_settings(config).items()
    }
    # In the order the types and their stages run, the judge last of each type.
    assert list(got.items()) == [
        ("extractive_summary/summary", ("extractive_summary.max_tokens", 3)),
        ("extractive_summary/questions", ("extractive_summary.qa_max_tokens", 1)),
        ("extractive_summary/answer", ("extractive_summary.qa_max_tokens", 1)),
        ("extractive_summary/judge", ("judge_max_tokens", 1)),
        ("detailed_summary/summary", ("detailed_summary.max_tokens", 50)),
        ("detailed_summary/questions", ("detailed_summary.qa_max_tokens", 1)),
        ("detailed_summary/answer", ("detailed_summary.qa_max_tokens", 1)),
        ("detailed_summary/judge", ("judge_max_tokens", 1)),
        ("key_facts_to_qa/key_facts", ("key_facts_to_qa.max_tokens", 1)),
        ("key_facts_to_qa/qa", ("key_facts_to_qa.qa_max_tokens", 1)),
        ("key_facts_to_qa/judge", ("judge_max_tokens", 1)),
        ("document_based_qa/questions", ("document_based_qa.max_tokens", 1)),
        ("document_based_qa/answer", ("document_based_qa.qa_max_tokens", 1)),
        ("document_based_qa/judge", ("judge_max_tokens", 1)),
    ]
    for stage, s in stage_settings(config).items():
        assert s.temperature_key == s.max_tokens_key.replace("max_tokens", "temperature")
        section = config.generation
        if not stage.endswith("/judge"):
            section = getattr(section, stage.split("/")[0])
        key = s.max_tokens_key.rsplit(".", 1)[1]
        assert s.max_tokens == getattr(section, key)
        assert s.temperature == getattr(section, key.replace("max_tokens", "temperature"))


def test_without_n_a_summary_request_asks_for_one_sample() -> None:
    config = make_config(teacher={"supports_n": False}, extractive_summary={"summaries": 3})
    assert {s.samples for s in stage_settings(config).values()} == {1}


def test_without_the_judge_there_is_no_judge_stage() -> None:
    assert not [stage for stage in stage_settings(make_config()) if stage.endswith("/judge")]
