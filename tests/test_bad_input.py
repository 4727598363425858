"""Bad seed rows next to good ones: each is rejected with its line and reason, nothing else
is lost; unusable paths stop the run before any request with exit code 2."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import orjson
import pytest

from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.cli import (
    DEFAULT_TOML,
    engine_cli,
    engine_cli_apart,
    set_args,
    teacher_env,
)
from tests.support.runs import REPO, SAMPLE_SEEDS, assert_complete_output, config_for

GOOD = SAMPLE_SEEDS.read_bytes().splitlines()


def bad_seed_file(path: Path) -> dict[int, str]:
    """The sample's good rows with every kind of bad row between them; returns the expected
    reject reasons (a fragment of each) by line number."""
    first = orjson.loads(GOOD[0])
    lines: list[bytes] = [b"\xef\xbb\xbf" + GOOD[0]]  # a BOM does not cost the first row
    expected: dict[int, str] = {}

    def bad(line: bytes, reason: str) -> None:
        lines.append(line)
        expected[len(lines)] = reason

    bad(b'{"document": "unterminated', "invalid JSON")
    bad(b'{"document": "caf\xe9 latin-1"}', "not UTF-8")
    bad(b"   ", "blank line")
    bad(b'["a", "list"]', "expected a JSON object")
    bad(orjson.dumps({k: v for k, v in first.items() if k != "domain"}), "missing field(s): domain")
    bad(orjson.dumps({**first, "icl_query_2": 7}), "not a string: icl_query_2")
    bad(orjson.dumps({**first, "document": "  "}), "empty field(s): document")
    bad(orjson.dumps({**first, "document": "x" * 70_000}), "document too long")
    lines.append(GOOD[1])
    bad(GOOD[0], "duplicate document (same as line 1)")
    lines.append(GOOD[2])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


async def test_every_bad_row_is_rejected_and_the_good_rows_complete(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    expected = bad_seed_file(seeds)
    out = tmp_path / "out"
    stats = Stats()
    async with running_simulator(SimulatorConfig()) as sim:
        await run_job(config_for(sim.base_url, out, f'input.seeds="{seeds}"'), stats)
    rejects = [orjson.loads(line) for line in (out / "rejects.jsonl").read_bytes().splitlines()]
    assert [r["line"] for r in rejects] == sorted(expected)
    for reject in rejects:
        assert expected[reject["line"]] in reject["reason"], reject
    assert stats.rejects == len(expected)
    assert f"rejected rows {len(expected)}" in stats.summary()
    assert_complete_output(out)  # all three good rows, every type, nothing else


async def run_cli(cwd: Path, *sets: str) -> tuple[int, str, str]:
    # Nothing listens there: any request would fail, so exit 2 proves none was needed.
    env = teacher_env("http://127.0.0.1:9/v1", model="m")
    return await engine_cli_apart("run", DEFAULT_TOML, *set_args(*sets), cwd=cwd, env=env)


async def test_a_missing_seed_file_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    sets = ('input.seeds="nowhere.jsonl"', f'output.dir="{tmp_path / "o"}"')
    code, _out, err = await run_cli(tmp_path, *sets)
    assert code == 2
    assert "input.seeds: no such file: nowhere.jsonl" in err


@pytest.mark.parametrize("inside", [False, True], ids=["a-file", "inside-a-file"])
async def test_an_output_directory_that_is_a_file_exits_2(tmp_path: Path, inside: bool) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out" if inside else blocker
    seeds = f'input.seeds="{SAMPLE_SEEDS}"'
    code, _out, err = await run_cli(tmp_path, seeds, f'output.dir="{out}"')
    assert code == 2
    assert f"output.dir: {out} is, or is inside, a file: give a folder" in err
    assert blocker.read_text() == "not a directory"


async def test_an_unwritable_output_cache_exits_2_instead_of_running_without_it(
    tmp_path: Path,
) -> None:
    """The run used to go on without the cache after one warning at its start (and validate
    said the config was OK): a re-run after a crash then sent every request again."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    sets = (f'input.seeds="{SAMPLE_SEEDS}"', f'output.dir="{tmp_path / "out"}"')
    cache = f'output.cache="{blocker / "cache.sqlite"}"'
    for command in ("run", "validate"):
        env = teacher_env("http://127.0.0.1:9/v1", model="m")
        code, _out, err = await engine_cli_apart(
            command, DEFAULT_TOML, *set_args(*sets, cache), cwd=tmp_path, env=env
        )
        assert code == 2, err
        assert f"output.cache: {blocker} is, or is inside, a file: give a folder" in err


async def test_a_json_array_seed_file_exits_2_before_any_request_then_runs_as_json_lines(
    tmp_path: Path,
) -> None:
    rows = [orjson.loads(line) for line in GOOD]
    array = tmp_path / "seeds.json"
    array.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig()) as sim:
        for command in ("validate", "run"):
            code, output = await engine_cli(
                command, str(REPO / "config/default.toml"),
                "--set", f'input.seeds="{array}"', "--set", f'output.dir="{out}"',
                cwd=tmp_path, env=_env(sim.base_url),
            )  # fmt: skip
            assert code == 2, output
            assert f"no usable row in {array}: {len(array.read_bytes().splitlines())} rejected" in (
                output
            )
            assert "the engine reads JSON Lines, one JSON object per line" in output
            assert "jq -c '.[]' seeds.json > seed_data.jsonl" in output
        assert sim.state.total_requests == 0
        # Converted as the message says, the same command runs every row.
        jsonl = tmp_path / "seed_data.jsonl"
        jsonl.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        await run_job(config_for(sim.base_url, out, f'input.seeds="{jsonl}"'), Stats())
    assert_complete_output(out)


async def test_a_gzip_seed_file_is_read_as_a_stream(tmp_path: Path) -> None:
    seeds = tmp_path / "seed_data.jsonl.gz"
    seeds.write_bytes(gzip.compress(SAMPLE_SEEDS.read_bytes()))
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig()) as sim:
        code, output = await engine_cli(
            "validate", str(REPO / "config/default.toml"), "--set", f'input.seeds="{seeds}"',
            "--set", f'output.dir="{out}"', cwd=tmp_path, env=_env(sim.base_url),
        )  # fmt: skip
        assert code == 0, output
        assert f"{len(GOOD)} valid rows, 0 rejected" in output
        stats = Stats()
        await run_job(config_for(sim.base_url, out, f'input.seeds="{seeds}"'), stats)
    assert stats.seed_rows == len(GOOD)  # the progress count pass reads it too
    assert_complete_output(out)


def _env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
    return env | {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": "sim-teacher"}
