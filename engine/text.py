"""Unicode text helpers shared by the content checks (``engine.flows.quality``) and the
kept-record measures (``engine.pipeline.stats``): comparison form, letters and lengths.

A leaf module: it imports nothing of the engine, so that code which only measures records
need not import the flows. Nothing here depends on a language: a letter is any Unicode
letter (categories L*), punctuation and spacing are those of every script.
"""

from __future__ import annotations

import unicodedata


class _Fold(dict[int, str | None]):
    """``str.translate`` table built as characters are met: punctuation and spacing become a
    space, control and format characters go, the rest stays."""

    def __missing__(self, code: int) -> str | None:
        ch = chr(code)
        category = unicodedata.category(ch)
        value: str | None = ch
        if category[0] in "PZ" or ch.isspace():
            value = " "
        elif category[0] == "C":
            value = None
        self[code] = value
        return value


_FOLD = _Fold()


def normalise(text: str) -> str:
    """``text`` for comparison: NFKC, case-folded, punctuation and control characters
    dropped, every run of spacing one space. Two texts that differ only in those are equal
    after it (``"What is ATP?"`` and ``"what is  atp"``)."""
    folded = unicodedata.normalize("NFKC", text).casefold().translate(_FOLD)
    return " ".join(folded.split())


def letters(text: str) -> int:
    """How many letters of any script ``text`` holds (Unicode categories L*: ``str.isalpha``)."""
    return sum(map(str.isalpha, text))


def has_digit(text: str) -> bool:
    """Whether ``text`` holds a decimal digit of any script (Unicode category Nd)."""
    return any(unicodedata.category(ch) == "Nd" for ch in text)


def size(text: str) -> int:
    """The length, in characters, that length bounds and means compare: characters of the
    NFKC text with every run of spacing collapsed to one space and none at either end."""
    return len(" ".join(unicodedata.normalize("NFKC", text).split()))
