"""Running the embedded teacher's server process and supervising it.

Parent side: ``running_server`` starts the server command (built by ``engine.embedded.demo``), waits
until it answers, and stops its whole process group when the block ends, however it ends;
``ServerProcess`` keeps the tail of its output for error messages.

Child side: the server runs as ``python -m engine.embedded.server ARGS`` (see ``_serve``), which
runs ``llama_cpp.server`` in-process after three adjustments: it exits as soon as the engine is
gone (its stdin closes, even after a SIGKILL of the engine), so no server is ever left behind; it
ignores the environment variables the server would otherwise read (``PORT``, ``API_KEY``...);
and on CPUs with AMX it turns off ggml's extra weight buffers, whose AMX matmul crashed with a
segmentation fault on the first request (llama-cpp-python 0.3.36 built for the local CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import runpy
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

from engine.errors import EmbeddedTeacherError

log = logging.getLogger(__name__)
server_log = logging.getLogger(__name__ + ".output")

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0
REAL_TEACHER_HINT = (
    "for real data, point the engine at a real teacher: set TEACHER_MODEL_BASE_URL and "
    "TEACHER_MODEL_NAME (and TEACHER_MODEL_API_KEY if it needs one) in .env or the environment"
)

_TAIL_LINES = 30
_TAIL_LINE_CHARS = 400
_POLL_S = 0.25
_PROBE_TIMEOUT_S = 5.0
_READ_CHUNK = 65536


@asynccontextmanager
async def running_server(
    command: Sequence[str], base_url: str, ready_timeout_s: float = READY_TIMEOUT_S
) -> AsyncIterator[ServerProcess]:
    """Start ``command``, wait until ``base_url`` answers, stop the process on exit."""
    server = ServerProcess(command)
    await server.start()
    try:
        await server.wait_ready(base_url, ready_timeout_s)
        yield server
    finally:
        await server.stop()


class ServerProcess:
    """The server's child process: its output tail, readiness and a stop that always ends it.

    The child gets a session (and process group) of its own, so that Ctrl-C in the terminal
    reaches only the engine, which keeps the server up while in-flight units finish.
    """

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self._proc: asyncio.subprocess.Process | None = None
        self._output: deque[str] = deque(maxlen=_TAIL_LINES)
        self._drain: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready = False
        self._started = 0.0

    async def start(self) -> None:
        """Start the process; its output is drained from now on."""
        self._started = time.monotonic()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as err:
            raise EmbeddedTeacherError(
                f"cannot start the embedded teacher ({self.command[0]}): {err}"
            ) from err
        self._drain = asyncio.create_task(self._read_output(self._proc))

    async def wait_ready(self, base_url: str, timeout_s: float) -> None:
        """Return once ``GET {base_url}/models`` answers 200; raise if the process exits or
        ``timeout_s`` passes first."""
        proc = self._require_proc()
        host, port, path = _split_url(base_url + "/models")
        deadline = time.monotonic() + timeout_s
        exited = asyncio.create_task(proc.wait())
        try:
            while not await _answers_ok(host, port, path):
                if time.monotonic() > deadline:
                    raise self._failure(f"did not answer at {base_url} within {timeout_s:.0f} s")
                done, _ = await asyncio.wait({exited}, timeout=_POLL_S)
                if done:
                    await self._output_read()
                    raise self._failure(f"exited with code {proc.returncode} while starting")
        finally:
            exited.cancel()
        self._ready = True
        log.info(
            "embedded teacher ready at %s (pid %d, %.1f s)",
            base_url,
            proc.pid,
            time.monotonic() - self._started,
        )

    async def stop(self) -> None:
        """Terminate the server's process group; kill it after ``STOP_GRACE_S``."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        if proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # _serve exits on EOF
            _signal_group(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("embedded teacher did not stop in %.0f s: killing it", STOP_GRACE_S)
            finally:
                _signal_group(proc, signal.SIGKILL)  # also on cancellation; no-op once gone
            await proc.wait()
        await self._output_read()
        log.debug("embedded teacher stopped (exit code %s)", proc.returncode)

    def tail(self) -> str:
        """The last lines the server printed."""
        return "\n".join(self._output)

    def _require_proc(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise RuntimeError("ServerProcess.start() was not called")
        return self._proc

    def _failure(self, what: str) -> EmbeddedTeacherError:
        return EmbeddedTeacherError(
            f"the embedded teacher (llama_cpp.server) {what}. Its last output:\n"
            f"{self.tail() or '(nothing)'}\n"
            f"Check the output above; or {REAL_TEACHER_HINT}"
        )

    async def _output_read(self) -> None:
        if self._drain is not None:
            await self._drain

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        """Keep the pipe drained (a full pipe would block the server) and the tail for errors;
        report an exit that nobody asked for."""
        assert proc.stdout is not None
        pending = b""
        while chunk := await proc.stdout.read(_READ_CHUNK):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._keep(line)
        if pending:
            self._keep(pending)
        code = await proc.wait()
        # Before readiness, wait_ready reports the exit itself, with the tail.
        if self._ready and not self._stopping:
            log.error(
                "the embedded teacher exited unexpectedly (code %s); its last output:\n%s",
                code,
                self.tail(),
            )

    def _keep(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if line:
            server_log.debug("%s", line)
            self._output.append(line[:_TAIL_LINE_CHARS])

    def __repr__(self) -> str:
        proc = self._proc
        if proc is None:
            state = "not started"
        elif proc.returncode is None:
            state = f"running pid={proc.pid}"
        else:
            state = f"exited code={proc.returncode}"
        return f"<ServerProcess {state}>"


def _signal_group(proc: asyncio.subprocess.Process, signum: signal.Signals) -> None:
    # Only while the child is unreaped: its process group id cannot have been reused.
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):  # the group is gone: nothing left to stop
        os.killpg(proc.pid, signum)


def _split_url(url: str) -> tuple[str, int, str]:
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port), "/" + path


async def _answers_ok(host: str, port: int, path: str) -> bool:
    """Whether ``GET path`` answers 200 now. Refused or silent means "not yet" while polling."""
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return status_line.split(b" ")[1:2] == [b"200"]


# --- the child process ------------------------------------------------------------------------


def _serve(argv: list[str]) -> NoReturn:
    """Child process: run ``llama_cpp.server`` with ``argv`` until it exits or the engine
    is gone."""
    threading.Thread(target=_exit_when_parent_gone, name="parent-watch", daemon=True).start()
    _scrub_server_environment()
    if _cpu_has_amx():
        _disable_extra_weight_buffers()
    sys.argv = ["llama_cpp.server", *argv]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
    sys.exit(0)


def _exit_when_parent_gone() -> None:
    # The engine holds the other end of our stdin: EOF means it stopped us or died.
    while os.read(0, 1024):
        pass
    os._exit(0)


def _scrub_server_environment() -> None:
    """Drop variables the server's settings would read (PORT, HOST, API_KEY, MODEL...)."""
    from llama_cpp.server.settings import Settings

    names = {*Settings.model_fields, "config_file"}
    for key in list(os.environ):
        if key.lower() in names:
            del os.environ[key]


def _cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "amx_int8" in flags or "amx_tile" in flags


def _disable_extra_weight_buffers() -> None:
    """Load weights into plain CPU buffers, which keeps ggml off its AMX matmul path."""
    import llama_cpp.llama_cpp as native

    default_params = native.llama_model_default_params

    def params() -> Any:
        p = default_params()
        p.use_extra_bufts = False
        return p

    setattr(native, "llama_model_default_params", params)  # noqa: B010


if __name__ == "__main__":
    _serve(sys.argv[1:])
