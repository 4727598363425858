"""A worker of a distributed run as it is, without Ray (engine.distributed.worker): it runs a
unit against the simulator like a local run does, through the shared ledger; the key never
travels in its settings; a node without the key stops the run with what to set."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import pytest

from engine.distributed.quota import Grant, Outcomes, QuotaLedger
from engine.distributed.worker import KEY_VARIABLE, Tally, UnitWorker, settings_for
from engine.flows import build_flows
from engine.pipeline.stats import Stats
from engine.seeds import SeedRow, read_seeds
from engine.teacher.client import HTTPTeacher
from engine.teacher.limits import RequestLimiter
from engine.teacher.protocol import Wire
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.runs import SAMPLE_SEEDS, config_for

KEY = "sk-worker-test-0123456789abcdef"


def _first_seed() -> SeedRow:
    item = next(iter(read_seeds(SAMPLE_SEEDS, 60_000)))
    assert isinstance(item, SeedRow)
    return item


def _worker(
    config_key: str | None, environ: dict[str, str], base_url: str, out: Path
) -> UnitWorker:
    extra = [f'teacher.api_key="{config_key}"'] if config_key else []
    config = config_for(base_url, out, "limits.max_concurrency=4", *extra)
    ledger = QuotaLedger(config.limits.requests_per_minute, 4, workers=1)

    async def lease(requests: int, tokens: int, outcomes: Outcomes) -> Grant:
        return await ledger.lease(0, requests, tokens, outcomes)

    settings = settings_for(
        config, Wire(), 0, 1, slices=(ledger.slice_requests, ledger.slice_tokens), cache=None
    )
    return UnitWorker(settings, lease, environ=environ)


async def test_a_worker_makes_the_records_a_local_flow_makes(tmp_path: Path) -> None:
    seed = _first_seed()
    async with running_simulator(SimulatorConfig(api_key=KEY)) as sim:
        worker = _worker(KEY, {KEY_VARIABLE: KEY}, sim.base_url, tmp_path)
        info = await worker.ready()
        reply = await worker.run_unit(seed, "key_facts_to_qa")
        await worker.close()
        # The same unit in this process, as a local run does it.
        config = config_for(sim.base_url, tmp_path, f'teacher.api_key="{KEY}"')
        async with HTTPTeacher(config.teacher, config.retry, RequestLimiter(600, 4)) as teacher:
            local = await build_flows(config, teacher)["key_facts_to_qa"].run(seed)
    assert reply.fatal == "" and reply.result is not None
    assert [r.to_dict() for r in reply.result.records] == [r.to_dict() for r in local.records]
    assert reply.tally.requests_sent == len(sim.state.requests) // 2 > 0
    assert reply.concurrency == 4
    assert info.index == 0 and info.pid > 0


def test_the_settings_a_worker_gets_never_hold_the_key(tmp_path: Path) -> None:
    config = config_for("http://127.0.0.1:9/v1", tmp_path, f'teacher.api_key="{KEY}"')
    settings = settings_for(config, Wire(), 0, 2, slices=(5, 0), cache=tmp_path / "c.sqlite")
    assert KEY.encode() not in pickle.dumps(settings)
    assert settings.key_expected
    assert settings.cache == tmp_path / "c-worker0.sqlite"


async def test_a_node_without_the_key_stops_the_run_saying_where_to_set_it(
    tmp_path: Path,
) -> None:
    async with running_simulator(SimulatorConfig(api_key=KEY)) as sim:
        worker = _worker(KEY, {}, sim.base_url, tmp_path)
        reply = await worker.run_unit(_first_seed(), "key_facts_to_qa")
        assert sim.state.total_requests == 0
    assert reply.result is None
    assert f"{KEY_VARIABLE} is not set in this node's environment" in reply.fatal
    assert "ray start" in reply.fatal and "Secret" in reply.fatal
    assert KEY not in reply.fatal


async def test_a_worker_reads_the_key_of_its_own_environment(tmp_path: Path) -> None:
    """The driver had none (the teacher needs none as the driver sees it), the node has one:
    the worker sends it, as its node was set up to."""
    async with running_simulator(SimulatorConfig(api_key=KEY)) as sim:
        worker = _worker(None, {KEY_VARIABLE: f"  {KEY}\n"}, sim.base_url, tmp_path)
        reply = await worker.run_unit(_first_seed(), "document_based_qa")
        await worker.close()
    assert reply.fatal == "" and reply.result is not None and reply.result.records


def test_a_tally_moves_a_workers_counts_into_the_runs_once() -> None:
    own = Stats()
    own.teacher.requests_sent, own.teacher.prompt_tokens = 7, 70
    own.teacher.retries["429"] = 2
    own.count_reply("key_facts_to_qa/qa")
    own.count_reply("key_facts_to_qa/qa", "blank")
    run = Stats()
    Tally.take(own).add_to(run)
    Tally.take(own).add_to(run)  # nothing new
    assert (run.teacher.requests_sent, run.teacher.prompt_tokens) == (7, 70)
    assert run.teacher.retries == Counter({"429": 2})
    assert run.replies == Counter({"key_facts_to_qa/qa": 2})
    assert run.rejected == {"key_facts_to_qa/qa": Counter({"blank": 1})}
    assert own.teacher.requests_sent == 0 and not own.replies


@pytest.mark.parametrize("gen_type", ["extractive_summary", "document_based_qa"])
async def test_results_survive_pickling_as_ray_sends_them(tmp_path: Path, gen_type: str) -> None:
    async with running_simulator() as sim:
        worker = _worker(None, {}, sim.base_url, tmp_path)
        reply = await worker.run_unit(_first_seed(), gen_type)
        await worker.close()
    again = pickle.loads(pickle.dumps(reply))
    assert again.result is not None and reply.result is not None
    assert [r.to_dict() for r in again.result.records] == [
        r.to_dict() for r in reply.result.records
    ]
