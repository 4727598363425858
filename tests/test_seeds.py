from __future__ import annotations

import bz2
import gzip
import inspect
import json
import lzma
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import seeds
from engine.seeds import (
    TEXT_FIELDS,
    Reject,
    SeedRow,
    doc_id_for,
    read_seeds,
    seed_file_problem,
)

LIMIT = 1000


def row(document: str = "Chlorophyll absorbs red and blue light.", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "document": document,
        "document_outline": "Photosynthesis; light reactions",
        "domain": "biology",
        "icl_document": "An example chunk.",
        "icl_query_1": "What is it?",
        "icl_query_2": "Why does it matter?",
        "icl_query_3": "How does it work?",
    }
    base.update(fields)
    return base


def line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def write_lines(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def read_all(path: Path, limit: int = LIMIT) -> list[SeedRow | Reject]:
    return list(read_seeds(path, limit))


def rejects(items: list[SeedRow | Reject]) -> dict[int, str]:
    return {item.line_no: item.reason for item in items if isinstance(item, Reject)}


def rows(items: list[SeedRow | Reject]) -> list[SeedRow]:
    return [item for item in items if isinstance(item, SeedRow)]


# --- good rows and ids --------------------------------------------------------------------


def test_good_row_has_every_field(tmp_path: Path) -> None:
    obj = row("Ünïcödé document — with “quotes” and emoji 🌱.")
    (item,) = read_all(write_lines(tmp_path / "s.jsonl", line(obj)))
    assert isinstance(item, SeedRow)
    assert item.line_no == 1
    for name in TEXT_FIELDS:
        assert getattr(item, name) == obj[name]
    assert item.icl_queries == (obj["icl_query_1"], obj["icl_query_2"], obj["icl_query_3"])
    assert item.doc_id == doc_id_for(obj["document"])


def test_doc_id_is_a_stable_16_hex_content_hash() -> None:
    doc_id = doc_id_for("some chunk")
    assert re.fullmatch(r"[0-9a-f]{16}", doc_id)
    assert doc_id_for("some chunk") == doc_id
    assert doc_id_for("some chunk.") != doc_id
    assert doc_id_for("Some chunk") != doc_id
    # Pinned: ids name output records, so they must not change between versions.
    assert doc_id_for("some chunk") == "c8eddf34a1d5266c"


def test_doc_id_depends_on_document_only_and_is_stable_across_reads(tmp_path: Path) -> None:
    first = write_lines(tmp_path / "a.jsonl", line(row("alpha")), line(row("beta")))
    second = write_lines(
        tmp_path / "b.jsonl",
        line(row("gamma")),
        line(row("beta", domain="other", icl_query_1="different")),
        line(row("alpha")),
    )
    ids_first = {r.document: r.doc_id for r in rows(read_all(first))}
    ids_second = {r.document: r.doc_id for r in rows(read_all(second))}
    assert ids_first["alpha"] == ids_second["alpha"]
    assert ids_first["beta"] == ids_second["beta"]
    assert len(set(ids_second.values())) == 3


def test_extra_fields_are_ignored(tmp_path: Path) -> None:
    obj = row(source="wiki", page=12, nested={"a": [1, 2]})
    (item,) = read_all(write_lines(tmp_path / "s.jsonl", line(obj)))
    assert isinstance(item, SeedRow)
    assert item.document == obj["document"]


def test_last_line_without_newline_is_read(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "s.jsonl", line(row("one")), line(row("two")).rstrip(b"\n"))
    assert [r.document for r in rows(read_all(path))] == ["one", "two"]


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "s.jsonl",
        line(row("one")).replace(b"\n", b"\r\n"),
        line(row("two")).replace(b"\n", b"\r\n"),
    )
    items = read_all(path)
    assert [r.document for r in rows(items)] == ["one", "two"]


def test_empty_file_yields_nothing(tmp_path: Path) -> None:
    assert read_all(write_lines(tmp_path / "s.jsonl")) == []


def test_utf8_bom_does_not_lose_the_first_row(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "s.jsonl", b"\xef\xbb\xbf" + line(row("first")), line(row("2")))
    items = read_all(path)
    assert rejects(items) == {}
    first = rows(items)[0]
    assert first.line_no == 1
    assert first.document == "first"
    assert first.doc_id == doc_id_for("first")


def test_bom_in_the_middle_is_a_bad_row(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "s.jsonl", line(row("first")), b"\xef\xbb\xbf" + line(row("2")))
    items = read_all(path)
    assert [r.document for r in rows(items)] == ["first"]
    assert rejects(items)[2].startswith("invalid JSON")


def test_document_at_the_size_limit_is_accepted(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "s.jsonl", line(row("x" * 10)), line(row("y" * 11)))
    items = read_all(path, limit=10)
    assert [r.document for r in rows(items)] == ["x" * 10]
    assert rejects(items) == {
        2: "document too long: 11 chars > input.max_document_chars=10",
    }


def test_size_limit_counts_characters_not_bytes(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "s.jsonl", line(row("é" * 10)))
    (item,) = read_all(path, limit=10)
    assert isinstance(item, SeedRow)


# --- bad rows next to good ones -----------------------------------------------------------


def test_every_kind_of_bad_row_is_one_reject_and_good_rows_pass(tmp_path: Path) -> None:
    missing = row("missing fields")
    del missing["domain"]
    del missing["icl_query_3"]
    lines = [
        line(row("good 1")),  # 1
        b'{"document": "unterminated\n',  # 2
        b'{"document": "caf\xe9 latin-1"}\n',  # 3
        b"\n",  # 4
        b"   \t \n",  # 5
        line(row("good 2")),  # 6
        line(["a", "list"]),  # 7
        line("just a string"),  # 8
        line(42),  # 9
        line(None),  # 10
        line(missing),  # 11
        line(row("number field", icl_query_2=7)),  # 12
        line(row("null field", domain=None)),  # 13
        line(row("")),  # 14
        line(row(" \n\t ")),  # 15
        line(row("empty outline", document_outline="  ")),  # 16
        line(row("x" * (LIMIT + 1))),  # 17
        line(row("good 1")),  # 18: same document as line 1
        b'{"document": "\\ud800 lone surrogate"}\n',  # 19
        line(row("good 3")),  # 20
        line(row("good 2", domain="same document, other fields")),  # 21
    ]
    items = read_all(write_lines(tmp_path / "s.jsonl", *lines))

    assert len(items) == len(lines)  # one item per line, nothing skipped silently
    assert [item.line_no for item in items] == list(range(1, len(lines) + 1))
    assert [(r.line_no, r.document) for r in rows(items)] == [
        (1, "good 1"),
        (6, "good 2"),
        (20, "good 3"),
    ]
    reasons = rejects(items)
    assert set(reasons) == set(range(1, 22)) - {1, 6, 20}
    assert reasons[2].startswith("invalid JSON: ")
    assert reasons[3] == "not UTF-8 text (byte 17)"
    assert reasons[4] == "blank line"
    assert reasons[5] == "blank line"
    assert reasons[7] == "expected a JSON object, got list"
    assert reasons[8] == "expected a JSON object, got str"
    assert reasons[9] == "expected a JSON object, got int"
    assert reasons[10] == "expected a JSON object, got NoneType"
    assert reasons[11] == "missing field(s): domain, icl_query_3"
    assert reasons[12] == "field(s) not a string: icl_query_2"
    assert reasons[13] == "field(s) not a string: domain"
    assert reasons[14] == "empty field(s): document"
    assert reasons[15] == "empty field(s): document"
    assert reasons[16] == "empty field(s): document_outline"
    assert reasons[17] == f"document too long: {LIMIT + 1} chars > input.max_document_chars={LIMIT}"
    assert reasons[18] == "duplicate document (same as line 1)"
    assert reasons[19].startswith("invalid JSON: ")
    assert reasons[21] == "duplicate document (same as line 6)"


def test_rejected_row_does_not_count_as_first_of_a_duplicate(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "s.jsonl",
        line(row("same", domain=None)),  # rejected: not remembered as seen
        line(row("same")),
        line(row("same")),
    )
    items = read_all(path)
    assert [r.line_no for r in rows(items)] == [2]
    assert rejects(items) == {
        1: "field(s) not a string: domain",
        3: "duplicate document (same as line 2)",
    }


def test_reject_excerpt_is_the_start_of_the_line(tmp_path: Path) -> None:
    long_line = line(row("y" * 500, domain=None))
    path = write_lines(tmp_path / "s.jsonl", b"not json at all\n", long_line)
    first, second = read_all(path)
    assert isinstance(first, Reject)
    assert first.excerpt == "not json at all"
    assert isinstance(second, Reject)
    assert second.excerpt == long_line[:120].decode()


def test_reject_excerpt_of_non_utf8_line_is_readable(tmp_path: Path) -> None:
    (item,) = read_all(write_lines(tmp_path / "s.jsonl", b'{"a": "caf\xe9"}\n'))
    assert isinstance(item, Reject)
    assert item.excerpt == '{"a": "caf\ufffd"}'


def test_reject_record_shape() -> None:
    reject = Reject(7, "blank line", "")
    assert reject.record() == {"line": 7, "reason": "blank line", "excerpt": ""}
    reject = Reject(3, "invalid JSON: x", '{"document": ')
    assert reject.record() == {"line": 3, "reason": "invalid JSON: x", "excerpt": '{"document": '}


def test_reject_record_from_a_read_is_json_ready(tmp_path: Path) -> None:
    (item,) = read_all(write_lines(tmp_path / "s.jsonl", line([1, 2])))
    assert isinstance(item, Reject)
    record = item.record()
    assert record == {
        "line": 1,
        "reason": "expected a JSON object, got list",
        "excerpt": "[1, 2]",
    }
    assert json.loads(json.dumps(record)) == record


# --- streaming ----------------------------------------------------------------------------


def test_read_seeds_is_a_lazy_generator(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet.jsonl"
    items = read_seeds(missing, LIMIT)
    is_generator = inspect.isgenerator(items)  # kept apart: the TypeGuard would widen items
    assert is_generator
    # Nothing is opened until the first item is asked for.
    write_lines(missing, line(row("created after the call")))
    assert [r.document for r in rows(list(items))] == ["created after the call"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_first_row_arrives_before_the_file_ends(tmp_path: Path) -> None:
    # A pipe whose writer holds back the rest: a reader that wanted the whole file
    # first would block here until the writer gives up.
    fifo = tmp_path / "seeds.jsonl"
    os.mkfifo(fifo)
    release = threading.Event()
    writer_done = threading.Event()

    def feed() -> None:
        with fifo.open("wb") as pipe:
            pipe.write(line(row("first")))
            pipe.flush()
            release.wait(timeout=5)
            pipe.write(line(row("second")))
        writer_done.set()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        items = read_seeds(fifo, LIMIT)
        first = next(items)
        assert not writer_done.is_set()
        assert isinstance(first, SeedRow)
        assert first.document == "first"
    finally:
        release.set()
    assert [r.document for r in rows(list(items))] == ["second"]
    writer.join(timeout=5)


# --- compressed files ---------------------------------------------------------------------


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data)


COMPRESSORS = {"gzip": _gzip, "bzip2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("name", ["seeds.jsonl.gz", "seeds.gz", "seeds.jsonl"])
@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_files_are_read_by_their_first_bytes_whatever_their_name(
    tmp_path: Path, kind: str, name: str
) -> None:
    plain = line(row("alpha")) + b"not json\n" + line(row("beta"))
    path = tmp_path / name
    path.write_bytes(COMPRESSORS[kind](plain))
    items = read_all(path)
    assert [r.document for r in rows(items)] == ["alpha", "beta"]
    assert rejects(items) == {2: rejects(read_all(write_lines(tmp_path / "p.jsonl", plain)))[2]}
    assert seed_file_problem(path, LIMIT) == ""


def test_a_damaged_gzip_file_keeps_the_rows_before_the_damage(tmp_path: Path) -> None:
    whole = gzip.compress(b"".join(line(row(f"document {i}")) for i in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    items = read_all(path)
    good = rows(items)
    assert 0 < len(good) < 2000
    assert [r.document for r in good] == [f"document {i}" for i in range(len(good))]
    last = items[-1]
    assert isinstance(last, Reject) and "the compressed file is damaged" in last.reason
    assert last.line_no == len(good) + 1


@pytest.mark.parametrize(
    ("magic", "expected"),
    [
        (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first (zstd -d)"),
        (b"\x04\x22\x4d\x18", "lz4-compressed"),
        (b"PK\x03\x04", "a zip archive"),
    ],
)
def test_compressions_the_engine_cannot_read_are_named(
    tmp_path: Path, magic: bytes, expected: str
) -> None:
    path = write_lines(tmp_path / "seeds.jsonl.zst", magic + b"\x00" * 64)
    problem = seed_file_problem(path, LIMIT)
    assert problem.startswith(f"input.seeds: {path} is ") and expected in problem


@pytest.mark.parametrize(
    ("encoding", "named"),
    [
        ("utf-16", "UTF-16"),  # with its byte-order mark, as Python and PowerShell write it
        ("utf-16-le", "UTF-16"),  # without one
        ("utf-16-be", "UTF-16"),
        ("utf-32", "UTF-32"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_utf16_and_utf32_files_are_named_with_how_to_convert_them(
    tmp_path: Path, encoding: str, named: str, compress: bool
) -> None:
    """Each of their lines used to be rejected as 'not UTF-8 text (byte 0)' or invalid JSON."""
    text = (line(row("alpha")) + line(row("beta"))).decode()
    raw = text.encode(encoding)
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    problem = seed_file_problem(path, LIMIT)
    assert problem == (
        f"input.seeds: {path} is {named} text, not UTF-8 (the engine reads UTF-8 JSON Lines): "
        f"convert it with `iconv -f {named} -t UTF-8 seeds.jsonl > seed_data.jsonl`"
    )


def test_utf8_with_a_bom_is_still_read(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "s.jsonl", b"\xef\xbb\xbf" + line(row("alpha")))
    assert seed_file_problem(path, LIMIT) == ""
    assert [r.document for r in rows(read_all(path))] == ["alpha"]


# --- a seed file with no usable row -------------------------------------------------------


def test_a_file_with_a_usable_row_has_no_problem(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "s.jsonl", b"junk\n", line(row()))
    assert seed_file_problem(path, LIMIT) == ""
    assert seed_file_problem(tmp_path / "missing.jsonl", LIMIT).startswith(
        "input.seeds: no such file"
    )


def test_the_check_reads_only_up_to_the_first_usable_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def one_row_then_fail(path: Path, limit: int) -> Iterator[SeedRow | Reject]:
        yield Reject(1, "blank line", "")
        yield SeedRow(doc_id_for("x"), 2, "x", "o", "d", "", "", "", "")
        raise AssertionError("read past the first usable row")

    monkeypatch.setattr(seeds, "read_seeds", one_row_then_fail)
    assert seed_file_problem(write_lines(tmp_path / "s.jsonl", b"\n"), LIMIT) == ""


def test_no_usable_row_names_the_count_and_the_first_reasons(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "s.jsonl",
        b"junk\n",
        line({"document": "only this"}),
        b"\n",
        line(row("")),
        b"more junk\n",
    )
    problem = seed_file_problem(path, LIMIT)
    assert problem.startswith(f"input.seeds: no usable row in {path}: 5 rejected (first: ")
    assert "line 1: invalid JSON" in problem
    assert "line 2: missing field(s)" in problem
    assert "line 3: blank line" in problem
    assert "line 4" not in problem  # the first three reasons only


def test_an_empty_file_is_a_problem(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "s.jsonl")
    assert seed_file_problem(path, LIMIT) == f"input.seeds: {path} has no rows (the file is empty)"


@pytest.mark.parametrize("compress", [False, True])
def test_a_json_array_is_told_to_be_json_lines(tmp_path: Path, compress: bool) -> None:
    array = json.dumps([row("a"), row("b")], indent=2).encode()
    path = tmp_path / "seeds.json"
    path.write_bytes(gzip.compress(array) if compress else array)
    problem = seed_file_problem(path, LIMIT)
    assert "no usable row" in problem
    assert "one JSON array; the engine reads JSON Lines, one JSON object per line" in problem
    assert "jq -c '.[]' seeds.json > seed_data.jsonl" in problem


def test_a_json_array_on_one_line_is_told_too(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "seeds.json", json.dumps([row("a"), row("b")]).encode())
    problem = seed_file_problem(path, LIMIT)
    assert "its only line was rejected (line 1: expected a JSON object, got list)" in problem
    assert "JSON Lines" in problem


def test_a_pretty_printed_object_is_told_to_be_on_one_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "seeds.jsonl", json.dumps(row("a"), indent=2).encode())
    problem = seed_file_problem(path, LIMIT)
    assert "one JSON object on one line" in problem and "jq -c . seeds.jsonl" in problem
