"""The flow registry: every generation type has a flow, built in the config's order, each
flow producing records of its own type."""

from __future__ import annotations

from engine.config import GEN_TYPES
from engine.flows import FLOWS, build_flows
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
