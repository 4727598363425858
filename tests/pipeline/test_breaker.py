"""The breaker as a table: sequences of items won and lost, and where (if anywhere) it trips."""

from __future__ import annotations

import pytest

from engine.errors import (
    InvalidReply,
    ItemError,
    RequestRejected,
    RetriesExhausted,
    TeacherHTTPError,
    TeacherTimeout,
)
from engine.pipeline.breaker import Breaker, Signature, Trip, describe, server_words

A, B = "t/summary", "t/answer"


def rejected(status: int = 400, body: str = "maximum context length is 2048 tokens") -> ItemError:
    return RequestRejected(f"the teacher rejected the request: HTTP {status}", status=status,
                           body=body)  # fmt: skip


def exhausted(status: int | None) -> ItemError:
    cause = TeacherHTTPError("HTTP 500", status=500) if status else TeacherTimeout("no reply")
    try:
        raise RetriesExhausted("gave up after 6 attempts", status=status) from cause
    except RetriesExhausted as err:
        return err


def invalid(check: str) -> ItemError:
    return InvalidReply(f"bad reply ({check})", check=check, body='{"summary": ""}')


Event = tuple[str, str, str, ItemError | None]


def won(stage: str) -> Event:
    return ("won", stage, "", None)


def lost(stage: str, doc: str, err: ItemError | None = None) -> Event:
    return ("lost", stage, doc, err or rejected())


def run(events: list[Event], **settings: float) -> tuple[int | None, Trip | None]:
    """Feed ``events``; the index of the event that tripped the breaker, and the trip."""
    options: dict[str, float] = {"documents": 3, "window": 10, "share": 0.8, **settings}
    breaker = Breaker(
        documents=int(options["documents"]), window=int(options["window"]), share=options["share"]
    )
    for index, (what, stage, doc, err) in enumerate(events):
        if what == "won":
            breaker.won(stage)
        elif err is not None and (trip := breaker.lost(stage, doc, err)):
            return index, trip
    return None, None


CASES: dict[str, tuple[list[Event], int | None]] = {
    "three documents lose a stage that never succeeded": (
        [lost(A, "d1"), lost(A, "d2"), lost(A, "d3")],
        2,
    ),
    "two documents are not enough": ([lost(A, "d1"), lost(A, "d2")], None),
    "one bad chunk losing every item of its own units never trips": (
        [lost(A, "bad")] * 40 + [lost(B, "bad")] * 40,
        None,
    ),
    "a stage that succeeded once is judged by its window only": (
        [won(A), lost(A, "d1"), lost(A, "d2"), lost(A, "d3"), lost(A, "d4")],
        None,
    ),
    "another stage's success does not count": (
        [won(B), lost(A, "d1"), lost(A, "d2"), lost(A, "d3")],
        3,
    ),
    "different statuses are different causes": (
        [lost(A, "d1", rejected(400)), lost(A, "d2", rejected(404)), lost(A, "d3", rejected(422))],
        None,
    ),
    "different reply checks are different causes": (
        [
            lost(A, "d1", invalid("cut_off")),
            lost(A, "d2", invalid("no_json")),
            lost(A, "d3", invalid("cut_off")),
            lost(A, "d4", invalid("cut_off")),
        ],
        3,
    ),
    "retries exhausted on 500 count like a status": (
        [lost(A, f"d{i}", exhausted(500)) for i in range(3)],
        2,
    ),
    "retries exhausted on timeouts count by their cause": (
        [lost(A, f"d{i}", exhausted(None)) for i in range(3)],
        2,
    ),
    "the same cause in two stages counts per stage": (
        [lost(A, "d1"), lost(B, "d2"), lost(A, "d3"), lost(B, "d4")],
        None,
    ),
    # Window of 10, share 0.8: 8 of the last 10 lost the same way, from 3 documents.
    "a large share of the window lost the same way trips": (
        [won(A)] * 10 + [lost(A, f"d{i % 3}") for i in range(8)],
        17,
    ),
    "seven of ten is below the share": (
        [won(A)] * 10 + [lost(A, f"d{i % 3}") for i in range(7)] + [won(A)] * 3,
        None,
    ),
    "a share from two documents is one or two bad chunks": (
        [won(A)] * 10 + [lost(A, f"d{i % 2}") for i in range(10)],
        None,
    ),
    "wins in between keep the share down": (
        [won(A)] * 10 + [e for i in range(20) for e in (lost(A, f"d{i}"), won(A))],
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_breaker_table(name: str) -> None:
    events, expected = CASES[name]
    assert run(events)[0] == expected


def test_the_defaults_trip_on_the_fifth_document() -> None:
    events = [lost(A, f"d{i}") for i in range(10)]
    index, trip = run(events, documents=5, window=50)
    assert index == 4
    assert trip is not None and (trip.documents, trip.window) == (5, 0)


def test_zero_documents_turns_it_off() -> None:
    assert run([lost(A, f"d{i}") for i in range(100)], documents=0) == (None, None)


def test_it_trips_once() -> None:
    breaker = Breaker(documents=2, window=10, share=0.8)
    assert breaker.lost(A, "d1", rejected()) is None
    assert breaker.lost(A, "d2", rejected()) is not None
    assert breaker.lost(A, "d3", rejected()) is None
    assert breaker.tripped is not None and "tripped" in repr(breaker)


@pytest.mark.parametrize(
    ("err", "signature"),
    [
        (rejected(404), Signature(A, "request_rejected", status=404)),
        (exhausted(500), Signature(A, "retries_exhausted", status=500)),
        (exhausted(None), Signature(A, "retries_exhausted", check="timeout")),
        (invalid("cut_off"), Signature(A, "invalid_reply", check="cut_off")),
        (ItemError("odd"), Signature(A, "item")),
    ],
)
def test_signature_of_a_loss(err: ItemError, signature: Signature) -> None:
    assert Signature.of(A, err) == signature


def test_a_trip_is_one_line_with_the_cause_the_server_s_words_and_the_fix() -> None:
    _index, trip = run([lost(A, f"d{i}") for i in range(3)])
    assert trip is not None
    text = describe(trip, lambda sig, said: f"lower the key for {sig.stage} ({said[:20]})")
    assert "\n" not in text
    assert text.startswith(
        "3 different documents lost t/summary items the same way "
        "(HTTP 400 (request_rejected)) and none of that stage succeeded"
    )
    assert 'the server said: "maximum context length is 2048 tokens"' in text
    assert (
        '"maximum context length is 2048 tokens". Likely fix: lower the key for t/summary' in text
    )
    assert text.endswith("run the same command again: the lost items are run again")


def test_a_share_trip_says_how_many_of_how_many() -> None:
    _index, trip = run([won(A)] * 10 + [lost(A, f"d{i % 3}", invalid("no_json")) for i in range(8)])
    assert trip is not None
    assert trip.reason == (
        "8 of the last 10 t/summary items were lost the same way (invalid_reply: no_json), "
        "from 3 different documents"
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            '{"error": {"message": "The model `m` does not exist.", "type": "x"}}',
            ("The model `m` does not exist."),
        ),
        (
            '{"object":"error","message":"This model\'s maximum context length is 2048 tok',
            ("This model's maximum context length is 2048 tok"),
        ),
        ('{"error":{"message":"say \\"n\\"\\nnow"}}', 'say "n" now'),
        ("<html>\n  <h1>502 Bad Gateway</h1>\n</html>", "<html> <h1>502 Bad Gateway</h1> </html>"),
        ("404: Not Found", "404: Not Found"),
    ],
)
def test_the_server_s_words_are_its_error_message(body: str, words: str) -> None:
    assert server_words(body) == words


def test_bad_settings_are_refused() -> None:
    for documents, window, share in ((-1, 10, 0.5), (3, 0, 0.5), (3, 10, 0.0), (3, 10, 1.5)):
        with pytest.raises(ValueError):
            Breaker(documents=documents, window=window, share=share)
    for reject_share in (0.0, 1.5):
        with pytest.raises(ValueError):
            Breaker(documents=3, window=10, share=0.8, reject_share=reject_share)


Reply = tuple[str, str]  # (document, check): check "" for an accepted reply


def replies(events: list[Reply], *, documents: int = 3) -> tuple[int | None, Trip | None]:
    """Feed reply choices of stage A (window 10, half rejected trips); where it tripped."""
    breaker = Breaker(documents=documents, window=10, share=0.8, reject_share=0.5)
    for index, (doc, check) in enumerate(events):
        if trip := breaker.replied(A, doc, check, body=f"reply {index}"):
            return index, trip
    return None, None


GOOD = [("d0", "")]
REPLY_CASES: dict[str, tuple[list[Reply], int | None]] = {
    "half the window rejected, from three documents": (
        GOOD * 5
        + [("d1", "field_name"), ("d2", "length"), ("d3", "field_name")]
        + GOOD
        + [("d1", "length"), ("d2", "field_name")],
        10,
    ),
    "not before the window is full": ([(f"d{i}", "no_letters") for i in range(9)], None),
    "a full window of junk trips on its tenth reply": (
        [(f"d{i % 4}", "no_letters") for i in range(12)],
        9,
    ),
    "four of ten is under half": (
        GOOD * 6 + [("d1", "length"), ("d2", "length"), ("d3", "length"), ("d1", "length")],
        None,
    ),
    "rejections from two documents are not enough": (
        GOOD * 5 + [(f"d{i % 2}", "blank") for i in range(5)] * 3,
        None,
    ),
    "an accepted reply never trips": (
        [(f"d{i % 4}", "length") for i in range(9)] + GOOD * 5,
        None,
    ),
    "a healthy stage's few rejections never trip": (
        ([("d1", "duplicate")] + GOOD * 9) * 20,
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(REPLY_CASES))
def test_rejected_replies_table(name: str) -> None:
    events, expected = REPLY_CASES[name]
    assert replies(events)[0] == expected  # fmt: skip


def test_a_rejected_replies_trip_names_the_checks_most_first() -> None:
    events = [("d1", "field_name"), ("d2", "length"), ("d3", "field_name")] * 2 + GOOD * 4
    _index, trip = replies(GOOD * 4 + events[:6])
    assert trip is not None
    assert trip.signature == Signature(A, "invalid_reply", check="field_name")
    assert trip.reason == (
        "6 of the last 10 t/summary replies were rejected by the reply checks "
        "(field_name 4, length 2), from 3 different documents"
    )
    assert trip.body == "reply 9"
    assert replies(GOOD * 4 + events[:6], documents=0) == (None, None)  # 0: off
