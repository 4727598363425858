"""Streaming reader of ``seed_data.jsonl``: yields good rows and rejects, never stops on bad input.

Memory stays flat in the file size: one line at a time, plus one small int per distinct
document to recognise duplicates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

TEXT_FIELDS = (
    "document",
    "document_outline",
    "domain",
    "icl_document",
    "icl_query_1",
    "icl_query_2",
    "icl_query_3",
)
# Fields that must hold some text, not only be strings: records are useless without them.
NON_EMPTY_FIELDS = ("document", "document_outline")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SeedRow:
    doc_id: str
    line_no: int
    document: str
    document_outline: str
    domain: str
    icl_document: str
    icl_query_1: str
    icl_query_2: str
    icl_query_3: str

    @property
    def icl_queries(self) -> tuple[str, str, str]:
        return (self.icl_query_1, self.icl_query_2, self.icl_query_3)


@dataclass(frozen=True, slots=True)
class Reject:
    line_no: int
    reason: str
    excerpt: str

    def record(self) -> dict[str, Any]:
        return {"line": self.line_no, "reason": self.reason, "excerpt": self.excerpt}


# Hex digits of a document id: 64 bits, so ids stay unique far beyond any corpus size.
DOC_ID_CHARS = 16


def doc_id_for(document: str) -> str:
    """A short id derived from the content: the same chunk gets the same id in every run."""
    return hashlib.sha256(document.encode("utf-8")).hexdigest()[:DOC_ID_CHARS]


def seed_file_problem(path: Path) -> str:
    """What keeps ``path`` from being read as the seed file, as a config problem; "" if none."""
    if path.is_file():
        return ""
    return f"input.seeds: no such file: {path} (set input.seeds to your seed_data.jsonl)"


def read_seeds(path: Path, max_document_chars: int) -> Iterator[SeedRow | Reject]:
    """Yield each line of ``path`` as a ``SeedRow`` or a ``Reject`` saying what is wrong."""
    first_seen: dict[int, int] = {}
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            item = _parse_line(line_no, raw, max_document_chars)
            if isinstance(item, SeedRow):
                key = int(item.doc_id, 16)
                if key in first_seen:
                    reason = f"duplicate document (same as line {first_seen[key]})"
                    item = Reject(line_no, reason, item.document[:120])
                else:
                    first_seen[key] = line_no
            yield item


def _parse_line(line_no: int, raw: bytes, max_document_chars: int) -> SeedRow | Reject:
    if line_no == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]  # an editor's byte-order mark; the row itself is fine
    excerpt = raw[:120].decode("utf-8", errors="replace").strip()
    if not raw.strip():
        return Reject(line_no, "blank line", "")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Reject(line_no, f"not UTF-8 text (byte {err.start})", excerpt)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        return Reject(line_no, f"invalid JSON: {err}", excerpt)
    if not isinstance(obj, dict):
        return Reject(line_no, f"expected a JSON object, got {type(obj).__name__}", excerpt)
    problem = _field_problem(obj, max_document_chars)
    if problem:
        return Reject(line_no, problem, excerpt)
    fields = {name: obj[name] for name in TEXT_FIELDS}
    return SeedRow(doc_id=doc_id_for(fields["document"]), line_no=line_no, **fields)


def _field_problem(obj: dict[str, Any], max_document_chars: int) -> str:
    missing = [name for name in TEXT_FIELDS if name not in obj]
    if missing:
        return "missing field(s): " + ", ".join(missing)
    wrong = [name for name in TEXT_FIELDS if not isinstance(obj[name], str)]
    if wrong:
        return "field(s) not a string: " + ", ".join(wrong)
    empty = [name for name in NON_EMPTY_FIELDS if not obj[name].strip()]
    if empty:
        return "empty field(s): " + ", ".join(empty)
    size = len(obj["document"])
    if size > max_document_chars:
        return f"document too long: {size} chars > input.max_document_chars={max_document_chars}"
    return ""
