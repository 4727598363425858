"""One run per output directory: the lock, then real runs that contend for a directory."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import socket
import sys
from collections.abc import Awaitable
from pathlib import Path

import orjson
import pytest

from engine.errors import OutputInUse
from engine.output.lock import LOCK_FILE, DirectoryLock
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support import faults
from tests.support.cli import engine_cli, finish, start_run
from tests.support.faults import FaultInjector, Seen
from tests.support.runs import REPO, assert_complete_output, config_for

# Slow enough that a run is still going while the test starts a second one.
SLOW = SimulatorConfig(latency_mean_s=0.05)
HOLDER = """
import sys
from pathlib import Path
from engine.output.lock import DirectoryLock
lock = DirectoryLock.acquire(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with DirectoryLock.acquire(tmp_path) as first:
        assert first.held
        with pytest.raises(OutputInUse) as info:
            DirectoryLock.acquire(tmp_path)
        message = str(info.value)
        assert f"{tmp_path} is in use by another run" in message
        assert f"pid {os.getpid()} on host {socket.gethostname()}, started " in message
        assert "another output.dir" in message
        written = orjson.loads((tmp_path / LOCK_FILE).read_bytes())
        assert (written["pid"], written["host"]) == (os.getpid(), socket.gethostname())
    # Released: the file stays, emptied, and the next run takes it.
    assert (tmp_path / LOCK_FILE).read_bytes() == b""
    with DirectoryLock.acquire(tmp_path):
        pass


def test_a_holder_that_has_not_written_yet_is_still_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(OutputInUse, match="its pid is not written in the lock file yet"):
            DirectoryLock.acquire(tmp_path)
    finally:
        os.close(fd)


def test_a_filesystem_without_locks_runs_unguarded_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with DirectoryLock.acquire(tmp_path) as lock:
        assert not lock.held
    assert "cannot lock files (No locks available)" in caplog.text


async def test_kill_9_of_the_holder_leaves_nothing_stale(tmp_path: Path) -> None:
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(tmp_path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"held\n"
        with pytest.raises(OutputInUse, match=f"pid {holder.pid} on host "):
            DirectoryLock.acquire(tmp_path)
        holder.send_signal(signal.SIGKILL)
        assert await holder.wait() == -signal.SIGKILL
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    # The kernel let go with the process; the file still names it, and means nothing.
    assert orjson.loads((tmp_path / LOCK_FILE).read_bytes())["pid"] == holder.pid
    with DirectoryLock.acquire(tmp_path):
        pass


class Gate:
    """A simulator fault hook that holds every request until ``open()``; ``arrived`` is set by
    the first request (by then its run holds the output directory)."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.hang = faults.Hang(60)
        self.injector = FaultInjector(self.plan)

    def plan(self, seen: Seen) -> Awaitable[None]:
        self.arrived.set()
        return self.hang()

    def open(self) -> None:
        self.hang.release()


async def test_two_runs_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    gate = Gate()
    async with running_simulator(SimulatorConfig(fault=gate.injector)) as sim:
        config = config_for(sim.base_url, tmp_path)
        first = asyncio.create_task(run_job(config, Stats()))
        try:
            async with asyncio.timeout(20):
                await gate.arrived.wait()
            with pytest.raises(OutputInUse):
                await run_job(config, Stats())
            with pytest.raises(OutputInUse):
                await run_job(config, Stats(), fresh=True)
            assert not list(tmp_path.parent.glob(f"{tmp_path.name}.old-*"))  # nothing moved
        finally:
            gate.open()
            await first
    assert_complete_output(tmp_path)


def teacher_env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
    return env | {"TEACHER_MODEL_BASE_URL": base_url, "TEACHER_MODEL_NAME": "sim-teacher"}


async def test_a_second_cli_run_refuses_at_once_and_kill_9_frees_the_directory(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    gate = Gate()
    async with running_simulator(SimulatorConfig(fault=gate.injector)) as sim:
        first = await start_run(sim.base_url, out)
        try:
            async with asyncio.timeout(20):
                await gate.arrived.wait()
            sets = ["--set", f'output.dir="{out}"']
            env = teacher_env(sim.base_url)
            code, output = await engine_cli("run", "config/default.toml", *sets, cwd=REPO, env=env)
            assert code == 2, output
            assert f"error: {out} is in use by another run (pid {first.pid} on host " in output
            assert "Traceback" not in output
            assert not (out / "run_report.json").exists()  # the refused run reports nothing
            # Neither command writes, so neither needs the lock.
            for command in ("plan", "validate"):
                code, output = await engine_cli(
                    command, "config/default.toml", *sets, cwd=REPO, env=env
                )
                assert code == 0, output
            code, output = await engine_cli(
                "run", "config/default.toml", "--fresh", *sets, cwd=REPO, env=env
            )
            assert code == 2, output
            assert not list(tmp_path.glob("out.old-*"))  # --fresh moved nothing
            first.send_signal(signal.SIGKILL)
            assert await first.wait() == -signal.SIGKILL
        finally:
            gate.open()
            await finish(first)
        # The same command as the killed run: it runs, and finishes the job.
        code, output = await finish(await start_run(sim.base_url, out))
    assert code == 0, output
    assert_complete_output(out)


async def test_fresh_moves_the_old_output_aside_with_its_lock_released(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with running_simulator() as sim:
        await run_job(config_for(sim.base_url, out), Stats())
        await run_job(config_for(sim.base_url, out), Stats(), fresh=True)
    [old] = tmp_path.glob("out.old-*")
    assert (old / LOCK_FILE).read_bytes() == b""
    assert (out / LOCK_FILE).read_bytes() == b""
    assert_complete_output(old)
    assert_complete_output(out)


async def test_fresh_on_a_directory_holding_only_its_lock_file_moves_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_bytes(b"")
    async with running_simulator() as sim:
        await run_job(config_for(sim.base_url, out), Stats(), fresh=True)
    assert not list(tmp_path.glob("out.old-*"))
    assert_complete_output(out)


async def test_runs_on_two_directories_may_share_one_response_cache(tmp_path: Path) -> None:
    shared = tmp_path / "shared-cache.sqlite"
    async with running_simulator(SLOW) as sim:
        configs = [
            config_for(sim.base_url, tmp_path / name, f'output.cache="{shared}"')
            for name in ("a", "b")
        ]
        await asyncio.gather(*(run_job(config, Stats()) for config in configs))
    for name in ("a", "b"):
        assert_complete_output(tmp_path / name)
