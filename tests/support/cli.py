"""Launching ``python -m engine`` as a user does: the one place tests start the engine as a
subprocess, to completion (``engine_cli``) or left running to be interrupted, killed or
watched (``start_engine``, ``start_run``), always with the same interpreter and package."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from engine.output.checkpoint import PROGRESS_FILE
from tests.support.runs import REPO, SMALL

DEFAULT_TOML = str(REPO / "config" / "default.toml")
PROXY_VARIABLES = [
    *(f"{name}_proxy" for name in ("http", "https", "all", "no")),
    *(f"{name}_PROXY" for name in ("HTTP", "HTTPS", "ALL", "NO")),
]
# What of the environment decides where requests go and how they are verified.
NETWORK_VARIABLES = [*PROXY_VARIABLES, "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUEST_METHOD"]
# How long a test waits for an engine it started before it kills it and fails.
FINISH_TIMEOUT_S = 60


def set_args(*overrides: str) -> list[str]:
    """``--set`` arguments for ``section.key=value`` overrides."""
    return [arg for override in overrides for arg in ("--set", override)]


def teacher_env(
    base_url: str | None = None, model: str = "sim-teacher", key: str | None = None
) -> dict[str, str]:
    """This process's environment without the developer's own ``TEACHER_MODEL_*``, plus the
    teacher given (none: no endpoint, the embedded demo teacher)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
    if base_url is not None:
        env |= {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": model}
    if key is not None:
        env["TEACHER_MODEL_API_KEY"] = key
    return env


async def start_engine(
    *args: str,
    cwd: Path = REPO,
    env: Mapping[str, str] | None = None,
    output: IO[bytes] | int = asyncio.subprocess.PIPE,
    errors: int = asyncio.subprocess.STDOUT,
    start_new_session: bool = False,
) -> asyncio.subprocess.Process:
    """Start ``python -m engine ARGS``: stdout goes to ``output`` (a pipe unless a file is
    given), stderr with it (or to a pipe of its own: ``errors=PIPE``); in a session of its
    own with ``start_new_session`` (so that a test finds all it started by that session)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", *args,
        cwd=cwd, env=dict(os.environ if env is None else env),
        stdout=output, stderr=errors, start_new_session=start_new_session,
    )  # fmt: skip


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """Wait for an engine started with a pipe to end: its exit code and everything it printed.
    Killed (and the test failed) if it runs past ``FINISH_TIMEOUT_S``."""
    code, output, _ = await _communicate(proc)
    return code, output.decode()


async def _communicate(proc: asyncio.subprocess.Process) -> tuple[int, bytes, bytes]:
    """``proc.communicate()`` within ``FINISH_TIMEOUT_S`` (else killed, and the test
    failed): the exit code, stdout and stderr (b"" when not piped)."""
    try:
        async with asyncio.timeout(FINISH_TIMEOUT_S):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err or b""


async def engine_cli(
    *args: str, cwd: Path = REPO, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """``python -m engine ARGS`` as a user runs it: its exit code and everything it printed."""
    return await finish(await start_engine(*args, cwd=cwd, env=env))


async def engine_cli_apart(
    *args: str, cwd: Path = REPO, env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    """Like ``engine_cli``, with stdout and stderr apart: for what must go to stderr."""
    proc = await start_engine(*args, cwd=cwd, env=env, errors=asyncio.subprocess.PIPE)
    code, out, err = await _communicate(proc)
    return code, out.decode(), err.decode()


async def start_run(
    base_url: str, out: Path, *extra: str, flags: tuple[str, ...] = ()
) -> asyncio.subprocess.Process:
    """A ``run`` of the small fan-out against ``base_url`` into ``out``, left running."""
    sets = set_args(*SMALL, f'output.dir="{out}"', *extra)
    return await start_engine("run", DEFAULT_TOML, *flags, *sets, env=teacher_env(base_url))


def progress_lines(out: Path) -> int:
    """Lines in ``out``'s progress log: units committed so far."""
    path = out / PROGRESS_FILE
    return len(path.read_bytes().splitlines()) if path.exists() else 0


async def wait_for(condition: object, proc: asyncio.subprocess.Process) -> None:
    """Poll ``condition()`` (file sizes, server counters) until true; the run must still be on."""
    assert callable(condition)
    async with asyncio.timeout(20):
        while not condition():
            assert proc.returncode is None, "the run ended before the test could interrupt it"
            await asyncio.sleep(0.01)
