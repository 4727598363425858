"""Contract: Module 4 reads the output of a real run as it is.

Module 4 is red-hat-ai-examples, ``examples/knowledge-tuning/04_Knowledge_Mixing``
(``Knowledge_Mixing.ipynb`` and ``utils/knowledge_utils.py``). The code below is ours, written
from what it does to each step-3 folder:

1. ``datasets.load_dataset("json", data_dir=<step_03>/<type>, split="train")``: every JSON
   file in the folder is read;
2. for ``document_based_qa`` only, ``rename_column("base_document", "raw_document")``, which
   fails when ``base_document`` is missing or ``raw_document`` is there already;
3. it requires question, response, document, raw_document and document_outline;
4. for the two summary types, rows are grouped by ``document`` (the summary): their pairs are
   kept, raw_document and document_outline taken from the first row, and reasoning only from
   a column named ``parse_response_dict_reasoning_content`` (first per summary, renamed
   ``reasoning``); then it samples summaries per chunk and pairs per summary, which the
   mirror leaves out so that every row can be checked;
5. every row becomes chat messages: the assistant's ``thinking`` is the ``reasoning`` column
   when the frame has one, else ``""``; the document is in the prompt except for key facts;
   metadata keeps ``document`` (as sdg_document) and raw_document;
6. the four datasets are concatenated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never ask the hub for anything
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import datasets
import polars as pl

from engine.output.records import make_record
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.fakes import make_seed
from tests.support.runs import config_for, read_gen

TYPES = ("extractive_summary", "detailed_summary", "key_facts_to_qa", "document_based_qa")
SUMMARY_TYPES = ("extractive_summary", "detailed_summary")
REQUIRED = ("question", "response", "document", "raw_document", "document_outline")
SUMMARY_REASONING = "parse_response_dict_reasoning_content"
# Where each type keeps the chunk in our files (document QA: renamed by Module 4).
CHUNK = {"document_based_qa": "base_document"}
REASONING = {t: SUMMARY_REASONING for t in SUMMARY_TYPES}

datasets.disable_progress_bars()


# --- the mirror of Module 4 --------------------------------------------------------------


def load_folder(step_03: Path, gen_type: str, cache: Path, **options: Any) -> pl.DataFrame:
    """Steps 1 and 2."""
    folder = str(step_03 / gen_type)
    ds = datasets.load_dataset(
        "json", data_dir=folder, split="train", cache_dir=str(cache), **options
    )
    if gen_type == "document_based_qa":
        ds = ds.rename_column("base_document", "raw_document")
    frame = ds.to_polars()
    assert isinstance(frame, pl.DataFrame)
    return frame


def require_columns(frame: pl.DataFrame) -> None:
    """Step 3."""
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"Missing required columns: {missing}")


def by_summary(frame: pl.DataFrame) -> pl.DataFrame:
    """Step 4, without the sampling: one row per pair, with what the grouping kept."""
    require_columns(frame)
    frame = frame.with_columns(pl.struct("question", "response").alias("pair"))
    kept = [pl.col("pair"), pl.col("raw_document").first(), pl.col("document_outline").first()]
    if SUMMARY_REASONING in frame.columns:
        frame = frame.with_columns(pl.col(SUMMARY_REASONING).alias("reasoning"))
        kept.append(pl.col("reasoning").first())
    grouped = frame.group_by("document").agg(kept).explode("pair")
    return grouped.with_columns(
        pl.col("pair").struct.field("question"), pl.col("pair").struct.field("response")
    ).drop("pair")


def chat_rows(frame: pl.DataFrame, *, document_in_prompt: bool) -> pl.DataFrame:
    """Step 5."""
    require_columns(frame)
    has_reasoning = "reasoning" in frame.columns
    rows = []
    for row in frame.iter_rows(named=True):
        outline, question = row["document_outline"], row["question"]
        prompt = (
            f"{outline}\n{row['document']}\n\n{question}"
            if document_in_prompt
            else f"In {outline}, {question}"
        )
        thinking = row["reasoning"] if has_reasoning else ""
        metadata = {"sdg_document": row["document"], "raw_document": row["raw_document"]}
        rows.append(
            {
                "question": question,
                "messages": [
                    {"role": "user", "content": prompt, "thinking": None},
                    {"role": "assistant", "content": row["response"], "thinking": thinking},
                ],
                "metadata": orjson.dumps(metadata).decode(),
            }
        )
    return pl.DataFrame(rows)


def mix(step_03: Path, cache: Path) -> datasets.Dataset:
    """Steps 1 to 6 over the four folders."""
    parts = []
    for gen_type in TYPES:
        frame = load_folder(step_03, gen_type, cache)
        if gen_type in SUMMARY_TYPES:
            frame = by_summary(frame)
        rows = chat_rows(frame, document_in_prompt=gen_type != "key_facts_to_qa")
        parts.append(datasets.Dataset.from_polars(rows.with_columns(pl.lit(gen_type).alias("t"))))
    return datasets.concatenate_datasets(parts)


# --- a real run, read as Module 4 reads it ------------------------------------------------


def expected_thinking(out: Path, gen_type: str) -> Iterator[tuple[tuple[str, str, str], str]]:
    """((chunk, document, question), the thinking Module 4 should give that pair) for every
    record of ``gen_type``: its own reasoning, or for a summary the first of its summary's."""
    first: dict[str, str] = {}
    for record in read_gen(out, gen_type):
        reasoning = record[REASONING.get(gen_type, "reasoning")]
        if gen_type in SUMMARY_TYPES:
            reasoning = first.setdefault(record["document"], reasoning)
        chunk = record[CHUNK.get(gen_type, "raw_document")]
        yield (chunk, record["document"], record["question"]), reasoning


@pytest.mark.parametrize(
    ("teacher", "thinks"),
    [
        pytest.param({}, False, id="no-reasoning"),
        pytest.param({"reasoning_field": "reasoning_content"}, True, id="reasoning_content"),
        pytest.param({"reasoning_field": "reasoning"}, True, id="reasoning"),
        pytest.param({"reasoning_layout": "inline"}, True, id="inline-think"),
    ],
)
async def test_module4_reads_every_folder_of_a_run(
    tmp_path: Path, teacher: dict[str, Any], thinks: bool
) -> None:
    out = tmp_path / "step_03"
    async with running_simulator(SimulatorConfig(**teacher)) as sim:
        await run_job(config_for(sim.base_url, out), Stats())
    for gen_type in TYPES:  # Module 4 reads every JSON file there: ours must be alone
        assert [p.name for p in (out / gen_type).iterdir()] == ["gen.jsonl"]

    mixed = mix(out, tmp_path / "hf-cache")

    want = {t: dict(expected_thinking(out, t)) for t in TYPES}
    assert len(mixed) == sum(len(w) for w in want.values())  # every record, nothing else
    seen: set[tuple[str, tuple[str, str, str]]] = set()
    for row in mixed:
        metadata = orjson.loads(row["metadata"])
        key = (metadata["raw_document"], metadata["sdg_document"], row["question"])
        assert key in want[row["t"]], row  # every mixed row traces back to one record
        seen.add((row["t"], key))
        user, assistant = row["messages"]
        assert user["thinking"] is None and row["question"] in user["content"]
        assert assistant["thinking"] == want[row["t"]][key]
        assert bool(assistant["thinking"]) == thinks
    assert len(seen) == len(mixed)


# --- the mirror refuses what Module 4 refuses ----------------------------------------------


SEED = make_seed("The chunk about photosynthesis.")


def write_folder(step_03: Path, gen_type: str, rows: list[dict[str, Any]]) -> None:
    folder = step_03 / gen_type
    folder.mkdir(parents=True)
    (folder / "gen.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def ours(gen_type: str, count: int = 2, reasoning: str = "R") -> list[dict[str, Any]]:
    fact = {"key_fact": "F"} if gen_type == "key_facts_to_qa" else {}
    return [
        make_record(
            SEED,
            gen_type,
            (f"q{i:02d}",),
            document=SEED.document if gen_type == "document_based_qa" else "A summary.",
            question=f"Q{i}?",
            response=f"A{i}.",
            model="m",
            reasoning=reasoning,
            **fact,
        ).to_dict()
        for i in range(count)
    ]


def version_1(gen_type: str) -> list[dict[str, Any]]:
    """Records as the engine wrote them before output schema 2 (issue 10)."""
    rows = []
    for record in ours(gen_type):
        chunk = record.pop(CHUNK.get(gen_type, "raw_document"))
        reasoning = record.pop(REASONING.get(gen_type, "reasoning"))
        rows.append({**record, "raw_document": chunk, "reasoning": reasoning})
    return rows


def test_document_qa_with_raw_document_is_refused(tmp_path: Path) -> None:
    rows = [{**r, "raw_document": r["base_document"]} for r in ours("document_based_qa")]
    write_folder(tmp_path, "document_based_qa", rows)
    with pytest.raises(ValueError, match="raw_document already in the dataset"):
        load_folder(tmp_path, "document_based_qa", tmp_path / "cache")


def test_version_1_document_qa_is_refused(tmp_path: Path) -> None:
    write_folder(tmp_path, "document_based_qa", version_1("document_based_qa"))
    with pytest.raises(ValueError, match="base_document not in the dataset"):
        load_folder(tmp_path, "document_based_qa", tmp_path / "cache")


@pytest.mark.parametrize("gen_type", TYPES)
@pytest.mark.parametrize("field", REQUIRED)
def test_a_missing_required_column_is_refused(tmp_path: Path, gen_type: str, field: str) -> None:
    name = CHUNK.get(gen_type, field) if field == "raw_document" else field
    write_folder(
        tmp_path, gen_type, [{k: v for k, v in r.items() if k != name} for r in ours(gen_type)]
    )
    with pytest.raises(
        ValueError, match=f"not in the dataset|Missing required columns: \\['{field}'\\]"
    ):
        frame = load_folder(tmp_path, gen_type, tmp_path / "cache")
        if gen_type in SUMMARY_TYPES:
            frame = by_summary(frame)
        chat_rows(frame, document_in_prompt=True)


@pytest.mark.parametrize("gen_type", SUMMARY_TYPES)
def test_summary_reasoning_reaches_the_mix_only_under_modules_4_name(
    tmp_path: Path, gen_type: str
) -> None:
    write_folder(tmp_path / "v2", gen_type, ours(gen_type))
    write_folder(tmp_path / "v1", gen_type, version_1(gen_type))
    for version, thinking in (("v2", "R"), ("v1", "")):
        frame = by_summary(load_folder(tmp_path / version, gen_type, tmp_path / "cache"))
        rows = chat_rows(frame, document_in_prompt=True)
        assert [m[1]["thinking"] for m in rows["messages"].to_list()] == [thinking] * 2


def test_a_column_absent_from_the_first_block_fails_to_load(tmp_path: Path) -> None:
    # datasets reads a file in blocks (10 MB by default; small here to see several): a column
    # that only later lines have cannot be cast into the first block's schema.
    quiet = [r for r in ours("key_facts_to_qa", 40, reasoning="")]
    thinking = ours("key_facts_to_qa", 40, reasoning="R")
    write_folder(tmp_path / "ours", "key_facts_to_qa", quiet + thinking)
    omitted = [{k: v for k, v in r.items() if k != "reasoning"} for r in quiet]
    write_folder(tmp_path / "omitted", "key_facts_to_qa", omitted + thinking)
    small_blocks = {"chunksize": 2048}
    frame = load_folder(tmp_path / "ours", "key_facts_to_qa", tmp_path / "cache", **small_blocks)
    assert frame["reasoning"].to_list() == [""] * 40 + ["R"] * 40
    with pytest.raises(datasets.exceptions.DatasetGenerationError):
        load_folder(tmp_path / "omitted", "key_facts_to_qa", tmp_path / "cache", **small_blocks)
