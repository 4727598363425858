from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from engine.budget import PassBudget
from engine.output.checkpoint import PROGRESS_FILE, UnitSet, load_checkpoint
from engine.output.records import Failure, UnitResult, make_record
from engine.output.writer import OutputWriter, UnitDone, WriterItem
from engine.pipeline.stats import Stats
from engine.seeds import Reject, doc_id_for
from tests.support.fakes import seed
from tests.support.runs import lines

TYPES = ["extractive_summary", "document_based_qa"]


def unit(text: str, gen_type: str, pairs: int, failures: int = 0) -> UnitDone:
    row = seed(text)
    records = [
        make_record(
            row, gen_type, (f"q{i:02d}",), document=text, question=f"Q{i}?", response="A", model="m"
        )
        for i in range(pairs)
    ]
    lost = [
        Failure("answer", f"question {i}", "invalid_reply", "bad", check="no_json")
        for i in range(failures)
    ]
    return UnitDone(row, gen_type, UnitResult(records=records, failures=lost))


async def write_all(out: Path, items: list[WriterItem]) -> Stats:
    stats = Stats()
    writer = OutputWriter(out, TYPES, load_checkpoint(out), stats)
    queue: asyncio.Queue[WriterItem | None] = asyncio.Queue()
    for item in [*items, None]:
        queue.put_nowait(item)
    await writer.run(queue)
    return stats


async def test_units_rejects_and_failures_land_in_their_files(tmp_path: Path) -> None:
    stats = await write_all(
        tmp_path,
        [
            unit("doc a", "extractive_summary", 3),
            Reject(7, "blank line", ""),
            unit("doc a", "document_based_qa", 2, failures=1),
        ],
    )
    assert len(lines(tmp_path / "extractive_summary/gen.jsonl")) == 3
    assert len(lines(tmp_path / "document_based_qa/gen.jsonl")) == 2
    [failure] = lines(tmp_path / "failures.jsonl")
    assert failure["gen_type"] == "document_based_qa" and failure["kind"] == "invalid_reply"
    assert failure["check"] == "no_json"
    assert lines(tmp_path / "rejects.jsonl") == [{"line": 7, "reason": "blank line", "excerpt": ""}]
    assert [p["records"] for p in lines(tmp_path / PROGRESS_FILE)] == [3, 2]
    assert stats.records == {"extractive_summary": 3, "document_based_qa": 2}
    assert stats.rejects == 1 and stats.failures == {"invalid_reply": 1}


async def test_every_type_gets_a_file_even_without_records(tmp_path: Path) -> None:
    await write_all(tmp_path, [])
    for gen_type in TYPES:
        assert (tmp_path / gen_type / "gen.jsonl").read_bytes() == b""


async def test_resume_cuts_a_half_written_unit_and_a_torn_line(tmp_path: Path) -> None:
    await write_all(tmp_path, [unit("doc a", "extractive_summary", 2)])
    gen = tmp_path / "extractive_summary/gen.jsonl"
    committed = gen.read_bytes()
    # A crash after part of the next unit was written, mid-line, before its progress line.
    with gen.open("ab") as f:
        f.write(orjson.dumps({"id": "partial"}) + b"\n" + b'{"id": "tor')
    with (tmp_path / "failures.jsonl").open("ab") as f:
        f.write(b'{"half": ')
    checkpoint = load_checkpoint(tmp_path)
    assert gen.read_bytes() == committed
    assert (tmp_path / "failures.jsonl").read_bytes() == b""
    assert checkpoint.is_done(doc_id_for("doc a"), "extractive_summary")
    assert not checkpoint.is_done(doc_id_for("doc a"), "document_based_qa")


async def test_a_torn_progress_line_means_that_unit_is_redone(tmp_path: Path) -> None:
    await write_all(tmp_path, [unit("doc a", "extractive_summary", 2)])
    await write_all(tmp_path, [unit("doc b", "extractive_summary", 3)])
    progress = tmp_path / PROGRESS_FILE
    data = progress.read_bytes()
    progress.write_bytes(data[:-5])  # the second unit's progress line was torn by a crash
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.is_done(doc_id_for("doc a"), "extractive_summary")
    assert not checkpoint.is_done(doc_id_for("doc b"), "extractive_summary")
    assert len(lines(tmp_path / "extractive_summary/gen.jsonl")) == 2
    assert len(lines(progress)) == 1
    # Resuming appends after the cut: each unit's records exactly once.
    await write_all(tmp_path, [unit("doc b", "extractive_summary", 3)])
    ids = [r["id"] for r in lines(tmp_path / "extractive_summary/gen.jsonl")]
    assert len(ids) == len(set(ids)) == 5


async def test_cancelled_writer_still_commits_units_that_arrived(tmp_path: Path) -> None:
    stats = Stats()
    writer = OutputWriter(tmp_path, TYPES, load_checkpoint(tmp_path), stats)
    queue: asyncio.Queue[WriterItem | None] = asyncio.Queue()
    task = asyncio.create_task(writer.run(queue))
    await asyncio.sleep(0)  # the writer now waits for work
    queue.put_nowait(unit("doc a", "extractive_summary", 2))
    queue.put_nowait(unit("doc b", "extractive_summary", 1))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(lines(tmp_path / "extractive_summary/gen.jsonl")) == 3
    assert len(load_checkpoint(tmp_path).done) == 2


async def test_units_that_finished_together_are_written_a_few_a_pass(tmp_path: Path) -> None:
    """Past the pass budget, the writer lets the loop turn between units; cancelled while it
    waits for its turn, it still writes and commits the rest of its batch."""
    ticks = iter(range(1_000_000))
    budget = PassBudget(slice_s=0.0015, clock=lambda: next(ticks) / 1000)  # 2 units a pass
    writer = OutputWriter(tmp_path, TYPES, load_checkpoint(tmp_path), Stats(), budget=budget)
    queue: asyncio.Queue[WriterItem | None] = asyncio.Queue()
    for i in range(6):
        queue.put_nowait(unit(f"doc {i}", "extractive_summary", 2))
    task = asyncio.create_task(writer.run(queue))
    for _ in range(10):  # until the writer, 2 units into its batch of 6, waits for a turn
        if budget.deferred:
            break
        await asyncio.sleep(0)
    assert budget.deferred == 1
    assert len(lines(tmp_path / "extractive_summary/gen.jsonl")) < 12
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(lines(tmp_path / "extractive_summary/gen.jsonl")) == 12
    assert len(load_checkpoint(tmp_path).done) == 6


async def test_rejects_are_recomputed_each_run(tmp_path: Path) -> None:
    await write_all(tmp_path, [Reject(1, "blank line", "")])
    await write_all(tmp_path, [Reject(1, "blank line", "")])
    assert len(lines(tmp_path / "rejects.jsonl")) == 1


async def test_retrying_a_unit_adds_only_missing_records_and_replaces_its_failures(
    tmp_path: Path,
) -> None:
    first = unit("doc a", "extractive_summary", 2, failures=1)
    other = unit("doc b", "extractive_summary", 1, failures=1)
    await write_all(tmp_path, [first, other])
    checkpoint = load_checkpoint(tmp_path)
    assert set(checkpoint.failed) == {
        (first.seed.doc_id, first.gen_type),
        (other.seed.doc_id, first.gen_type),
    }

    # Rerun doc a: its two records come again (same ids) plus the one that failed before.
    retried = unit("doc a", "extractive_summary", 3)
    stats = await rerun(tmp_path, [retried], UnitSet([(first.seed.doc_id, first.gen_type)]))

    ids = [r["id"] for r in lines(tmp_path / "extractive_summary/gen.jsonl")]
    assert len(ids) == len(set(ids)) == 4
    assert stats.records == {"extractive_summary": 1}
    # doc a's old failure line is gone; doc b's stays.
    assert [f["doc_id"] for f in lines(tmp_path / "failures.jsonl")] == [other.seed.doc_id]
    resumed = load_checkpoint(tmp_path)
    assert set(resumed.failed) == {(other.seed.doc_id, "extractive_summary")}
    assert (tmp_path / "failures.jsonl").stat().st_size == resumed.lengths["failures.jsonl"]
    assert stats.lost_before == {"invalid_reply: no_json": 1}
    assert stats.recovered == 1
    assert stats.still_lost == {"invalid_reply: no_json": 1}  # doc b's


async def rerun(out: Path, items: list[WriterItem], retrying: UnitSet) -> Stats:
    stats = Stats()
    writer = OutputWriter(out, TYPES, load_checkpoint(out), stats, retrying=retrying)
    queue: asyncio.Queue[WriterItem | None] = asyncio.Queue()
    for item in [*items, None]:
        queue.put_nowait(item)
    await writer.run(queue)
    return stats


async def test_units_run_again_keep_their_failure_lines_until_they_are_redone(
    tmp_path: Path,
) -> None:
    """A re-run that stops before a unit it was to redo leaves that unit's lines in place."""
    a = unit("doc a", "extractive_summary", 1, failures=2)
    b = unit("doc b", "document_based_qa", 1, failures=1)
    await write_all(tmp_path, [a, b])
    both = UnitSet([(a.seed.doc_id, a.gen_type), (b.seed.doc_id, b.gen_type)])
    # Only doc a is redone, and it loses one of the two items again.
    stats = await rerun(tmp_path, [unit("doc a", "extractive_summary", 2, failures=1)], both)
    failures = lines(tmp_path / "failures.jsonl")
    assert sorted((f["doc_id"], f["gen_type"]) for f in failures) == sorted(
        [(a.seed.doc_id, a.gen_type), (b.seed.doc_id, b.gen_type)]
    )
    assert stats.lost_before == {"invalid_reply: no_json": 3}
    assert stats.recovered == 1
    assert stats.still_lost == {"invalid_reply: no_json": 2}
    assert load_checkpoint(tmp_path).lengths["failures.jsonl"] == sum(
        len(line) + 1 for line in (tmp_path / "failures.jsonl").read_bytes().splitlines()
    )


async def test_a_cancelled_rerun_still_drops_the_lines_of_the_units_it_redid(
    tmp_path: Path,
) -> None:
    a = unit("doc a", "extractive_summary", 1, failures=1)
    await write_all(tmp_path, [a])
    stats = Stats()
    retrying = UnitSet([(a.seed.doc_id, a.gen_type)])
    writer = OutputWriter(tmp_path, TYPES, load_checkpoint(tmp_path), stats, retrying=retrying)
    queue: asyncio.Queue[WriterItem | None] = asyncio.Queue()
    task = asyncio.create_task(writer.run(queue))
    await asyncio.sleep(0)
    queue.put_nowait(unit("doc a", "extractive_summary", 2))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lines(tmp_path / "failures.jsonl") == []
    assert stats.recovered == 1 and not stats.still_lost


async def test_lines_of_units_since_done_in_full_are_dropped(tmp_path: Path) -> None:
    """A crash between a unit's redo and the rewrite at the end leaves its old lines behind:
    the next run drops them, since the unit's last progress says it lost nothing."""
    a = unit("doc a", "extractive_summary", 1, failures=1)
    await write_all(tmp_path, [a])
    stale = (tmp_path / "failures.jsonl").read_bytes()
    await write_all(tmp_path, [unit("doc a", "extractive_summary", 2)])  # not as a redo
    assert (tmp_path / "failures.jsonl").read_bytes() == stale
    stats = await write_all(tmp_path, [])
    assert (tmp_path / "failures.jsonl").read_bytes() == b""
    assert not stats.lost_before and not stats.still_lost


def test_unit_set_holds_engine_ids_compactly_and_other_ids_as_they_are() -> None:
    units = UnitSet([("0123456789abcdef", "a"), ("doc a", "a"), ("0123456789abcdef", "b")])
    assert ("0123456789abcdef", "a") in units
    assert ("0123456789abcdef", "c") not in units
    assert ("doc a", "a") in units and ("doc a", "b") not in units
    assert len(units) == 3
    assert sorted(units) == [("0123456789abcdef", "a"), ("0123456789abcdef", "b"), ("doc a", "a")]
    units.discard(("0123456789abcdef", "a"))
    assert ("0123456789abcdef", "a") not in units and len(units) == 2
