"""``load_config``: the TOML file, then ``.env`` and the environment, then ``--set``.

Precedence, lowest to highest: model defaults, the TOML file, ``.env`` in the working
directory, the real environment, ``--set section.key=value`` overrides.
"""

from __future__ import annotations

import io
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from pydantic import ValidationError

from engine.config.models import ENV_KEYS, Config
from engine.errors import ConfigError


def load_config(
    path: Path | str,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    dotenv_path: Path | None = None,
) -> Config:
    """Read ``path`` (TOML), merge environment and ``--set`` overrides, validate.

    Raises ``ConfigError`` listing every problem found.
    """
    raw = _read_toml(Path(path))
    env = _environment(environ, dotenv_path)
    teacher = raw.setdefault("teacher", {})
    if not isinstance(teacher, dict):
        raise ConfigError(["teacher: must be a table"])
    for env_key, field in ENV_KEYS.items():
        if env.get(env_key):
            teacher[field] = env[env_key]
    problems: list[str] = []
    for item in overrides:
        try:
            _apply_override(raw, item)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError([_describe(e) for e in err.errors()]) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except OSError as err:  # a directory, no permission: still a config problem, not a crash
        raise ConfigError([f"cannot read config file {path}: {err.strerror or err}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path} is not valid TOML: {err}"]) from None


def _environment(environ: Mapping[str, str] | None, dotenv_path: Path | None) -> dict[str, str]:
    dotenv_file = dotenv_path if dotenv_path is not None else Path.cwd() / ".env"
    # Values are taken as written, like the real environment's: python-dotenv would expand
    # "${NAME}" in them, and turn a key such as "sk-a${b}c" into another, silently.
    read = dotenv_values(dotenv_file, interpolate=False)
    merged = {k: v for k, v in read.items() if v and v.strip()}
    # An empty (or blank) variable in the environment does not hide a value set in .env.
    environ = os.environ if environ is None else environ
    given = {k for k, v in environ.items() if v.strip()}
    if problems := _unreadable_dotenv_lines(dotenv_file, set(ENV_KEYS) - given):
        raise ConfigError(problems)
    merged.update((k, v) for k, v in environ.items() if v.strip())
    return merged


def _unreadable_dotenv_lines(path: Path, names: set[str]) -> list[str]:
    """A problem for each line of ``path`` that python-dotenv cannot parse and that would set
    one of ``names``: it skips such a line with a mere warning, and the run would go on
    without the variable (no key: 401; no base URL: the embedded demo teacher instead of
    the server). The line is not quoted: it may hold the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []  # python-dotenv read nothing either
    return [
        f"{path} line {binding.original.line} cannot be read as NAME=value (an unbalanced "
        f"quote?), so {name} is not set from it: fix that line (not shown: it may hold the key)"
        for binding in parse_stream(io.StringIO(text))
        if binding.error
        for name in sorted(names)
        if binding.original.string.lstrip().removeprefix("export ").lstrip().startswith(name)
    ]


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        # Not echoed: a mistyped "--set teacher.api_key sk-..." must not print the key.
        raise ValueError("a --set argument has no '=' or no key: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: take it as a string
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {part} is not a table")
        node = child
    node[leaf] = value


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (check its spelling against config/default.toml)"
    return f"{where}: {message}"
