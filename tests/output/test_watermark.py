"""The watermark: how far the seed file is finished, as units are committed out of order."""

from __future__ import annotations

from pathlib import Path

from engine.output.watermark import RowTracker, SeedFingerprint, Watermark

SEEDS = SeedFingerprint(100, 1, "abc")
TOP = Watermark(0, 1, 0, 0, 0, ("a", "b"), SEEDS, 1000)


def where(tracker: RowTracker) -> tuple[int, int, int, int, int]:
    mark = tracker.mark
    return mark.at, mark.line_no, mark.rows, mark.rejects, mark.rejects_end


def test_the_mark_moves_past_a_row_once_all_its_units_are_committed() -> None:
    tracker = RowTracker(TOP)
    tracker.row(1, 10, 2, valid=True)
    tracker.row(2, 25, 1, valid=True)
    assert where(tracker) == (0, 1, 0, 0, 0)
    tracker.finished(1)
    tracker.finished(2)  # row 2 done before row 1: the mark cannot pass row 1 yet
    assert where(tracker) == (0, 1, 0, 0, 0)
    tracker.finished(1)
    assert where(tracker) == (25, 3, 2, 0, 0)


def test_rows_done_before_and_rejects_count_and_rejects_end_is_kept() -> None:
    tracker = RowTracker(TOP)
    tracker.row(1, 10, 0, valid=True)  # all its units done before: finished at once
    assert where(tracker) == (10, 2, 1, 0, 0)
    tracker.row(2, 12, 1, valid=False)  # a reject, finished when the writer wrote it
    tracker.row(3, 30, 1, valid=True)
    tracker.finished(2, rejects_end=57)
    assert where(tracker) == (12, 3, 1, 1, 57)
    tracker.finished(3)
    assert where(tracker) == (30, 4, 2, 1, 57)


def test_finished_rows_behind_an_open_one_are_merged_not_kept() -> None:
    """Millions of done rows skipped behind one slow unit hold one span, not millions."""
    tracker = RowTracker(TOP)
    tracker.row(1, 10, 1, valid=True)
    end = 10
    for line in range(2, 100_002):
        end += 7
        tracker.row(line, end, 0, valid=True)
    assert tracker.open_rows == 2
    tracker.finished(1)
    assert where(tracker) == (end, 100_002, 100_001, 0, 0)
    assert tracker.open_rows == 0


def test_units_of_rows_it_did_not_register_are_ignored() -> None:
    """Rows read again from before the start (units that lost items) do not move it."""
    start = Watermark(500, 40, 35, 4, 99, ("a",), SEEDS, 1000)
    tracker = RowTracker(start)
    tracker.finished(7)
    assert tracker.mark == start
    tracker.row(40, 530, 1, valid=True)
    tracker.finished(40)
    assert where(tracker) == (530, 41, 36, 4, 99)


def test_the_watermark_round_trips() -> None:
    mark = Watermark(500, 40, 35, 4, 99, ("a", "b"), SEEDS, 1000)
    assert Watermark.from_json(mark.to_json()) == mark
    assert Watermark.from_json({"at": 1}) is None
    assert Watermark.from_json(None) is None


def test_the_fingerprint_changes_with_the_content(tmp_path: Path) -> None:
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(b"one\n")
    first = SeedFingerprint.of(path)
    assert SeedFingerprint.of(path) == first
    with path.open("ab") as f:
        f.write(b"two\n")
    assert SeedFingerprint.of(path) != first
