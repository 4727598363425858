"""Shared set-up and checks of whole runs: the sample seeds and the small fan-out the tests
use, the config for a run against a local server, and what complete output looks like."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from engine.config import Config, load_config
from engine.errors import FatalRunError
from engine.output.checkpoint import PROGRESS_FILE, load_checkpoint
from engine.output.records import record_fields
from engine.output.state import STATE_FILE
from engine.pipeline.job import run_job
from engine.pipeline.preflight import PROBE_PROMPT
from engine.pipeline.stats import Stats
from engine.testing.simulator import (
    RequestLog,
    RunningSimulator,
    SimulatorConfig,
    SimulatorState,
    running_simulator,
)
from tests.support.faults import FaultInjector, Plan, Seen

REPO = Path(__file__).resolve().parents[2]


SAMPLE_SEEDS = REPO / "config" / "sample_seeds.jsonl"


TEXT_FIELDS = ("question", "response", "document", "document_outline", "domain")


# Where the raw chunk is: Module 4 renames base_document to raw_document for document QA only.
CHUNK_FIELD = {"document_based_qa": "base_document"}


# Small fan-out: N summaries, Q questions each, F facts x P pairs, D document questions.
N, Q, F, P, D = 3, 2, 2, 3, 4


EXPECTED_PER_DOC = {
    "extractive_summary": N * Q,
    "detailed_summary": N * Q,
    "key_facts_to_qa": F * P,
    "document_based_qa": D,
}


# Requests per document: one summary request (n=N) + N question requests + N*Q answers per
# summary type; one key-facts request + F pair requests; one question request + D answers.
REQUESTS_PER_DOC = 2 * (1 + N + N * Q) + (1 + F) + (1 + D)


SMALL = [
    f"generation.extractive_summary.summaries={N}",
    f"generation.extractive_summary.questions_per_summary={Q}",
    f"generation.detailed_summary.summaries={N}",
    f"generation.detailed_summary.questions_per_summary={Q}",
    f"generation.key_facts_to_qa.max_facts={F}",
    f"generation.key_facts_to_qa.qa_per_fact={P}",
    f"generation.document_based_qa.questions={D}",
    "limits.requests_per_minute=100000",
]


def config_for(base_url: str, out: Path, *extra: str) -> Config:
    overrides = [*SMALL, f'output.dir="{out}"', f'input.seeds="{SAMPLE_SEEDS}"', *extra]
    env = {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": "sim-teacher"}
    return load_config(REPO / "config" / "default.toml", overrides, environ=env, dotenv_path=out)


def pipeline_requests(sim: RunningSimulator) -> list[RequestLog]:
    """The chat requests the server got for the data, without the preflight's probes."""
    return [log for log in sim.state.requests if log.prompt_head != PROBE_PROMPT]


def read_gen(out: Path, gen_type: str) -> list[dict[str, Any]]:
    path = out / gen_type / "gen.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def seed_count() -> int:
    return len(SAMPLE_SEEDS.read_bytes().splitlines())


def assert_record_shape(record: dict[str, Any], gen_type: str) -> None:
    """Every field of the type, in order, and the texts Module 4 reads not empty."""
    assert list(record) == list(record_fields(gen_type)), gen_type
    for field in (*TEXT_FIELDS, CHUNK_FIELD.get(gen_type, "raw_document"), "id", "doc_id"):
        assert isinstance(record[field], str) and record[field].strip(), (gen_type, field)


def assert_complete_output(out: Path) -> None:
    docs = seed_count()
    for gen_type, per_doc in EXPECTED_PER_DOC.items():
        records = read_gen(out, gen_type)
        assert len(records) == docs * per_doc, gen_type
        assert len({r["id"] for r in records}) == len(records), gen_type
        for record in records:
            assert record["gen_type"] == gen_type
            assert_record_shape(record, gen_type)
        if gen_type.endswith("summary"):
            per_doc_documents: dict[str, set[str]] = {}
            for record in records:
                per_doc_documents.setdefault(record["doc_id"], set()).add(record["document"])
            assert all(len(d) == N for d in per_doc_documents.values()), gen_type
        if gen_type == "key_facts_to_qa":
            assert all(r["key_fact"].strip() for r in records)
    assert not (out / "failures.jsonl").exists() or (out / "failures.jsonl").stat().st_size == 0


MAX_ATTEMPTS = 4


RETRY = [
    "retry.backoff_base_s=0.01",
    "retry.backoff_max_s=0.05",
    f"retry.max_attempts={MAX_ATTEMPTS}",
    # Should a streak of resets or 502/503s look like an outage, the probes stay quick too.
    "retry.outage_probe_base_s=0.01",
    "retry.outage_probe_max_s=0.05",
]


# Distinct requests of a clean run (the simulator's replies depend only on the prompt, so the
# set of requests is the same in every run, whatever the order they arrive in).
TOTAL = seed_count() * REQUESTS_PER_DOC


SEED_DOCUMENTS = [orjson.loads(line)["document"] for line in SAMPLE_SEEDS.read_bytes().splitlines()]


@dataclass(frozen=True)
class Run:
    stats: Stats
    injector: FaultInjector
    server: SimulatorState
    elapsed: float


async def faulted_run(
    out: Path,
    plan: Plan,
    *extra: str,
    server_key: str | None = None,
    key: str | None = None,
    release: Callable[[], None] = lambda: None,
) -> Run:
    """One whole ``run_job`` against a simulator whose requests go through ``plan``.

    ``release`` runs before the server stops, so it does not wait for requests still hanging.
    A run stopped by a fatal error raises that error. Without the preflight: the plans pick
    requests by arrival order, and these tests count the pipeline's requests exactly (the
    preflight's own faults are test_preflight.py's).
    """
    injector = FaultInjector(plan)
    key_set = [f'teacher.api_key="{key}"'] if key is not None else []
    async with running_simulator(SimulatorConfig(fault=injector, api_key=server_key)) as sim:
        config = config_for(sim.base_url, out, *RETRY, *key_set, *extra)
        stats = Stats()
        started = time.monotonic()
        try:
            await run_job(config, stats, preflight=False)
        except BaseExceptionGroup as group:
            # A run stopped by a fatal error: raise that error, not the task groups around it.
            fatal = leaves(group)
            if len(fatal) == 1 and isinstance(fatal[0], FatalRunError):
                raise fatal[0] from group
            raise
        finally:
            elapsed = time.monotonic() - started
            release()
    return Run(stats, injector, sim.state, elapsed)


def is_document_answer(seen: Seen) -> bool:
    """A request of the ``document_based_qa/answer`` stage: an answer grounded in a chunk itself
    (the summary flows ask the same kind of question of a summary)."""
    prompt = seen.prompt
    return prompt.startswith("Answer the question below using the document.") and any(
        f"<document>\n{doc}\n</document>" in prompt for doc in SEED_DOCUMENTS
    )


def failure_lines(out: Path) -> list[dict[str, Any]]:
    path = out / "failures.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


DOCS = 40


def corpus(path: Path, docs: int = DOCS) -> Path:
    """``docs`` distinct, valid seed rows (the sample's, each chunk numbered)."""
    rows = [orjson.loads(line) for line in SAMPLE_SEEDS.read_bytes().splitlines()]
    lines = []
    for i in range(docs):
        row = dict(rows[i % len(rows)])
        row["document"] = f"Part {i + 1}. {row['document']}"
        lines.append(orjson.dumps(row))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def records(out: Path, gen_type: str) -> list[dict[str, Any]]:
    path = out / gen_type / "gen.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def assert_complete(out: Path, docs: int = DOCS) -> None:
    """Every record of every unit, each once, and nothing listed as lost."""
    for gen_type, per_doc in EXPECTED_PER_DOC.items():
        got = records(out, gen_type)
        ids = [r["id"] for r in got]
        assert len(ids) == len(set(ids)) == docs * per_doc, gen_type
    failures = out / "failures.jsonl"
    assert not failures.exists() or failures.read_bytes() == b""
    assert len(load_checkpoint(out).failed) == 0


def leaves(err: BaseException) -> list[BaseException]:
    if isinstance(err, BaseExceptionGroup):
        return [leaf for sub in err.exceptions for leaf in leaves(sub)]
    return [err]


def as_before_state(out: Path) -> None:
    """Make ``out`` look as an engine from before ``state.sqlite`` left it: no state file,
    and progress entries without their seed positions (``line``, ``at``)."""
    (out / STATE_FILE).unlink(missing_ok=True)
    progress = out / PROGRESS_FILE
    entries = [orjson.loads(line) for line in progress.read_bytes().splitlines()]
    for entry in entries:
        entry.pop("line", None)
        entry.pop("at", None)
    progress.write_bytes(b"".join(orjson.dumps(entry) + b"\n" for entry in entries))
