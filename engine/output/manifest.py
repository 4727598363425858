"""The run manifest: which engine and generation settings produced an output directory.

Resuming into a directory whose units were generated with other settings would mix two
datasets in one file without a trace, so it is refused unless asked for (``--force``), or
the old output is moved aside (``--fresh``). Resuming into a directory whose records have
another shape (``output_schema``, see ``engine.output.records``) is refused even with ``--force``:
one file with two shapes is one that Module 4 cannot load.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import orjson

from engine import __version__
from engine.config import Config
from engine.errors import ConfigError
from engine.output import files
from engine.output.aside import aside_name
from engine.output.lock import LOCK_FILE
from engine.output.records import OUTPUT_SCHEMA
from engine.output.state import STATE_FILE, STATE_VERSION

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
# What a manifest without ``output_schema`` was written by: the engine before it was recorded.
_FIRST_SCHEMA = 1


def settings_by_type(config: Config) -> dict[str, dict[str, Any]]:
    """What decides the records of each type: its knobs, the judge, the teacher model."""
    generation = config.generation
    shared = {
        "model": config.teacher.model,
        "structured_output": config.teacher.structured_output,
        "judge": generation.judge,
        "judge_temperature": generation.judge_temperature,
        "judge_max_tokens": generation.judge_max_tokens,
    }
    return {
        gen_type: {**shared, **getattr(generation, gen_type).model_dump(mode="json")}
        for gen_type in generation.types
    }


def check_and_write(
    out_dir: Path,
    config: Config,
    *,
    has_output: bool,
    force: bool,
    with_records: Collection[str] | None = None,
) -> None:
    """Refuse (``ConfigError``) to add to output made with other settings, unless ``force``;
    then record the current settings.

    ``with_records``: the types that have records on disk, when known. A type without any
    (every item of it lost, say to a wrong ``max_tokens``) has nothing to be inconsistent
    with, so fixing its settings and running again is not a change.
    """
    path = out_dir / MANIFEST_FILE
    current = settings_by_type(config)
    previous = _read(path) if has_output else {}
    if has_output:
        _check_schema(out_dir, previous)
    old = previous.get("settings", {})
    if with_records is not None:
        old = {gen_type: knobs for gen_type, knobs in old.items() if gen_type in with_records}
    changes = _changes(old, current)
    if changes and not force:
        raise ConfigError(
            [
                f"{out_dir} holds output generated with other settings:",
                *changes,
                "run with --fresh to start over (the old output is moved aside), "
                "or --force to add to it anyway",
            ]
        )
    if changes:
        log.warning("--force: adding to output made with other settings: %s", "; ".join(changes))
    merged = {**previous.get("settings", {}), **current}
    manifest = {
        "engine_version": __version__,
        "output_schema": OUTPUT_SCHEMA,
        # What holds the resume state (progress.jsonl is folded into it): its format.
        "state": {"file": STATE_FILE, "version": STATE_VERSION},
        "config_hash": _hash(merged),
        "settings": merged,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write(path, manifest)


def record_adapted(out_dir: Path, adapted: Sequence[str]) -> None:
    """Record how the preflight adapted the requests to the server (``n`` asked as single
    requests, ``max_completion_tokens``, no ``temperature``). For the record only: it
    follows the server, so a resume never compares it."""
    path = out_dir / MANIFEST_FILE
    manifest = _read(path)
    manifest["adapted_to_server"] = list(adapted)
    _write(path, manifest)


def _write(path: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest durably (fsynced, then its directory): a power loss never leaves
    an empty one that would stop the next resume. A full disk is ``OutputWriteError``."""
    files.write_atomically(
        path, orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    )


def move_aside(out_dir: Path) -> Path | None:
    """``--fresh``: rename a non-empty output directory to ``<dir>.old-<time>``; never delete.

    Its lock file alone does not make it non-empty."""
    if not out_dir.exists() or all(p.name == LOCK_FILE for p in out_dir.iterdir()):
        return None
    target = aside_name(out_dir, "old")
    try:
        files.rename_durably(out_dir, target)
    except OSError as err:
        if problem := files.write_problem(out_dir, err):
            raise problem from err
        raise ConfigError([f"--fresh: cannot move {out_dir} to {target}: {err}"]) from None
    log.warning("--fresh: previous output moved to %s", target)
    return target


def _check_schema(out_dir: Path, previous: dict[str, Any]) -> None:
    """Refuse (``ConfigError``) to add records to output written in another record shape."""
    schema = previous.get("output_schema", _FIRST_SCHEMA)
    if schema == OUTPUT_SCHEMA:
        return
    version = previous.get("engine_version")
    by = f"engine {version}" if version else "an engine that did not record it"
    newer = isinstance(schema, int) and schema > OUTPUT_SCHEMA
    remedy = "resume it with that engine, or run with --fresh" if newer else "run with --fresh"
    raise ConfigError(
        [
            f"{out_dir} holds records of output schema version {schema} (written by {by}); "
            f"this engine ({__version__}) writes version {OUTPUT_SCHEMA}: adding to it would "
            "mix two record shapes in one gen.jsonl, which Module 4 cannot load "
            "(--force does not apply)",
            f"{remedy} to start over (the old output is moved aside to "
            f"{out_dir.name}.old-<time>, never deleted), or set output.dir to another directory",
        ]
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except orjson.JSONDecodeError as err:
        raise ConfigError([f"{path} is damaged ({err}): use --fresh or --force"]) from None
    return data if isinstance(data, dict) else {}


def _changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    changes = []
    for gen_type in sorted(previous.keys() & current.keys()):
        old, new = previous[gen_type], current[gen_type]
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key):
                changes.append(f"{gen_type}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def _hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(settings, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
