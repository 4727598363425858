from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from engine.teacher.retry import backoff, classify, retry_after

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def http_date(offset_s: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset_s, tz=UTC), usegmt=True)


@pytest.mark.parametrize(
    ("status", "decision"),
    [
        (200, "ok"),
        (201, "ok"),
        (299, "ok"),
        (408, "retry"),
        (409, "retry"),
        (429, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
        (507, "retry"),
        (599, "retry"),
        (400, "reject"),
        (404, "reject"),
        (405, "reject"),
        (413, "reject"),
        (422, "reject"),
        (451, "reject"),
        (301, "redirect"),
        (302, "redirect"),
        (303, "redirect"),
        (304, "redirect"),
        (307, "redirect"),
        (308, "redirect"),
        (401, "auth"),
        (403, "auth"),
    ],
)
def test_classify(status: int, decision: str) -> None:
    assert classify(status) == decision


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"content-type": "application/json"}, None),
        ({"retry-after": "7"}, 7.0),
        ({"Retry-After": "7"}, 7.0),
        ({"RETRY-AFTER": "0"}, 0.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": " 3 "}, 3.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "1500.5"}, 1.5005),
        # retry-after-ms is the more precise of the two and wins.
        ({"retry-after": "9", "retry-after-ms": "250"}, 0.25),
        # ...unless it is garbage, then retry-after still counts.
        ({"retry-after": "9", "retry-after-ms": "soon"}, 9.0),
        ({"retry-after": http_date(30)}, 30.0),
        ({"retry-after": "Sat, 01 Mar 2025 12:02:00 GMT"}, 120.0),
        ({"retry-after": "Sat, 01 Mar 2025 12:02:00 -0000"}, 120.0),
        ({"retry-after": http_date(0)}, 0.0),
        # A date already past: the server's wait is over; our own back-off applies.
        ({"retry-after": http_date(-30)}, None),
        ({"retry-after": "-1"}, None),
        ({"retry-after-ms": "-5"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after-ms": "inf"}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    got = retry_after(headers, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_retry_after_date_defaults_to_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine.teacher.retry.time.time", lambda: NOW)
    assert retry_after({"retry-after": http_date(45)}) == pytest.approx(45.0)


def test_retry_after_reads_multidict_headers() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    headers = CIMultiDictProxy(CIMultiDict({"Retry-After": "4"}))
    assert retry_after(headers) == 4.0


POLICY = {"base": 0.5, "cap": 8.0, "retry_after_cap": 60.0}


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (50, 8.0), (10_000, 8.0)],
)
def test_backoff_full_jitter_stays_within_exponential_ceiling(attempt: int, ceiling: float) -> None:
    rng = random.Random(1234)
    delays = [backoff(attempt, None, rng=rng, **POLICY) for _ in range(500)]
    assert all(0.0 <= d <= ceiling for d in delays)
    # Full jitter spreads over the whole range, not just near the ceiling.
    assert min(delays) < ceiling * 0.1
    assert max(delays) > ceiling * 0.9


@pytest.mark.parametrize(
    ("draw", "attempt", "expected"),
    [(0.0, 1, 0.0), (0.5, 1, 0.25), (1.0, 1, 0.5), (0.5, 3, 1.0), (1.0, 7, 8.0)],
)
def test_backoff_is_uniform_times_ceiling(draw: float, attempt: int, expected: float) -> None:
    assert backoff(attempt, None, rng=lambda: draw, **POLICY) == pytest.approx(expected)


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    first = [backoff(a, None, rng=random.Random(7), **POLICY) for a in range(1, 6)]
    again = [backoff(a, None, rng=random.Random(7), **POLICY) for a in range(1, 6)]
    assert first == again


@pytest.mark.parametrize(
    ("given", "draw", "expected"),
    [
        (3.0, 0.0, 3.0),
        (3.0, 1.0, 3.3),  # up to 10 % jitter on top...
        (30.0, 1.0, 31.0),  # ...but at most one second
        (0.0, 1.0, 0.0),
        (600.0, 0.0, 60.0),  # capped at retry_after_cap
        (600.0, 1.0, 61.0),
    ],
)
def test_backoff_honours_retry_after(given: float, draw: float, expected: float) -> None:
    # The server's wait applies even past the exponential cap and on the first attempt.
    assert backoff(1, given, rng=lambda: draw, **POLICY) == pytest.approx(expected)


@pytest.mark.parametrize("given", [0.0, 0.2, 1.0, 5.0, 59.0, 60.0, 500.0])
def test_backoff_never_waits_less_than_the_server_asked(given: float) -> None:
    rng = random.Random(99)
    for attempt in (1, 2, 5):
        delay = backoff(attempt, given, rng=rng, **POLICY)
        assert min(given, 60.0) <= delay <= min(given, 60.0) + 1.0


def test_backoff_rejects_zero_based_attempt() -> None:
    with pytest.raises(ValueError, match="1-based"):
        backoff(0, None, rng=random.Random(0), **POLICY)
