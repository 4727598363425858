"""Progress: the figures, the plain log lines without a terminal, the rich display with one.

Time is injected (a list the test moves, or the virtual-clock loop of ``tests/clock.py``), so
every figure and every line's moment is exact.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from engine.config import Config, LimitsConfig, load_config
from engine.pipeline.stats import Stats
from engine.progress import display as progress
from engine.progress.display import Progress, RateWindow, Totals, count_units, show_progress
from engine.progress.view import line, render
from engine.seeds import doc_id_for
from tests.support.clock import run_virtual
from tests.support.runs import REPO, SAMPLE_SEEDS

TYPES = ("extractive_summary", "detailed_summary", "key_facts_to_qa", "document_based_qa")
LIMITS = LimitsConfig(requests_per_minute=600, tokens_per_minute=100_000, max_concurrency=32)
GOOD = SAMPLE_SEEDS.read_bytes().splitlines()
# 10 valid rows; 2 units of each type done before this run.
TOTALS = Totals(10, dict.fromkeys(TYPES, 2))


class FakeLimiter:
    in_flight = 5
    concurrency = 24  # shrunk from 32 after 429s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress_for(
    stats: Stats,
    clock: Callable[[], float],
    *,
    totals: Totals | None = TOTALS,
    stream: io.StringIO | None = None,
    terminal: bool | None = None,
) -> Progress:
    return Progress(
        stats,
        TYPES,
        LIMITS,
        60.0,
        limiter=FakeLimiter(),
        totals=totals,
        stream=stream if stream is not None else io.StringIO(),
        terminal=terminal,
        clock=clock,
    )


def busy(stats: Stats) -> None:
    """A run 30 s in: 7 units done, 60 requests and 30,000 tokens sent, some retries."""
    stats.units_done.update({"extractive_summary": 3, "document_based_qa": 4})
    stats.teacher.requests_sent = 60
    stats.teacher.prompt_tokens, stats.teacher.completion_tokens = 20_000, 10_000
    stats.teacher.retries.update({"429": 2, "timeout": 1})
    stats.failures.update({"request_rejected": 1})
    stats.teacher.cache_hits = 4
    # 80 reply choices: 76 accepted, 4 rejected by the checks.
    for _ in range(76):
        stats.count_reply("document_based_qa/answer")
    for check in ("blank", "blank", "duplicate", "no_json"):
        stats.count_reply("document_based_qa/questions", check)


def test_snapshot_figures() -> None:
    stats, clock = Stats(), Clock()
    shown = progress_for(stats, clock)
    clock.now += 30
    busy(stats)
    snap = shown.snapshot()
    by_type = {t.gen_type: (t.finished, t.done, t.skipped, t.total) for t in snap.types}
    assert by_type == {
        "extractive_summary": (5, 3, 2, 10),
        "detailed_summary": (2, 0, 2, 10),
        "key_facts_to_qa": (2, 0, 2, 10),
        "document_based_qa": (6, 4, 2, 10),
    }
    assert (snap.done, snap.skipped, snap.total) == (7, 8, 40)
    assert (snap.in_flight, snap.concurrency) == (5, 24)
    # 60 requests and 30,000 tokens in 30 s.
    assert (snap.requests_per_minute, snap.tokens_per_minute) == (120.0, 60_000.0)
    assert (snap.rpm_cap, snap.tpm_cap) == (600, 100_000)
    # 25 units left at this run's 7 units in 30 s (the 8 done before do not count).
    assert snap.eta == pytest.approx(25 * 30 / 7)
    assert snap.retries == {"429": 2, "timeout": 1}
    assert snap.failures == {"request_rejected": 1}
    assert snap.cached == 4
    assert (snap.replies, snap.rejected) == (80, 4)


def test_eta_is_unknown_until_a_unit_is_done_and_zero_at_the_end() -> None:
    stats, clock = Stats(), Clock()
    shown = progress_for(stats, clock, totals=Totals(1, dict.fromkeys(TYPES, 0)))
    clock.now += 5
    assert shown.snapshot().eta is None
    stats.units_done.update(dict.fromkeys(TYPES, 1))
    assert shown.snapshot().eta == 0.0


def test_without_a_count_totals_are_unknown_and_skipped_units_come_from_stats() -> None:
    stats, clock = Stats(), Clock()
    shown = progress_for(stats, clock, totals=None)
    stats.units_skipped["key_facts_to_qa"] = 3
    clock.now += 30
    snap = shown.snapshot()
    assert snap.total is None and snap.eta is None
    assert [t.skipped for t in snap.types] == [0, 0, 3, 0]
    assert "units 3/? (this run 0, done before 3)" in line(snap)


def test_rates_cover_the_last_minute_only() -> None:
    window = RateWindow(span=60.0)
    window.add(0.0, 0, 0)
    for second in range(1, 61):  # 10 requests and 1,000 tokens a second for a minute
        window.add(float(second), 10 * second, 1000 * second)
    assert window.per_minute() == (600.0, 60_000.0)
    for second in range(61, 121):  # then nothing for a minute
        window.add(float(second), 600, 60_000)
    assert window.per_minute() == (0.0, 0.0)
    assert len(window._samples) <= 62  # bounded by the samples of one window


def test_rates_need_a_few_seconds_of_window() -> None:
    window = RateWindow()
    window.add(0.0, 0, 0)
    window.add(1.0, 15, 0)  # the limiter's start-up burst, not a rate
    assert window.per_minute() is None
    window.add(progress.MIN_RATE_SPAN_S, 100, 0)
    assert window.per_minute() == (600.0, 0.0)


def test_the_line_holds_every_figure() -> None:
    stats, clock = Stats(), Clock()
    shown = progress_for(stats, clock)
    clock.now += 30
    busy(stats)
    assert line(shown.snapshot()) == (
        "progress: units 15/40 38% (this run 7, done before 8): extractive_summary 5/10, "
        "detailed_summary 2/10, key_facts_to_qa 2/10, document_based_qa 6/10 | in flight 5/24 | "
        "requests/min 120/600 | tokens/min 60000/100000 | retries 3 (429=2 timeout=1) | "
        "failed items 1 (request_rejected=1) | rejected replies 4/80 (5.0%) | cached 4 | "
        "elapsed 0:00:30 | ETA 0:01:47"
    )


def test_no_caps_and_no_limiter() -> None:
    stats, clock = Stats(), Clock()
    limits = LimitsConfig(tokens_per_minute=0)
    shown = Progress(stats, TYPES, limits, 60.0, stream=io.StringIO(), clock=clock)
    clock.now += 30
    text = line(shown.snapshot())
    assert "in flight ?/?" in text and "tokens/min 0/no cap" in text


def test_plain_lines_come_every_interval_with_the_figures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a terminal, one log line per interval, by the run's own clock (the virtual
    loop's): none before the first interval, each with the figures of its moment."""
    stats = Stats()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        shown = progress_for(stats, loop.time)
        assert not shown.live
        with shown.shown():
            await asyncio.sleep(30)
            busy(stats)
            await asyncio.sleep(59)  # t=89
            stats.units_done["detailed_summary"] += 1
            stats.teacher.requests_sent += 60
            await asyncio.sleep(61.5)  # t=150.5: past the second line, short of a third

    with caplog.at_level(logging.INFO, logger="engine.progress.display"):
        run_virtual(run())
    lines = [r.getMessage() for r in caplog.records if r.name == "engine.progress.display"]
    assert len(lines) == 2, lines
    first, second = lines
    assert "elapsed 0:01:00" in first and "units 15/40" in first
    # 60 requests between t=0 and t=30, in a window of the last 60 s (t=0..60).
    assert "requests/min 60/600" in first and "ETA 0:03:34" in first
    assert "elapsed 0:02:00" in second and "units 16/40" in second
    # The minute from t=60 to t=120 holds the 60 requests sent at t=89.
    assert "requests/min 60/600" in second and "detailed_summary 3/10" in second


def test_plain_mode_stops_with_its_block_even_on_an_error() -> None:
    stats = Stats()

    async def run() -> Progress:
        shown = progress_for(stats, asyncio.get_running_loop().time)
        with pytest.raises(RuntimeError), shown.shown():
            await asyncio.sleep(5.5)
            raise RuntimeError("a fatal error in the run")
        ticks = shown.ticks
        await asyncio.sleep(300)  # no timer left behind
        assert shown.ticks == ticks
        return shown

    assert run_virtual(run()).ticks == 5


def test_the_rich_display_renders_the_figures() -> None:
    stats, clock = Stats(), Clock()
    shown = progress_for(stats, clock)
    clock.now += 30
    busy(stats)
    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    console.print(render(shown.snapshot()))
    text = console.export_text()
    rows = [" ".join(row.split()) for row in text.splitlines()]
    assert "type done this run before" in rows[0]
    assert rows[1].startswith("extractive_summary 5/10 3 2 ") and rows[1].endswith("50%")
    assert rows[4].startswith("document_based_qa 6/10 4 2 ") and rows[4].endswith("60%")
    assert "in flight 5/24 requests/min 120 of 600 tokens/min 60000 of 100000" in rows
    assert (
        "retries 3 (429=2 timeout=1) failed items 1 (request_rejected=1) "
        "rejected replies 4/80 (5.0%) cached replies 4"
    ) in rows
    assert "elapsed 0:00:30 ETA 0:01:47" in rows


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_live_display_routes_logging_above_itself_and_stops_cleanly() -> None:
    stats = Stats()
    screen = io.StringIO()
    terminal = logging.StreamHandler(TtyBuffer())  # what basicConfig gives a terminal
    root = logging.getLogger()
    root.addHandler(terminal)
    try:
        shown = progress_for(stats, Clock(), stream=screen, terminal=True)
        assert shown.live
        with pytest.raises(asyncio.CancelledError), shown.shown():
            assert terminal not in root.handlers
            logging.getLogger("engine.pipeline.shutdown").warning("SIGINT: taking no new work")
            busy(stats)
            raise asyncio.CancelledError  # as a second signal ends a run
        assert terminal in root.handlers
    finally:
        root.removeHandler(terminal)
    assert terminal.stream.getvalue() == ""
    text = screen.getvalue()
    assert "SIGINT: taking no new work" in text
    last_frame = " ".join(text[text.rindex("type") :].split())
    assert "extractive_summary 5/10 3 2" in last_frame  # with the figures at the end
    assert text.endswith("\x1b[?25h")  # the cursor is given back


def test_a_failing_display_costs_the_display_not_the_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> Progress:
        shown = progress_for(Stats(), Clock(), terminal=True)
        with shown.shown():
            monkeypatch.setattr(progress, "render", _broken_render)
            await asyncio.sleep(progress.LIVE_REFRESH_S * 3.5)
        return shown

    shown = run_virtual(run())
    assert shown.ticks == 1  # the timer is not armed again
    assert "progress display failed (ValueError('bug'))" in caplog.text
    assert "Traceback" not in caplog.text


def _broken_render(_snap: object) -> str:
    raise ValueError("bug")


def test_the_live_display_refreshes_twice_a_second() -> None:
    async def run() -> int:
        shown = progress_for(Stats(), Clock(), terminal=True)
        with shown.shown():
            await asyncio.sleep(10.25)
        return shown.ticks

    assert run_virtual(run()) == 20


def seed_file(path: Path) -> Path:
    bad = b'{"document": "unterminated'
    path.write_bytes(b"\n".join([GOOD[0], bad, GOOD[1], GOOD[0], GOOD[2]]) + b"\n")
    return path


def test_count_units_counts_valid_rows_and_what_this_run_skips(tmp_path: Path) -> None:
    seeds = seed_file(tmp_path / "seeds.jsonl")
    done = {(doc_id_for(orjson.loads(GOOD[1])["document"]), "key_facts_to_qa")}
    totals = count_units(seeds, 60_000, TYPES, lambda d, t: (d, t) not in done)
    assert totals == Totals(3, {**dict.fromkeys(TYPES, 0), "key_facts_to_qa": 1})


def test_count_units_stops_when_asked(tmp_path: Path) -> None:
    seeds = seed_file(tmp_path / "seeds.jsonl")
    assert count_units(seeds, 60_000, TYPES, lambda d, t: True, lambda: True) is None


class FakeScheduler:
    def __init__(self, done: set[tuple[str, str]], *, stopping: bool = False) -> None:
        self.done = done
        self.stopping = stopping

    def wanted(self, doc_id: str, gen_type: str) -> bool:
        return (doc_id, gen_type) not in self.done


def config_with(seeds: Path, tmp_path: Path) -> Config:
    overrides = [f'input.seeds="{seeds}"', 'teacher.base_url="http://127.0.0.1:9/v1"']
    return load_config(
        REPO / "config" / "default.toml",
        [*overrides, 'teacher.model="m"'],
        environ={},
        dotenv_path=tmp_path,
    )


async def test_show_progress_counts_the_units_before_the_run(tmp_path: Path) -> None:
    config = config_with(seed_file(tmp_path / "seeds.jsonl"), tmp_path)
    done = {(doc_id_for(orjson.loads(GOOD[2])["document"]), "document_based_qa")}
    stats = Stats()
    async with show_progress(config, stats, None, FakeScheduler(done)) as shown:
        assert shown.totals == Totals(3, {**dict.fromkeys(TYPES, 0), "document_based_qa": 1})
    assert stats.seed_rows == 3


async def test_a_stop_request_cuts_the_count_short(tmp_path: Path) -> None:
    config = config_with(seed_file(tmp_path / "seeds.jsonl"), tmp_path)
    stats = Stats()
    async with show_progress(config, stats, None, FakeScheduler(set(), stopping=True)) as shown:
        assert shown.totals is None
    assert stats.seed_rows is None
