"""Ray clusters for the tests of a distributed run: started by the test, on 127.0.0.1 only,
and stopped by it, by their own process group. Skipped when ray is not installed."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import pytest

from tests.support.runs import REPO

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason='ray is not installed: pip install -e ".[ray]"')
KEY = "sk-ray-test-7f3a9c2e4b1d8f6a0c5e"
KEY_VARIABLE = "TEACHER_MODEL_API_KEY"
# What every Ray process a test starts is given: loopback only, no usage reporting.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
_LOOPBACK = re.compile(r"^(127\.|\[::ffff:127\.|\[::1\]|::1)")


def session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (what a process started with start_new_session
    and all it started, Ray's processes included, belong to). Zombies are dead: they wait to
    be reaped by init, which may take a while here."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True)
    rows = (line.split() for line in out.stdout.splitlines())
    return [int(p) for p, s, stat in rows if int(s) == sid and not stat.startswith("Z")]


def alive(pids: Iterable[int]) -> set[int]:
    """Those of ``pids`` that are live processes (not gone, not zombies)."""
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rpartition(")")[2].split()[0] != "Z":
                found.add(pid)
    return found


def outside_loopback(pids: list[int]) -> list[str]:
    """The listening sockets of ``pids`` bound anywhere but loopback (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    wanted = {str(p) for p in pids}
    found = []
    for line in out.splitlines():
        parts = line.split()
        local = parts[3]
        owners = set(re.findall(r"pid=(\d+)", line))
        if owners & wanted and not _LOOPBACK.match(local):
            found.append(line)
    return found


def kill_session(sid: int, grace_s: float = 0) -> None:
    """Wait up to ``grace_s`` for session ``sid`` to end by itself, then SIGKILL what is left
    of it (by the process ids the test started, never by name)."""
    deadline = time.monotonic() + grace_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_session(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """Wait ``grace_s`` for ``proc`` (a session leader) and its session to end, then SIGKILL
    whatever is left."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    kill_session(proc.pid, grace_s)
    if proc.returncode is None:
        proc.kill()
        proc.wait()


@dataclass
class RayCluster:
    """A cluster started by ``tests.support.ray_cluster`` in a session of its own."""

    proc: subprocess.Popen[bytes]
    address: str
    nodes: list[dict[str, Any]]
    session_dir: Path
    listeners_seen: list[str] = field(default_factory=list)

    @property
    def node_ids(self) -> list[str]:
        """The nodes' ids, head first."""
        return [n["node_id"] for n in self.nodes]

    def _ask(self, command: str) -> str:
        stdin, stdout = self._pipes()
        stdin.write(command.encode() + b"\n")
        stdin.flush()
        return stdout.readline().decode().strip()

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def remove(self, index: int) -> None:
        """Kill node ``index`` without grace (SIGKILL of its processes)."""
        assert self._ask(f"remove {index}") == f"removed {index}"

    def actors(self) -> dict[str, str]:
        """The state (ALIVE, RESTARTING, DEAD...) of every named actor ever started, by name."""
        return {name: state for name, state in orjson.loads(self._ask("actors")) if name}

    def tables(self) -> str:
        """The GCS actor and job tables, as text."""
        return str(orjson.loads(self._ask("tables")))

    def check_listeners(self) -> None:
        """Nothing of the cluster listens outside loopback now."""
        self.listeners_seen += outside_loopback(session_pids(self.proc.pid))
        assert self.listeners_seen == []


def engine_env(env: dict[str, str]) -> dict[str, str]:
    """An engine's environment for a Ray run: ``env`` with the loopback settings, and no
    RAY_ADDRESS of the machine's."""
    return {k: v for k, v in env.items() if k != "RAY_ADDRESS"} | RAY_ENV


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[RayCluster]:
    """Two nodes of two CPUs on 127.0.0.1, their environment holding the API key (as a
    node's environment does: the key reaches workers from there, never through Ray)."""
    with _cluster(tmp_path, KEY) as cluster:
        yield cluster


@pytest.fixture
def keyless_ray_cluster(tmp_path: Path) -> Iterator[RayCluster]:
    """``ray_cluster`` whose nodes' environment has no API key."""
    with _cluster(tmp_path, None) as cluster:
        yield cluster


@contextlib.contextmanager
def _cluster(tmp_path: Path, key: str | None) -> Iterator[RayCluster]:
    if not HAS_RAY:
        pytest.skip('ray is not installed: pip install -e ".[ray]"')
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", KEY_VARIABLE)}
    env |= RAY_ENV | {"PYTHONPATH": str(REPO)} | ({KEY_VARIABLE: key} if key else {})
    errors = (tmp_path / "ray_cluster.err").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.ray_cluster", "--nodes", "2", "--cpus", "2"],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errors,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        hello = proc.stdout.readline()
        assert hello, (tmp_path / "ray_cluster.err").read_text()[-2000:]
        info = orjson.loads(hello)
        cluster = RayCluster(proc, info["address"], info["nodes"], Path(info["session_dir"]))
        cluster.check_listeners()
        yield cluster
        cluster.check_listeners()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        stop_session(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        errors.close()
    assert session_pids(proc.pid) == [], "Ray processes left behind"
