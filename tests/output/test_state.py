"""The resume state's formats: the log (progress.jsonl), state.sqlite, and the fold of one into
the other; an output directory from before state.sqlite resumes."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson
import pytest

from engine.errors import ConfigError
from engine.output.checkpoint import (
    FAILURES_FILE,
    PROGRESS_FILE,
    Checkpoint,
    load_checkpoint,
    read_checkpoint,
)
from engine.output.records import Failure, UnitResult, make_record
from engine.output.state import STATE_FILE, STATE_VERSION, ResumeState
from engine.output.unitset import doc_id_of, doc_key
from engine.output.writer import OutputWriter, UnitDone, WriterItem
from engine.pipeline.stats import Stats
from tests.support.fakes import seed
from tests.support.runs import as_before_state, lines

TYPES = ["extractive_summary", "document_based_qa"]


def unit(n: int, gen_type: str = "extractive_summary", failures: int = 0) -> UnitDone:
    row = seed(f"document number {n}", n)
    records = [
        make_record(
            row, gen_type, (f"q{i:02d}",), document="d", question="Q?", response="A", model="m"
        )
        for i in range(2)
    ]
    lost = [Failure("answer", "q", "invalid_reply", "bad", check="no_json")] * failures
    return UnitDone(row, gen_type, UnitResult(records=records, failures=lost))


async def write(out: Path, items: list[WriterItem], *, fold_at: int = 10_000) -> None:
    """One writer run over ``items``, as a run's resume would start it."""
    checkpoint = load_checkpoint(out, fold_at=fold_at)
    try:
        writer = OutputWriter(out, TYPES, checkpoint, Stats(), fold_at=fold_at)
        queue: asyncio.Queue[WriterItem | None] = asyncio.Queue()
        for item in [*items, None]:
            queue.put_nowait(item)
        await writer.run(queue)
    finally:
        checkpoint.close()


def snapshot(checkpoint: Checkpoint, units: list[UnitDone]) -> tuple[object, ...]:
    done = [(u.seed.doc_id, u.gen_type) in checkpoint.done for u in units]
    return done, len(checkpoint.done), sorted(checkpoint.failed), checkpoint.lengths


def test_doc_keys_are_signed_64_bit_integers_and_come_back() -> None:
    for doc_id in ("0000000000000000", "7fffffffffffffff", "8000000000000000", "ffffffffffffffff"):
        key = doc_key(doc_id)
        assert isinstance(key, int) and -(2**63) <= key < 2**63
        assert doc_id_of(key) == doc_id
    assert doc_key("doc a") == "doc a" and doc_id_of("doc a") == "doc a"
    assert doc_key("FFFFFFFFFFFFFFFF") == "FFFFFFFFFFFFFFFF"  # not the engine's kind of id


async def test_a_short_log_is_read_whole_and_kept(tmp_path: Path) -> None:
    units = [unit(1), unit(2, failures=1), unit(3, "document_based_qa")]
    await write(tmp_path, units)
    progress = lines(tmp_path / PROGRESS_FILE)
    assert [p["records"] for p in progress] == [2, 2, 2]
    # Rows that did not come from a file have no position to record.
    assert all("at" not in p and "line" not in p for p in progress)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.log_entries == 3
    assert checkpoint.state is None  # nothing folded, no watermark: no database yet
    assert snapshot(checkpoint, units)[:3] == (
        [True, True, True],
        3,
        [(units[1].seed.doc_id, "extractive_summary")],
    )
    checkpoint.close()


async def test_a_long_log_is_folded_into_the_state_and_emptied(tmp_path: Path) -> None:
    units = [unit(n, failures=n % 7 == 0) for n in range(1, 60)]
    await write(tmp_path, units)  # no fold: the log holds everything
    kept = load_checkpoint(tmp_path)
    before = snapshot(kept, units)
    kept.close()

    folded = load_checkpoint(tmp_path, fold_at=10)
    assert (tmp_path / PROGRESS_FILE).read_bytes() == b""
    assert folded.log_entries == 0
    assert folded.state is not None and folded.state.count() == len(units)
    assert snapshot(folded, units) == before
    folded.close()
    # The state alone, in a new process as it were, says the same.
    again = load_checkpoint(tmp_path)
    assert snapshot(again, units) == before
    again.close()


async def test_the_writer_folds_the_log_as_the_run_goes(tmp_path: Path) -> None:
    units = [unit(n) for n in range(1, 26)]
    await write(tmp_path, units, fold_at=10)
    entries = len(lines(tmp_path / PROGRESS_FILE))
    assert entries < 10
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.state is not None and checkpoint.state.count() == 25 - entries
    assert len(checkpoint.done) == 25
    assert all((u.seed.doc_id, u.gen_type) in checkpoint.done for u in units)
    gen = tmp_path / "extractive_summary" / "gen.jsonl"
    assert checkpoint.lengths["extractive_summary/gen.jsonl"] == gen.stat().st_size
    assert len(lines(gen)) == 50
    checkpoint.close()


async def test_a_fold_done_twice_changes_nothing(tmp_path: Path) -> None:
    """A crash after the fold committed and before the log was emptied: the next start folds
    the same entries again."""
    units = [unit(n, failures=n == 3) for n in range(1, 30)]
    await write(tmp_path, units)
    log = (tmp_path / PROGRESS_FILE).read_bytes()
    first = load_checkpoint(tmp_path, fold_at=5)
    expected = snapshot(first, units)
    first.close()
    (tmp_path / PROGRESS_FILE).write_bytes(log)  # as if the truncation never happened
    second = load_checkpoint(tmp_path, fold_at=5)
    assert snapshot(second, units) == expected
    assert second.state is not None and second.state.count() == len(units)  # not counted twice
    second.close()


async def test_a_unit_run_again_takes_its_latest_entry(tmp_path: Path) -> None:
    lost, won = unit(1, failures=2), unit(1)
    await write(tmp_path, [lost, unit(2)], fold_at=1)
    checkpoint = load_checkpoint(tmp_path)
    assert sorted(checkpoint.failed) == [(lost.seed.doc_id, "extractive_summary")]
    checkpoint.close()
    await write(tmp_path, [won], fold_at=1)
    checkpoint = load_checkpoint(tmp_path)
    assert len(checkpoint.failed) == 0 and len(checkpoint.done) == 2
    checkpoint.close()


async def test_a_torn_entry_ends_the_fold_and_its_records_are_cut(tmp_path: Path) -> None:
    units = [unit(n) for n in range(1, 21)]
    await write(tmp_path, units)
    progress = tmp_path / PROGRESS_FILE
    data = progress.read_bytes()
    progress.write_bytes(data[:-10])  # the last unit's entry torn by a crash
    checkpoint = load_checkpoint(tmp_path, fold_at=5)
    assert [(u.seed.doc_id, u.gen_type) in checkpoint.done for u in units] == [True] * 19 + [False]
    assert len(lines(tmp_path / "extractive_summary" / "gen.jsonl")) == 38
    assert progress.read_bytes() == b""
    checkpoint.close()


async def test_an_output_directory_from_before_the_state_resumes(tmp_path: Path) -> None:
    """Only progress.jsonl, its entries without seed positions, as the engine wrote before
    state.sqlite: the first resume folds it; every unit is done, every length kept."""
    units = [unit(n, failures=n == 4) for n in range(1, 31)]
    await write(tmp_path, units)
    as_before_state(tmp_path)
    progress = tmp_path / PROGRESS_FILE
    old = [orjson.loads(line) for line in progress.read_bytes().splitlines()]
    sizes = {p: p.stat().st_size for p in tmp_path.rglob("*.jsonl") if p != progress}

    checkpoint = load_checkpoint(tmp_path, fold_at=10)
    assert (tmp_path / STATE_FILE).exists() and progress.read_bytes() == b""
    assert len(checkpoint.done) == 30
    assert all((u.seed.doc_id, u.gen_type) in checkpoint.done for u in units)
    assert sorted(checkpoint.failed) == [(units[3].seed.doc_id, "extractive_summary")]
    assert checkpoint.lengths == old[-1]["lengths"]
    assert {p: p.stat().st_size for p in sizes} == sizes
    with sqlite3.connect(tmp_path / STATE_FILE) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == STATE_VERSION
    checkpoint.close()


async def test_reading_the_state_changes_nothing(tmp_path: Path) -> None:
    units = [unit(n) for n in range(1, 12)]
    await write(tmp_path, units, fold_at=5)
    gen = tmp_path / "extractive_summary" / "gen.jsonl"
    with gen.open("ab") as f:
        f.write(b'{"half": ')  # a crash's torn record, which a resume would cut
    files = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    checkpoint = read_checkpoint(tmp_path)
    assert len(checkpoint.done) == 11
    checkpoint.close()
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files


def test_reading_a_directory_without_state_creates_none(tmp_path: Path) -> None:
    checkpoint = read_checkpoint(tmp_path)
    assert len(checkpoint.done) == 0
    assert not (tmp_path / STATE_FILE).exists()


def test_a_state_from_a_newer_engine_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / STATE_FILE) as db:
        db.execute(f"PRAGMA user_version = {STATE_VERSION + 1}")
    with pytest.raises(ConfigError, match="newer engine"):
        load_checkpoint(tmp_path)


def test_a_file_that_is_not_a_state_is_refused(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"not a database at all, " * 100)
    with pytest.raises(ConfigError, match="--fresh"):
        load_checkpoint(tmp_path)


def test_the_state_remembers_where_each_row_was(tmp_path: Path) -> None:
    entry = {
        "doc_id": "00000000000000ff",
        "gen_type": "key_facts_to_qa",
        "failures": 1,
        "line": 7,
        "at": 1234,
        "lengths": {FAILURES_FILE: 10},
    }
    with ResumeState.open(tmp_path) as state:
        assert state is not None
        state.apply([entry, {"lengths": {FAILURES_FILE: 12}}])
        [done] = state.units_of("00000000000000ff")
        assert (done.gen_type, done.failures, done.line, done.at) == ("key_facts_to_qa", 1, 7, 1234)
        assert state.lengths() == {FAILURES_FILE: 12}
        assert state.failed().types == {"key_facts_to_qa"}
        # An entry without a position (an older engine's) keeps the one known.
        state.apply([{**entry, "failures": 0, "line": None, "at": None}])
        [done] = state.units_of("00000000000000ff")
        assert (done.failures, done.line, done.at) == (0, 7, 1234)
        assert len(state.failed()) == 0
