"""``python -m engine plan``: the counts match what a run sends, offline and over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.config import GEN_TYPES, Config, LimitsConfig, load_config
from engine.embedded.demo import demo_config
from engine.embedded.resolve import EMBEDDED_PLACEHOLDER_URL
from engine.flows import build_flows
from engine.flows.planning import StagePlan, assumed_reply
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.plan import (
    Pace,
    Plan,
    _clock,
    as_run,
    format_plan,
    make_plan,
)
from engine.seeds import SeedRow, doc_id_for
from engine.teacher.protocol import ChatReply, ChatRequest, estimate_tokens
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.cli import engine_cli
from tests.support.fakes import FakeTeacher, make_seed, reply
from tests.support.runs import REPO, SAMPLE_SEEDS, SMALL, config_for

# Small fan-out: N summaries, Q questions each, F facts x P pairs, D document questions.
N, Q, F, P, D = 3, 2, 4, 3, 5
SHORT = make_seed()
LONG = make_seed("Chlorophyll absorbs blue and red light. " * 200)
BOTH_N = pytest.mark.parametrize("supports_n", [True, False], ids=["n", "no-n"])
BOTH_JUDGE = pytest.mark.parametrize("judge", [False, True], ids=["no-judge", "judge"])


def make_config(*, supports_n: bool = True, judge: bool = False, **gen: Any) -> Config:
    knobs = {"max_tokens": 64, "qa_max_tokens": 32}
    return Config.model_validate(
        {
            "teacher": {"base_url": "http://x/v1", "model": "m", "supports_n": supports_n},
            # Tiny max_tokens against the long seed: the summaries the plan assumes are far
            # shorter than a twentieth of that chunk (the content check's default).
            "quality": {"summary_min_ratio": 0.0},
            "generation": {
                "judge": judge,
                "judge_max_tokens": 48,
                "extractive_summary": {"summaries": N, "questions_per_summary": Q, **knobs},
                "detailed_summary": {"summaries": N, "questions_per_summary": Q, **knobs},
                "key_facts_to_qa": {"max_facts": F, "qa_per_fact": P, **knobs},
                "document_based_qa": {"questions": D, **knobs},
                **gen,
            },
        }
    )


def offline_plan(config: Config, gen_type: str, seed: SeedRow = SHORT) -> dict[str, StagePlan]:
    flow = build_flows(config, FakeTeacher())[gen_type]
    return {part.stage.split("/")[1]: part for part in flow.plan(seed)}


def counts(parts: dict[str, StagePlan]) -> dict[str, tuple[int, int]]:
    return {stage: (part.requests, part.choices) for stage, part in parts.items()}


# --- counts per type ----------------------------------------------------------------------


def expected_counts(gen_type: str, supports_n: bool, judge: bool) -> dict[str, tuple[int, int]]:
    """(requests, choices) per stage, written out from the flows' description in the README."""
    pairs = {"key_facts_to_qa": F * P, "document_based_qa": D}.get(gen_type, N * Q)
    stages: dict[str, tuple[int, int]]
    if gen_type == "key_facts_to_qa":
        stages = {"key_facts": (1, 1), "qa": (F, F)}
    elif gen_type == "document_based_qa":
        stages = {"questions": (1, 1), "answer": (D, D)}
    else:
        summary = (1, N) if supports_n else (N, N)
        stages = {"summary": summary, "questions": (N, N), "answer": (N * Q, N * Q)}
    if judge:
        stages["judge"] = (pairs, pairs)
    return stages


@BOTH_N
@BOTH_JUDGE
@pytest.mark.parametrize("gen_type", GEN_TYPES)
def test_counts_per_stage(gen_type: str, supports_n: bool, judge: bool) -> None:
    parts = offline_plan(make_config(supports_n=supports_n, judge=judge), gen_type)
    assert counts(parts) == expected_counts(gen_type, supports_n, judge)


@BOTH_N
def test_completion_tokens_are_max_tokens_per_choice(supports_n: bool) -> None:
    parts = offline_plan(make_config(supports_n=supports_n, judge=True), "extractive_summary")
    assert parts["summary"].completion_tokens == N * 64
    assert parts["questions"].completion_tokens == N * 32
    assert parts["answer"].completion_tokens == N * Q * 32
    assert parts["judge"].completion_tokens == N * Q * 48


def test_reply_dependent_stages_state_their_assumption() -> None:
    config = make_config(judge=True)
    assumed = {
        gen_type: {stage: part.assumes for stage, part in offline_plan(config, gen_type).items()}
        for gen_type in GEN_TYPES
    }
    assert assumed["extractive_summary"] == {
        "summary": "",
        "questions": "",
        "answer": f"{Q} questions per summary",
        "judge": f"{Q} questions per summary",
    }
    assert assumed["key_facts_to_qa"] == {
        "key_facts": "",
        "qa": f"{F} facts",
        "judge": f"{F} facts x {P} pairs",
    }
    assert assumed["document_based_qa"] == {
        "questions": "",
        "answer": f"{D} questions per chunk",
        "judge": f"{D} questions per chunk",
    }


# --- the plan against what the flows really send ------------------------------------------


def sized_replies(config: Config, seed: SeedRow) -> FakeTeacher:
    """A fake whose replies are exactly what the plan assumes: every list full, every quoted
    text as long as ``assumed_reply`` makes it."""
    gen = config.generation
    kf = gen.key_facts_to_qa
    serial = itertools.count()

    def text(max_tokens: int, items: int) -> str:
        # As long as the plan's stand-in, and distinct: repeated summaries or questions, and
        # answers that repeat their question, are asked again.
        base, tag = assumed_reply(max_tokens, items, seed.document), str(next(serial))
        return base[: -len(tag)] + tag

    def script(request: ChatRequest) -> ChatReply:
        gen_type, stage = request.stage.split("/")
        knobs = getattr(gen, gen_type)
        if stage == "summary":
            return reply(*({"summary": text(knobs.max_tokens, 1)} for _ in range(request.n)))
        if stage == "questions" and gen_type == "document_based_qa":
            count = knobs.questions
            return reply({"questions": [text(knobs.max_tokens, count) for _ in range(count)]})
        if stage == "questions":
            count = knobs.questions_per_summary
            return reply({"questions": [text(knobs.qa_max_tokens, count) for _ in range(count)]})
        if stage == "answer":
            return reply({"answer": text(knobs.qa_max_tokens, 1)})
        if stage == "key_facts":
            size = (kf.max_tokens, 2 * kf.max_facts)
            facts = [{"fact": text(*size), "context": text(*size)} for _ in range(kf.max_facts)]
            return reply({"facts": facts})
        if stage == "qa":
            size = (kf.qa_max_tokens, 2 * kf.qa_per_fact)
            pairs = [
                {"question": text(*size), "answer": text(*size)} for _ in range(kf.qa_per_fact)
            ]
            return reply({"pairs": pairs})
        return reply({"faithful": True, "reason": "supported"})

    return FakeTeacher(script)


def sent_per_stage(requests: Iterable[ChatRequest]) -> dict[str, StagePlan]:
    by_stage: dict[str, list[ChatRequest]] = {}
    for request in requests:
        by_stage.setdefault(request.stage.split("/")[1], []).append(request)
    return {stage: StagePlan.of(group) for stage, group in by_stage.items()}


def without_assumes(parts: dict[str, StagePlan]) -> dict[str, StagePlan]:
    return {stage: dataclasses.replace(part, assumes="") for stage, part in parts.items()}


@BOTH_N
@BOTH_JUDGE
@pytest.mark.parametrize("seed", [SHORT, LONG], ids=["short", "long"])
@pytest.mark.parametrize("gen_type", GEN_TYPES)
async def test_plan_equals_what_the_flow_sends_when_replies_are_as_assumed(
    gen_type: str, seed: SeedRow, supports_n: bool, judge: bool
) -> None:
    config = make_config(supports_n=supports_n, judge=judge)
    teacher = sized_replies(config, seed)
    async with asyncio.timeout(5):
        result = await build_flows(config, teacher)[gen_type].run(seed)
    assert result.failures == []
    assert without_assumes(offline_plan(config, gen_type, seed)) == sent_per_stage(teacher.requests)


def test_quoted_replies_fill_their_budget_but_not_beyond_the_chunk() -> None:
    assert estimate_tokens(assumed_reply(100, 1, "x" * 10_000)) == 100
    assert estimate_tokens(assumed_reply(100, 4, "x" * 10_000)) == 25
    assert assumed_reply(100, 1, "short chunk") == "x" * len("short chunk")


# --- over a seed file ---------------------------------------------------------------------


def seed_file(path: Path, good: int) -> Path:
    rows = SAMPLE_SEEDS.read_bytes().splitlines()[:good]
    path.write_bytes(b"\n".join([*rows, b"not json", rows[0]]) + b"\n")  # a reject, a repeat
    return path


def file_config(tmp_path: Path, *extra: str) -> Config:
    seeds = seed_file(tmp_path / "seeds.jsonl", 2)
    return config_for("http://127.0.0.1:9/v1", tmp_path / "out", f'input.seeds="{seeds}"', *extra)


def per_row(config: Config, seed: SeedRow, gen_type: str) -> int:
    return sum(part.requests for part in build_flows(config, FakeTeacher())[gen_type].plan(seed))


def test_make_plan_adds_up_valid_rows_and_counts_rejects(tmp_path: Path) -> None:
    config = file_config(tmp_path)
    plan = make_plan(config)
    assert (plan.rows, plan.rejects, plan.done) == (2, 2, 0)
    assert list(plan.stages) == list(GEN_TYPES)
    # The sample's rows differ only in their text: the counts are the same for each.
    seed = make_seed(orjson.loads(SAMPLE_SEEDS.read_bytes().splitlines()[0])["document"])
    for gen_type in GEN_TYPES:
        assert plan.type_total(gen_type).requests == 2 * per_row(config, seed, gen_type)
    assert plan.total().requests == sum(plan.type_total(t).requests for t in GEN_TYPES)
    assert not (tmp_path / "out").exists()  # a plan writes nothing


def test_make_plan_skips_units_already_done_unless_fresh(tmp_path: Path) -> None:
    config = file_config(tmp_path)
    full = make_plan(config)
    first = orjson.loads(SAMPLE_SEEDS.read_bytes().splitlines()[0])["document"]
    facts = "key_facts_to_qa"
    out = tmp_path / "out"
    (out / facts).mkdir(parents=True)
    # A unit done, then the start of another that a crash cut short.
    progress = {"doc_id": doc_id_for(first), "gen_type": facts, "records": 1, "lengths": {}}
    (out / "progress.jsonl").write_bytes(orjson.dumps(progress) + b"\n")
    (out / facts / "gen.jsonl").write_bytes(b'{"half": "written"}\n')

    resumed = make_plan(config)

    assert resumed.done == 1
    assert resumed.type_total(facts).requests == full.type_total(facts).requests // 2
    assert resumed.type_total("document_based_qa") == full.type_total("document_based_qa")
    assert make_plan(config, fresh=True).total() == full.total()
    # Read only: a run's resume would cut the half-written unit; a plan leaves it.
    assert (out / facts / "gen.jsonl").read_bytes() == b'{"half": "written"}\n'


def test_without_an_endpoint_the_plan_is_for_the_embedded_demo_run(tmp_path: Path) -> None:
    seeds = seed_file(tmp_path / "seeds.jsonl", 2)
    toml = tmp_path / "c.toml"
    toml.write_text(f'[input]\nseeds = "{seeds}"\n[output]\ndir = "{tmp_path / "out"}"\n')
    config = load_config(toml, environ={}, dotenv_path=tmp_path / "none")
    assert config.teacher.mode == "embedded"

    planned, note = as_run(config)

    assert "embedded demo teacher" in note
    assert planned == demo_config(config, EMBEDDED_PLACEHOLDER_URL)[0]
    plan = make_plan(planned)
    # Demo fan-out, per row: 2 summaries, 2 questions, 2 answers for each summary type;
    # 1 key-facts request and 2 Q&A; 1 questions request and 2 answers; all with n=1.
    assert plan.total().requests == 2 * (6 + 6 + 3 + 3)
    assert plan.total().choices == plan.total().requests


def test_with_an_endpoint_the_plan_is_for_the_config_as_it_is(tmp_path: Path) -> None:
    config = file_config(tmp_path)
    assert as_run(config) == (config, "")


# --- duration -----------------------------------------------------------------------------


def limits(rpm: int, concurrency: int, tpm: int = 0) -> LimitsConfig:
    return LimitsConfig(requests_per_minute=rpm, max_concurrency=concurrency, tokens_per_minute=tpm)


# 1,000 requests of 600 prompt + 400 completion tokens each.
TOTAL = StagePlan("total", 1000, 1000, 600_000, 400_000)


@pytest.mark.parametrize(
    ("rpm", "concurrency", "tpm", "rate", "binding"),
    [
        (600, 32, 0, 384, "limits.max_concurrency"),  # 32 in flight / 5 s = 6.4 per second
        (100, 32, 0, 100, "limits.requests_per_minute"),
        (600, 32, 200_000, 200, "limits.tokens_per_minute"),  # 1,000 tokens per request
        (600, 32, 10_000_000, 384, "limits.max_concurrency"),
    ],
)
def test_pace_is_set_by_the_tightest_limit(
    rpm: int, concurrency: int, tpm: int, rate: float, binding: str
) -> None:
    pace = Pace.of(limits(rpm, concurrency, tpm), 5.0, TOTAL)
    assert pace.rate == pytest.approx(rate)
    assert pace.binding == binding
    assert pace.seconds(TOTAL.requests) == pytest.approx(TOTAL.requests / rate * 60)
    assert (pace.tokens is None) == (tpm == 0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "1 s"),
        (59, "59 s"),
        (411, "6 min 51 s"),
        (3600, "1 h 00 min"),
        (3 * 86_400 + 7300, "3 d 02 h"),
    ],
)
def test_durations_read_as_a_clock(seconds: float, text: str) -> None:
    assert _clock(seconds) == text


# --- formatting ---------------------------------------------------------------------------


def table_cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_format_plan_is_a_table_with_duration_and_assumptions() -> None:
    config = make_config(types=["key_facts_to_qa"], judge=True)
    plan = Plan(rows=2, rejects=1, stages={"key_facts_to_qa": {}})
    plan.add("key_facts_to_qa", build_flows(config, FakeTeacher())["key_facts_to_qa"].plan(SHORT))
    plan.add("key_facts_to_qa", build_flows(config, FakeTeacher())["key_facts_to_qa"].plan(SHORT))
    text = format_plan(plan, config, latency_s=2.0)
    lines = text.splitlines()
    assert lines[0] == "Plan (nothing is sent)"
    assert any(": 2 valid rows, 1 rejected" in line for line in lines)
    assert "supports_n = true (N samples are one request with n=N); judge on" in text
    rows = {cells[0]: cells for cells in map(table_cells, lines) if len(cells) >= 5}
    assert rows["stage"][1:] == [
        "requests", "choices", "prompt tokens", "completion tokens*", "assumes"
    ]  # fmt: skip
    total = 2 + 2 * F + 2 * F * P
    parts = {part.stage: part for part in plan.stages["key_facts_to_qa"].values()}
    judge = parts["key_facts_to_qa/judge"]
    assert rows["key_facts_to_qa/key_facts"][1:3] == ["2", "2"]
    assert rows["key_facts_to_qa/qa"][1:3] + rows["key_facts_to_qa/qa"][5:] == [
        str(2 * F), str(2 * F), f"{F} facts"
    ]  # fmt: skip
    assert rows["key_facts_to_qa/judge"][1:] == [
        str(2 * F * P),
        str(2 * F * P),
        f"{judge.prompt_tokens:,}",
        f"{judge.completion_tokens:,}",
        f"{F} facts x {P} pairs",
    ]
    assert rows["key_facts_to_qa (all)"][1:3] == rows["total"][1:3] == [str(total), str(total)]
    # Numbers are right-aligned under their headers.
    header = next(line for line in lines if line.startswith("stage"))
    ends = [header.index(name) + len(name) for name in rows["stage"][1:5]]
    qa_row = next(line for line in lines if line.startswith("key_facts_to_qa/qa "))
    assert [m.end() for m in re.finditer(r"[\d,]+", qa_row)][:4] == ends
    assert "limits.max_concurrency      960 requests/min" in text
    assert re.search(r"=> 600 requests/min, set by limits.requests_per_minute: 34 requests", text)
    assert "Completion tokens are an upper bound: max_tokens for every choice." in text
    assert "teacher returns as many items as it" in text
    assert max(len(line) for line in lines if line.startswith("  - ")) <= 100


def test_format_plan_without_rows_has_no_duration() -> None:
    text = format_plan(Plan(rows=0, rejects=3), make_config(), 5.0)
    assert "0 valid rows, 3 rejected" in text
    assert "Duration at" not in text


# --- against a real run -------------------------------------------------------------------

# What the simulator sees of a request is the start of its last message: enough for the stage.
HEADS = (
    (re.compile(r"Write an? (extractive|detailed) summary"), "summary"),
    (re.compile(r"Write exactly \d+ question-answer pairs"), "qa"),
    (re.compile(r"Write exactly \d+ questions?\b"), "questions"),
    (re.compile(r"Extract the key facts"), "key_facts"),
    (re.compile(r"Answer the question below"), "answer"),
    (re.compile(r"Decide whether the answer"), "judge"),
)


def stage_of(prompt_head: str) -> str:
    return next(stage for pattern, stage in HEADS if pattern.match(prompt_head))


@pytest.mark.parametrize(
    ("supports_n", "judge"), [(True, False), (False, True)], ids=["n", "no-n-judge"]
)
@pytest.mark.parametrize("gen_type", GEN_TYPES)
async def test_plan_predicts_the_requests_a_run_sends(
    tmp_path: Path, gen_type: str, supports_n: bool, judge: bool
) -> None:
    # The simulator fills every list to its maximum: the plan's assumption holds.
    async with running_simulator(SimulatorConfig(supports_n=supports_n)) as sim:
        config = config_for(
            sim.base_url,
            tmp_path,
            f"teacher.supports_n={str(supports_n).lower()}",
            f"generation.judge={str(judge).lower()}",
            f'generation.types=["{gen_type}"]',
        )
        plan = make_plan(config)
        stats = Stats()
        await run_job(config, stats, preflight=False)  # the plan counts the run's own
        received: dict[str, list[int]] = {}
        for log in sim.state.requests:
            received.setdefault(stage_of(log.prompt_head), []).append(log.n)
    assert sum(stats.failures.values()) == 0
    predicted = {
        part.stage.split("/")[1]: (part.requests, part.choices)
        for part in plan.stages[gen_type].values()
    }
    assert predicted == {stage: (len(ns), sum(ns)) for stage, ns in received.items()}
    assert plan.total().requests == stats.teacher.requests_sent


# --- the command line ---------------------------------------------------------------------


async def plan_cli(cwd: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    return await engine_cli("plan", str(REPO / "config" / "default.toml"), *args, cwd=cwd, env=env)


async def test_cli_plan_prints_the_table_and_sends_nothing(tmp_path: Path) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        env = {**os.environ, "TEACHER_MODEL_BASE_URL": sim.base_url, "TEACHER_MODEL_NAME": "m"}
        sets = [a for s in [*SMALL, f'output.dir="{tmp_path / "out"}"'] for a in ("--set", s)]
        seeds = f'input.seeds="{SAMPLE_SEEDS}"'
        code, text = await plan_cli(tmp_path, env, *sets, "--set", seeds, "--latency", "2")
        sent = sim.state.total_requests
    assert code == 0, text
    assert sent == 0
    assert not (tmp_path / "out").exists()
    lines = text.splitlines()
    assert lines[0] == "Plan (nothing is sent)"
    assert f"{SAMPLE_SEEDS}: 3 valid rows, 0 rejected" in text
    # SMALL: N=3 summaries (one n=3 request), Q=2 questions, F=2 facts, D=4 questions; 3 rows.
    expected = {
        "extractive_summary/summary": ["3", "9"],
        "extractive_summary/answer": ["18", "18"],
        "key_facts_to_qa/qa": ["6", "6"],
        "document_based_qa/answer": ["12", "12"],
    }
    for stage, numbers in expected.items():
        row = next(line for line in lines if line.startswith(stage + " "))
        assert table_cells(row)[1:3] == numbers
    total = next(line for line in lines if line.startswith("total "))
    assert table_cells(total)[1] == str(3 * 28)  # REQUESTS_PER_DOC in test_e2e
    assert "Duration at 2 s mean latency per request:" in text
    assert "Assumptions:" in text


async def test_cli_plan_without_seeds_exits_2(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TEACHER_MODEL_BASE_URL": "http://127.0.0.1:9/v1",
        "TEACHER_MODEL_NAME": "m",
    }
    missing = tmp_path / "missing.jsonl"
    code, text = await plan_cli(tmp_path, env, "--set", f'input.seeds="{missing}"')
    assert code == 2
    assert f"input.seeds: no such file: {missing}" in text
