from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from engine import __version__, cli
from engine.errors import ConfigError
from engine.output.manifest import MANIFEST_FILE
from engine.output.records import OUTPUT_SCHEMA
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.runs import REPO, assert_complete_output, config_for


async def run(out: Path, *extra: str, fresh: bool = False, force: bool = False) -> Stats:
    stats = Stats()
    async with running_simulator(SimulatorConfig()) as sim:
        await run_job(config_for(sim.base_url, out, *extra), stats, fresh=fresh, force=force)
    return stats


async def test_manifest_records_version_and_settings(tmp_path: Path) -> None:
    await run(tmp_path)
    manifest = orjson.loads((tmp_path / MANIFEST_FILE).read_bytes())
    assert manifest["engine_version"]
    assert len(manifest["config_hash"]) == 16
    assert manifest["settings"]["extractive_summary"]["summaries"] == 3
    assert manifest["settings"]["document_based_qa"]["model"] == "sim-teacher"


async def test_resume_with_changed_generation_settings_is_refused(tmp_path: Path) -> None:
    await run(tmp_path)
    with pytest.raises(ConfigError) as caught:
        await run(tmp_path, "generation.extractive_summary.summaries=7")
    message = str(caught.value)
    assert "extractive_summary.summaries: 3 -> 7" in message
    assert "--fresh" in message and "--force" in message


async def test_force_adds_to_the_old_output(tmp_path: Path) -> None:
    await run(tmp_path, "generation.types=['document_based_qa']")
    stats = await run(tmp_path, "generation.document_based_qa.qa_temperature=0.9", force=True)
    assert sum(stats.units_skipped.values()) > 0  # the old units were kept, not redone
    manifest = orjson.loads((tmp_path / MANIFEST_FILE).read_bytes())
    assert manifest["settings"]["document_based_qa"]["qa_temperature"] == 0.9


async def test_adding_a_type_is_not_a_change(tmp_path: Path) -> None:
    await run(tmp_path, "generation.types=['document_based_qa']")
    await run(tmp_path)  # all four: the three new types simply run
    assert_complete_output(tmp_path)


async def test_fresh_moves_the_old_output_aside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    await run(out)
    await run(out, "generation.extractive_summary.summaries=2", fresh=True)
    [old] = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert (old / "extractive_summary" / "gen.jsonl").stat().st_size > 0  # nothing deleted
    assert (
        orjson.loads((out / MANIFEST_FILE).read_bytes())["settings"]["extractive_summary"][
            "summaries"
        ]
        == 2
    )


def test_cli_refusal_exits_2_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(run(tmp_path))
    # Nothing listens here: the refusal must come before any request.
    monkeypatch.setenv("TEACHER_MODEL_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("TEACHER_MODEL_NAME", "sim-teacher")
    sets = [f'output.dir="{tmp_path}"', "generation.document_based_qa.questions=9"]
    code = cli.main(["run", str(REPO / "config/default.toml"), *(f"--set={s}" for s in sets)])
    assert code == cli.EXIT_CONFIG
    assert "document_based_qa.questions" in capsys.readouterr().err


def write_manifest_schema(out: Path, schema: int | None) -> None:
    """Make ``out`` look written by an engine of another output schema (None: before the
    schema was recorded)."""
    path = out / MANIFEST_FILE
    manifest = orjson.loads(path.read_bytes())
    if schema is None:
        del manifest["output_schema"]
    else:
        manifest["output_schema"] = schema
    path.write_bytes(orjson.dumps(manifest))


async def test_manifest_records_the_output_schema(tmp_path: Path) -> None:
    await run(tmp_path)
    assert orjson.loads((tmp_path / MANIFEST_FILE).read_bytes())["output_schema"] == OUTPUT_SCHEMA


@pytest.mark.parametrize("force", [False, True])
async def test_resume_over_an_older_output_schema_is_refused(tmp_path: Path, force: bool) -> None:
    await run(tmp_path)
    write_manifest_schema(tmp_path, None)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.jsonl")}
    with pytest.raises(ConfigError) as caught:
        await run(tmp_path, force=force)
    message = str(caught.value)
    assert f"output schema version 1 (written by engine {__version__})" in message
    assert f"writes version {OUTPUT_SCHEMA}" in message
    assert "run with --fresh" in message and "--force does not apply" in message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.jsonl")} == before  # nothing touched


async def test_resume_over_a_newer_output_schema_is_refused(tmp_path: Path) -> None:
    await run(tmp_path)
    write_manifest_schema(tmp_path, OUTPUT_SCHEMA + 1)
    with pytest.raises(ConfigError) as caught:
        await run(tmp_path)
    assert f"output schema version {OUTPUT_SCHEMA + 1}" in str(caught.value)
    assert "resume it with that engine, or run with --fresh" in str(caught.value)


async def test_fresh_starts_over_an_older_output_schema(tmp_path: Path) -> None:
    out = tmp_path / "out"
    await run(out)
    write_manifest_schema(out, None)
    stats = await run(out, fresh=True)
    assert sum(stats.units_skipped.values()) == 0
    assert_complete_output(out)
    assert orjson.loads((out / MANIFEST_FILE).read_bytes())["output_schema"] == OUTPUT_SCHEMA


def test_cli_refuses_an_older_output_schema_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(run(tmp_path))
    write_manifest_schema(tmp_path, None)
    monkeypatch.setenv("TEACHER_MODEL_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens
    monkeypatch.setenv("TEACHER_MODEL_NAME", "sim-teacher")
    code = cli.main(["run", str(REPO / "config/default.toml"), f'--set=output.dir="{tmp_path}"'])
    assert code == cli.EXIT_CONFIG
    assert "--fresh" in capsys.readouterr().err
