"""The config reference in README.md and the keys in config/default.toml match the models."""

from __future__ import annotations

import tomllib
from typing import Any

from engine.config import GEN_TYPES, reference
from tests.support.runs import REPO

# Never written into a config file: the key comes from the environment or .env only.
NOT_IN_DEFAULT_TOML = {"teacher.api_key"}


def _model_keys() -> set[str]:
    return {f"{e.section}.{e.key}" for e in reference.entries()}


def _toml_keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in table.items():
        path = f"{prefix}.{name}" if prefix else name
        keys |= _toml_keys(value, path) if isinstance(value, dict) else {path}
    return keys


def test_every_config_key_has_a_description() -> None:
    missing = [f"{e.section}.{e.key}" for e in reference.entries() if not e.description]
    assert missing == []


def test_the_readme_reference_is_the_generated_one() -> None:
    # On failure: python -m engine.config.reference, and paste it between the README's markers.
    assert reference.readme_block(REPO / "README.md") == reference.markdown()


def test_default_toml_sets_every_key_and_no_other() -> None:
    with (REPO / "config" / "default.toml").open("rb") as f:
        shipped = _toml_keys(tomllib.load(f))
    assert shipped == _model_keys() - NOT_IN_DEFAULT_TOML


def test_the_reference_covers_every_section_of_the_model() -> None:
    sections = {e.section for e in reference.entries()}
    assert {"input", "output", "teacher", "limits", "retry", "run", "generation"} <= sections
    assert {f"generation.{t}" for t in GEN_TYPES} <= sections


def test_a_reference_row_shows_bounds_and_default() -> None:
    rows = {(e.section, e.key): e for e in reference.entries()}
    concurrency = rows[("limits", "max_concurrency")]
    assert concurrency.kind == "integer, ≥ 1, ≤ 4,096"
    assert concurrency.default == "`32`"
    assert rows[("teacher", "backend")].kind == '`"auto"` or `"http"` or `"embedded"`'
    assert rows[("teacher", "api_key")].default == "`unset`"
