# Text in many scripts on purpose: their look-alike letters and punctuation are the point.
# ruff: noqa: RUF001
"""The Unicode text helpers: comparison form, letters and lengths, in many scripts."""

from __future__ import annotations

import pytest

from engine.text import has_digit, letters, normalise, size


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is ATP?", "what is  atp"),
        ("  Где   находится Байкал? ", "где находится байкал"),
        ("ＡＢＣ　１２３", "abc 123"),  # full-width forms (NFKC)
        ("長江は、どこ？", "長江は どこ"),  # CJK punctuation
        ("«Straße»", '"STRASSE"'),  # case folding, any quotes
        ("ما طول النيل؟", "ما طول النيل"),  # Arabic question mark
        ("गंगा कहाँ है।", "गंगा कहाँ है"),  # danda
        ("a\u200bb", "ab"),  # a zero-width space is no character
    ],
)
def test_normalise_ignores_case_spacing_and_punctuation_of_any_script(a: str, b: str) -> None:
    assert normalise(a) == normalise(b)


def test_normalise_keeps_what_makes_texts_differ() -> None:
    assert normalise("Was ist ATP?") != normalise("Was ist ADP?")
    assert normalise("长江") != normalise("黄河")


@pytest.mark.parametrize(
    ("text", "count"),
    [("abc", 3), ("Straße", 6), ("长江", 2), ("النيل", 5), ("гора", 4), ("123 !?", 0)],
)
def test_letters_of_every_script(text: str, count: int) -> None:
    assert letters(text) == count


@pytest.mark.parametrize(
    ("text", "found"),
    [("1998", True), ("٢٠٢٤", True), ("६५०", True), ("one", False), ("½ ²", False)],
)
def test_has_digit_of_every_script(text: str, found: bool) -> None:
    assert has_digit(text) is found


@pytest.mark.parametrize(
    ("text", "chars"),
    [("abc", 3), ("  a \n\t b  ", 3), ("ＡＢＣ", 3), ("ﬁ", 2), ("长江", 2), ("", 0)],
)
def test_size_counts_characters_of_the_nfkc_text_with_spacing_collapsed(
    text: str, chars: int
) -> None:
    assert size(text) == chars
