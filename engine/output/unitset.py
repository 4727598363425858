"""(document, type) units as compact keys: the document id's 64 bits as one integer.

The engine's document ids are 16 hex digits (``engine.seeds.doc_id_for``); as a signed 64-bit
integer one fits an SQLite INTEGER (``engine.output.state``) and, in memory, costs a third of a
string. Any other id (a test's, an older engine's) is kept as the text it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from engine.seeds import DOC_ID_CHARS

_HEX_DIGITS = frozenset("0123456789abcdef")
_SIGN = 1 << 63


def doc_key(doc_id: str) -> int | str:
    """``doc_id`` as a signed 64-bit integer if it is the engine's kind of id, else as is."""
    if len(doc_id) == DOC_ID_CHARS and _HEX_DIGITS.issuperset(doc_id):
        value = int(doc_id, 16)
        return value - (1 << 64) if value >= _SIGN else value
    return doc_id


def doc_id_of(key: int | str) -> str:
    """The document id a ``doc_key`` came from."""
    if isinstance(key, int):
        return f"{key & 0xFFFF_FFFF_FFFF_FFFF:0{DOC_ID_CHARS}x}"
    return key


class UnitSet:
    """A set of (doc_id, gen_type) units, compact: one 64-bit integer per unit in a set per
    type (about a third of a tuple of two strings). For sets that stay small whatever the
    corpus (units that lost items, units run again): the finished units of a large corpus
    live on disk (``engine.output.state``)."""

    def __init__(self, units: Iterable[tuple[str, str]] = ()) -> None:
        self._by_type: dict[str, set[int | str]] = {}
        for unit in units:
            self.add(unit)

    def add(self, unit: tuple[str, str]) -> None:
        """Add the (doc_id, gen_type) ``unit``."""
        doc_id, gen_type = unit
        self._by_type.setdefault(gen_type, set()).add(doc_key(doc_id))

    def discard(self, unit: tuple[str, str]) -> None:
        """Remove the (doc_id, gen_type) ``unit`` if it is there."""
        doc_id, gen_type = unit
        self._by_type.get(gen_type, set()).discard(doc_key(doc_id))

    def __contains__(self, unit: object) -> bool:
        if not isinstance(unit, tuple) or len(unit) != 2:
            return False
        doc_id, gen_type = unit
        ids = self._by_type.get(gen_type)
        return ids is not None and isinstance(doc_id, str) and doc_key(doc_id) in ids

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for gen_type, ids in self._by_type.items():
            for key in ids:
                yield doc_id_of(key), gen_type

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_type.values())

    @property
    def types(self) -> set[str]:
        """The types that have units in the set."""
        return {gen_type for gen_type, ids in self._by_type.items() if ids}

    def of_types(self, gen_types: Iterable[str]) -> UnitSet:
        """The units of ``gen_types`` only."""
        subset = UnitSet()
        for gen_type in gen_types:
            if ids := self._by_type.get(gen_type):
                subset._by_type[gen_type] = set(ids)
        return subset

    def __repr__(self) -> str:
        return f"<UnitSet {len(self)}>"
