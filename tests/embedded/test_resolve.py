"""Which teacher a run talks to: the configured endpoint as it is, or the embedded demo's
config; decided offline for plan and validate, and started for a run only when needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import Config, load_config
from engine.embedded import demo
from engine.embedded.resolve import (
    EMBEDDED_PLACEHOLDER_URL,
    Resolved,
    resolve_offline,
    resolve_teacher,
)
from engine.errors import ConfigError
from tests.support.runs import REPO

MISSING = ("no_such_module_for_the_engine",)


def load(tmp_path: Path, environ: dict[str, str]) -> Config:
    sets = [f'output.dir="{tmp_path / "out"}"']
    return load_config(
        REPO / "config" / "default.toml", sets, environ=environ, dotenv_path=tmp_path
    )


@pytest.fixture
def with_endpoint(tmp_path: Path) -> Config:
    env = {"TEACHER_MODEL_BASE_URL": "http://127.0.0.1:9/v1", "TEACHER_MODEL_NAME": "m"}
    return load(tmp_path, env)


@pytest.fixture
def without_endpoint(tmp_path: Path) -> Config:
    config = load(tmp_path, {})
    assert config.teacher.mode == "embedded"
    return config


async def test_an_endpoint_is_used_as_configured(
    with_endpoint: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not even the demo's packages are looked for.
    monkeypatch.setattr(demo, "REQUIRED_MODULES", MISSING)
    assert resolve_offline(with_endpoint, require_installed=True) == Resolved(
        with_endpoint, embedded=False
    )
    async with resolve_teacher(with_endpoint) as served:
        assert served is with_endpoint


def test_offline_without_an_endpoint_is_the_demo_config_at_a_placeholder(
    without_endpoint: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # plan needs no server and no installed demo.
    monkeypatch.setattr(demo, "REQUIRED_MODULES", MISSING)
    resolved = resolve_offline(without_endpoint)
    expected, changes = demo.demo_config(without_endpoint, EMBEDDED_PLACEHOLDER_URL)
    assert resolved == Resolved(expected, embedded=True, changes=tuple(changes))
    assert resolved.config.teacher.urls == (EMBEDDED_PLACEHOLDER_URL,)
    assert resolved.config.limits.max_concurrency == 1
    limit = without_endpoint.limits.max_concurrency
    assert f"limits.max_concurrency {limit} -> 1" in resolved.changes


def test_offline_can_require_the_demo_installed(
    without_endpoint: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "REQUIRED_MODULES", MISSING)
    with pytest.raises(ConfigError, match=r"no_such_module_for_the_engine.*\.\[embedded\]"):
        resolve_offline(without_endpoint, require_installed=True)


async def test_the_demo_missing_is_a_config_error_before_the_block_runs(
    without_endpoint: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "REQUIRED_MODULES", MISSING)
    entered = False
    with pytest.raises(ConfigError, match=r"\.\[embedded\]"):
        async with resolve_teacher(without_endpoint):
            entered = True
    assert not entered
