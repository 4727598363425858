"""Streaming reader of ``seed_data.jsonl``: yields good rows and rejects, never stops on bad input.

Memory stays flat in the file size: one line at a time, plus about 10 bytes per distinct
document to recognise duplicates (``FirstLines``). A gzip, bzip2 or xz file (recognised by
its first bytes, whatever its name) is read as the stream it compresses: large corpora are
usually stored compressed.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
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
# Compressed streams by their first bytes: those the standard library reads, and the others.
_READABLE = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
_UNREADABLE = {
    b"\x28\xb5\x2f\xfd": "zstd-compressed: decompress it first (zstd -d) or use gzip",
    b"\x04\x22\x4d\x18": "lz4-compressed: decompress it first (lz4 -d) or use gzip",
    b"PK\x03\x04": "a zip archive: extract the JSON Lines file from it first (unzip)",
}
# Unicode text that is not UTF-8, by its byte-order mark (UTF-32's first: FF FE 00 00 also
# starts like UTF-16 LE's).
_OTHER_UNICODE = {
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\xfe\xff": "UTF-16",
    b"\xff\xfe": "UTF-16",
}
# Reasons quoted when a seed file has no usable row at all.
_FIRST_REASONS = 3


@dataclass(frozen=True, slots=True)
class SeedRow:
    """One usable row of the seed file: the chunk, its outline and domain, and the in-context
    example (``icl_document``, ``icl_query_1..3``); ``doc_id`` is derived from the chunk."""

    doc_id: str
    line_no: int
    document: str
    document_outline: str
    domain: str
    icl_document: str
    icl_query_1: str
    icl_query_2: str
    icl_query_3: str
    # Where the row is in the (decompressed) seed file: the byte offset of its line and of the
    # line after it; -1 when it did not come from a file. What a resume needs to come back
    # to it, and to start after it (``engine.output.watermark``).
    at: int = field(default=-1, compare=False)
    end: int = field(default=-1, compare=False)

    @property
    def icl_queries(self) -> tuple[str, str, str]:
        """The three example questions, in order."""
        return (self.icl_query_1, self.icl_query_2, self.icl_query_3)


@dataclass(frozen=True, slots=True)
class Reject:
    """A seed row that cannot be used: its line number, why, and the start of the line."""

    line_no: int
    reason: str
    excerpt: str
    # The byte offset of the line after it in the (decompressed) seed file; -1 if unknown.
    end: int = field(default=-1, compare=False)

    def record(self) -> dict[str, Any]:
        """The line written to ``rejects.jsonl``."""
        return {"line": self.line_no, "reason": self.reason, "excerpt": self.excerpt}


# Hex digits of a document id: 64 bits, so ids stay unique far beyond any corpus size.
DOC_ID_CHARS = 16


def doc_id_for(document: str) -> str:
    """A short id derived from the content: the same chunk gets the same id in every run."""
    return hashlib.sha256(document.encode("utf-8")).hexdigest()[:DOC_ID_CHARS]


class UnreadableSeedFile(ValueError):
    """The seed file is in a format the engine cannot read as a stream (zstd, zip, ...)."""


def seed_file_problem(path: Path, max_document_chars: int | None = None) -> str:
    """What keeps ``path`` from being read as the seed file, as a config problem; "" if none.

    With ``max_document_chars``, the file is also read up to its first usable row (all of it
    only when it has none): a file with no usable row is a problem, named with the rows
    rejected and the first reasons.
    """
    if not path.is_file():
        return f"input.seeds: no such file: {path} (set input.seeds to your seed_data.jsonl)"
    try:
        with open_stream(path):
            pass
    except UnreadableSeedFile as err:
        return f"input.seeds: {path} is {err}"
    except OSError as err:
        return f"input.seeds: cannot read {path}: {err.strerror or err}"
    if max_document_chars is None:
        return ""
    first: list[Reject] = []
    count = 0
    for item in read_seeds(path, max_document_chars):
        if isinstance(item, SeedRow):
            return ""
        count += 1
        if len(first) < _FIRST_REASONS:
            first.append(item)
    if not first:
        return f"input.seeds: {path} has no rows (the file is empty)"
    return _no_usable_row(path, count, first)


def _no_usable_row(path: Path, count: int, first: list[Reject]) -> str:
    reasons = "; ".join(f"line {r.line_no}: {r.reason}" for r in first)
    problem = (
        f"input.seeds: no usable row in {path}: {count} rejected (first: {reasons})"
        if count > 1
        else f"input.seeds: no usable row in {path}: its only line was rejected ({reasons})"
    )
    start = _first_text_byte(path)
    if start == b"[":
        return (
            f"{problem}. The file is one JSON array; the engine reads JSON Lines, one JSON "
            f"object per line: convert it with `jq -c '.[]' {path.name} > seed_data.jsonl`"
        )
    if start == b"{" and "invalid JSON" in first[0].reason:
        return (
            f"{problem}. Each row must be one JSON object on one line (JSON Lines), not an "
            f"object spread over several lines: rewrite it with `jq -c . {path.name}`"
        )
    return problem


def _first_text_byte(path: Path) -> bytes:
    """The first byte of the (decompressed) stream that is not a BOM or white space."""
    with contextlib.suppress(OSError, EOFError), open_stream(path) as f:
        head = f.read(4096)
        return head.removeprefix(_BOM).lstrip()[:1]
    return b""


@contextlib.contextmanager
def open_stream(path: Path) -> Iterator[io.BufferedIOBase]:
    """``path`` opened for reading bytes, decompressed if its first bytes say it is gzip,
    bzip2 or xz. Raises ``UnreadableSeedFile`` for compressions the engine cannot read."""
    with path.open("rb") as raw:
        # peek reads at most one chunk: a pipe still yields its first row before it ends.
        magic = raw.peek(6)[:6]
        for prefix, message in _UNREADABLE.items():
            if magic.startswith(prefix):
                raise UnreadableSeedFile(message)
        kind = next((k for prefix, k in _READABLE.items() if magic.startswith(prefix)), None)
        if kind is None:
            _refuse_other_unicode(raw.peek(4)[:4], path)
            yield raw
            return
        with _decompressed(kind, raw) as stream:
            head = b""
            with contextlib.suppress(OSError, EOFError, lzma.LZMAError):  # read_seeds says so
                head = stream.peek(4)[:4]
            _refuse_other_unicode(head, path)
            yield stream


def _refuse_other_unicode(head: bytes, path: Path) -> None:
    """Raise ``UnreadableSeedFile`` when ``head``, the first bytes of the text, say it is
    UTF-16 or UTF-32 (what Windows tools such as PowerShell's ``>`` write): read as UTF-8,
    every line would only be a reject that does not say why."""
    encoding = next((e for bom, e in _OTHER_UNICODE.items() if head.startswith(bom)), None)
    if encoding is None and b"\x00" in head[:2]:
        encoding = "UTF-16"  # without a byte-order mark: "{" is 7B 00 or 00 7B
    if encoding is not None:
        raise UnreadableSeedFile(
            f"{encoding} text, not UTF-8 (the engine reads UTF-8 JSON Lines): convert it with "
            f"`iconv -f {encoding} -t UTF-8 {path.name} > seed_data.jsonl`"
        )


def _decompressed(kind: str, raw: io.BufferedReader) -> gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile:
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "bzip2":
        return bz2.BZ2File(raw, "rb")
    return lzma.LZMAFile(raw, "rb")


@dataclass(frozen=True, slots=True)
class SeedPosition:
    """A place in the (decompressed) seed file to start reading at: the byte offset of a line's
    start and that line's number (1-based)."""

    at: int = 0
    line_no: int = 1


class FirstLines:
    """The first line of each document seen, in about 10 bytes a document.

    A dict from document key to line costs about 110 bytes a row: a gigabyte at ten million
    rows. Here the 64-bit document key picks one of 65,536 buckets by its first two bytes; a
    bucket is a ``bytearray`` of 10-byte records (the key's other six bytes, the line as four),
    searched with ``bytearray.find`` (C speed; about a microsecond a row at ten million).
    """

    _RECORD = 10

    def __init__(self) -> None:
        self._buckets: list[bytearray | None] = [None] * (1 << 16)
        self.size = 0

    def first(self, doc_id: str, line_no: int) -> int | None:
        """The line ``doc_id`` was first seen at; None, and ``line_no`` remembered, if new."""
        key = bytes.fromhex(doc_id)
        index = int.from_bytes(key[:2])
        bucket = self._buckets[index]
        if bucket is None:
            bucket = self._buckets[index] = bytearray()
        rest = key[2:8]
        at = bucket.find(rest)
        while at >= 0:
            if at % self._RECORD == 0:
                return int.from_bytes(bucket[at + 6 : at + 10])
            at = bucket.find(rest, at + 1)
        bucket += rest
        bucket += line_no.to_bytes(4)
        self.size += 1
        return None

    def __repr__(self) -> str:
        return f"<FirstLines {self.size}>"


def read_seeds(
    path: Path,
    max_document_chars: int,
    *,
    start: SeedPosition | None = None,
    prior: Callable[[str], int | None] | None = None,
) -> Generator[SeedRow | Reject, None, None]:
    """Yield each line of ``path`` as a ``SeedRow`` or a ``Reject`` saying what is wrong.

    ``start``: begin there instead of at the top (a resume past rows known to be done); a
    row is then a duplicate of an earlier one if ``prior(doc_id)`` names a line before
    ``start`` (the rows read are compared with each other as always). A compressed file that
    turns out damaged part way yields one last ``Reject`` saying so; the rows before it stand.
    """
    position = start or SeedPosition()
    first_lines = FirstLines()
    line_no = position.line_no - 1
    at = position.at
    with open_stream(path) as f:
        lines = iter(f)
        while True:
            try:
                if line_no == position.line_no - 1 and at:
                    f.seek(at)  # a compressed stream decompresses up to there, unparsed
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, lzma.LZMAError) as err:
                yield Reject(line_no + 1, f"the compressed file is damaged here: {err}", "")
                return
            line_no += 1
            end = at + len(raw)
            item = _parse_line(line_no, raw, max_document_chars, at, end)
            if isinstance(item, SeedRow):
                first = first_lines.first(item.doc_id, line_no)
                if first is None and prior is not None and (before := prior(item.doc_id)):
                    first = before if before < position.line_no else None
                if first is not None:
                    reason = f"duplicate document (same as line {first})"
                    item = Reject(line_no, reason, item.document[:120], end)
            at = end
            yield item


def read_rows_at(
    path: Path, max_document_chars: int, positions: Iterable[SeedPosition]
) -> Iterator[SeedRow | Reject]:
    """The rows at ``positions`` (read again by a resume, which knows where they are), in file
    order. A position past the end of the file yields nothing."""
    with open_stream(path) as f:
        for position in sorted(positions, key=lambda p: p.at):
            f.seek(position.at)
            raw = f.readline()
            if raw:
                end = position.at + len(raw)
                yield _parse_line(position.line_no, raw, max_document_chars, position.at, end)


def _parse_line(
    line_no: int, raw: bytes, max_document_chars: int, at: int = -1, end: int = -1
) -> SeedRow | Reject:
    """Line ``line_no`` (bytes ``at`` to ``end`` of the stream) as a row, or a reject."""
    parsed = _parse(line_no, raw, max_document_chars)
    if isinstance(parsed, tuple):
        return Reject(line_no, *parsed, end)
    return SeedRow(doc_id_for(parsed["document"]), line_no, **parsed, at=at, end=end)


def _parse(line_no: int, raw: bytes, max_document_chars: int) -> dict[str, str] | tuple[str, str]:
    """The row's text fields, or (reason, excerpt) when it cannot be used."""
    if line_no == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]  # an editor's byte-order mark; the row itself is fine
    excerpt = raw[:120].decode("utf-8", errors="replace").strip()
    if not raw.strip():
        return "blank line", ""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte {err.start})", excerpt
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        return f"invalid JSON: {err}", excerpt
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}", excerpt
    problem = _field_problem(obj, max_document_chars)
    if problem:
        return problem, excerpt
    return {name: obj[name] for name in TEXT_FIELDS}


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
