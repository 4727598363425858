"""A full disk, an exceeded quota or a read-only file system on any output file: the run stops
with one message naming the file and what to do, exit 1, and the same command run again
resumes it, every record once.

The faults are real OSErrors (ENOSPC, EDQUOT, EROFS) raised where the kernel raises them
(``tests.support.diskfull``), and SQLite's own FULL and READONLY errors for its files.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from pathlib import Path

import pytest

from engine import cli
from engine.config import Config
from engine.errors import FatalRunError, OutputWriteError
from engine.output import files, manifest, report, state
from engine.output.checkpoint import load_checkpoint
from engine.output.state import STATE_FILE, ResumeState
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.teacher import cache
from engine.testing.simulator import RunningSimulator, SimulatorConfig, running_simulator
from tests.pipeline.test_retry_failed import bad_request_for_document_answers
from tests.support.cli import DEFAULT_TOML, engine_cli, finish, set_args, teacher_env
from tests.support.diskfull import WriteFault, sqlite_fault
from tests.support.runs import (
    DOCS,
    REPO,
    SAMPLE_SEEDS,
    SMALL,
    assert_complete,
    assert_complete_output,
    config_for,
    corpus,
    leaves,
)

FULL = "free space and run the same command again: nothing is lost"
READ_ONLY = "make it writable (or set output.dir elsewhere) and run the same command again"
REMEDY = {errno.ENOSPC: FULL, errno.EDQUOT: FULL, errno.EROFS: READ_ONLY}


async def stopped_by(config: Config) -> OutputWriteError:
    """Run ``config``; it must stop on one OutputWriteError (however wrapped): that error."""
    try:
        await run_job(config, Stats(), preflight=False)
    except (FatalRunError, BaseExceptionGroup) as err:
        found = {str(leaf): leaf for leaf in leaves(err)}
    else:
        pytest.fail("the run went to its end")
    assert len(found) == 1, list(found)
    [error] = found.values()
    assert isinstance(error, OutputWriteError), error
    return error


def assert_names(error: OutputWriteError, fragment: str, code: int) -> None:
    message = str(error)
    assert fragment in str(error.path), message
    assert message.startswith(f"cannot write {error.path}: "), message
    assert REMEDY[code] in message and message.endswith("nothing is lost"), message


# --- the translation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "remedy"),
    [
        (errno.ENOSPC, FULL),
        (errno.EDQUOT, FULL),
        (errno.EROFS, READ_ONLY),
        (errno.EFBIG, "raise the limit or free space and run the same command again"),
    ],
)
def test_disk_faults_become_one_fatal_error_naming_the_file(code: int, remedy: str) -> None:
    path = Path("/data/out/extractive_summary/gen.jsonl")
    problem = files.write_problem(path, OSError(code, os.strerror(code)))
    assert isinstance(problem, OutputWriteError) and isinstance(problem, FatalRunError)
    assert str(problem).startswith(f"cannot write {path}: ") and remedy in str(problem)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.ENOENT])
def test_other_errors_are_not_disk_faults(code: int) -> None:
    assert files.write_problem(Path("x"), OSError(code, os.strerror(code))) is None


def test_a_failed_atomic_replace_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(b"old")
    with WriteFault("manifest.json", errno.ENOSPC).installed(), pytest.raises(OutputWriteError):
        files.write_atomically(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary left


def test_a_full_state_database_applies_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = [
        {"doc_id": f"{n:016x}", "gen_type": "key_facts_to_qa", "lengths": {"a": n}}
        for n in range(5000)
    ]
    with ResumeState.open(tmp_path) as ok:
        assert ok is not None
        ok.apply(entries[:10])
    monkeypatch.setattr(state, "_connect", sqlite_fault(state._connect, errno.ENOSPC))
    with ResumeState.open(tmp_path) as full:
        assert full is not None
        with pytest.raises(OutputWriteError) as caught:
            full.apply(entries)
        assert full.count() == 10 and full.lengths() == {"a": 9}  # rolled back whole
    assert_names(caught.value, STATE_FILE, errno.ENOSPC)


def test_a_read_only_directory_cannot_be_moved_aside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "progress.jsonl").write_bytes(b"")
    real = os.rename

    def read_only(src: object, dst: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), src)

    os.rename = read_only  # type: ignore[assignment]  # Path.rename calls it
    try:
        with pytest.raises(OutputWriteError) as caught:
            manifest.move_aside(out)
    finally:
        os.rename = real
    assert_names(caught.value, "out", errno.EROFS)
    assert (out / "progress.jsonl").exists()


def test_a_disk_fault_no_narrower_handler_saw_is_still_the_one_message(tmp_path: Path) -> None:
    """Wherever a full disk surfaces (here: raw, inside the run's task groups), the command
    line reports it as OutputWriteError, not as a crash."""
    raw = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.jsonl"))
    group = BaseExceptionGroup("run", [ExceptionGroup("workers", [raw])])
    [error] = cli._fatal_leaves(group, tmp_path)
    assert isinstance(error, OutputWriteError) and error.path == tmp_path / "x.jsonl"
    with pytest.raises(BaseExceptionGroup):  # anything else is still a bug, shown as one
        cli._fatal_leaves(BaseExceptionGroup("run", [OSError(errno.EIO, "io")]), tmp_path)


# --- whole runs, in this process -------------------------------------------------------------

# (file, errno, writes of it that succeed first): every kind of output file a run writes
# with os calls. After a success or two, part of the work is committed when the fault hits.
FILE_FAULTS = [
    ("extractive_summary/gen.jsonl", errno.ENOSPC, 1),
    ("document_based_qa/gen.jsonl", errno.EDQUOT, 0),
    ("rejects.jsonl", errno.EROFS, 1),
    ("progress.jsonl", errno.ENOSPC, 1),
    ("progress.jsonl", errno.EDQUOT, 0),
    ("manifest.json", errno.EDQUOT, 0),
    ("run.lock", errno.EROFS, 0),
]


@pytest.mark.parametrize(("fragment", "code", "after"), FILE_FAULTS)
async def test_a_write_fault_stops_the_run_and_the_same_run_resumes(
    tmp_path: Path, sim: RunningSimulator, fragment: str, code: int, after: int
) -> None:
    out = tmp_path / "out"
    config = config_for(sim.base_url, out)
    with WriteFault(fragment, code, after).installed() as fault:
        error = await stopped_by(config)
    assert fault.hits >= 1
    assert_names(error, fragment, code)
    await run_job(config, Stats(), preflight=False)
    assert_complete_output(out)


async def test_a_fault_on_the_failures_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with WriteFault("failures.", errno.ENOSPC).installed() as fault:
        async with running_simulator(
            SimulatorConfig(fault=bad_request_for_document_answers())
        ) as sim:
            error = await stopped_by(config_for(sim.base_url, out))
    assert fault.hits >= 1
    assert_names(error, "failures.jsonl", errno.ENOSPC)
    async with running_simulator() as sim:
        await run_job(config_for(sim.base_url, out), Stats(), preflight=False)
    assert_complete_output(out)


@pytest.mark.parametrize(
    ("module", "name", "code"),
    [
        (cache, cache.CACHE_FILE, errno.ENOSPC),
        (cache, cache.CACHE_FILE, errno.EROFS),
        (state, STATE_FILE, errno.EROFS),
    ],
)
async def test_a_fault_on_a_database_stops_the_run_and_the_same_run_resumes(
    tmp_path: Path,
    sim: RunningSimulator,
    monkeypatch: pytest.MonkeyPatch,
    module: object,
    name: str,
    code: int,
) -> None:
    out = tmp_path / "out"
    config = config_for(sim.base_url, out)
    with monkeypatch.context() as patch:
        patch.setattr(module, "_connect", sqlite_fault(module._connect, code))  # type: ignore[attr-defined]
        error = await stopped_by(config)
    assert error.path == out / name
    remedy = FULL if code == errno.ENOSPC else "make it and its directory writable"
    assert remedy in str(error) and str(error).endswith("nothing is lost")
    await run_job(config, Stats(), preflight=False)
    assert_complete_output(out)


# --- through the command line ---------------------------------------------------------------


async def diskfull_cli(
    base_url: str, out: Path, seeds: Path, fault: WriteFault | None = None
) -> tuple[int, str]:
    """``python -m engine run`` as a user runs it; with ``fault``, meeting it."""
    sets = set_args(*SMALL, f'output.dir="{out}"', f'input.seeds="{seeds}"')
    args = ["run", DEFAULT_TOML, "--no-preflight", *sets]
    if fault is None:
        return await engine_cli(*args, env=teacher_env(base_url))
    env = teacher_env(base_url) | {
        "DISKFULL_PATH": fault.fragment,
        "DISKFULL_ERRNO": str(fault.code),
        "DISKFULL_AFTER": str(fault.after),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.diskfull", *args,
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    return await finish(proc)


@pytest.mark.slow
async def test_cli_a_full_disk_mid_run_exits_1_and_the_same_command_finishes_once(
    tmp_path: Path,
) -> None:
    seeds, out = corpus(tmp_path / "seeds.jsonl"), tmp_path / "out"
    gen = out / "key_facts_to_qa" / "gen.jsonl"
    # Replies take a few ms, so that the run commits in several batches before the fault.
    async with running_simulator(SimulatorConfig(latency_mean_s=0.005, seed=1)) as sim:
        fault = WriteFault("key_facts_to_qa/gen.jsonl", errno.ENOSPC, after=3)
        code, output = await diskfull_cli(sim.base_url, out, seeds, fault)
        assert code == 1, output
        errors = [line for line in output.splitlines() if " ERROR " in line]
        assert len(errors) == 1, output  # one message, logged once (and in the summary)
        assert f"cannot write {gen}: no space left on the device: {FULL}" in errors[0]
        assert "Traceback" not in output
        checkpoint = load_checkpoint(out)
        done_before = len(checkpoint.done)
        checkpoint.close()
        assert 0 < done_before < DOCS * 4, output  # some units were committed, not all
        code, output = await diskfull_cli(sim.base_url, out, seeds)
        assert code == 0, output
    assert f"skipped as already done {done_before}" in output
    assert_complete(out, DOCS)


@pytest.mark.slow
async def test_cli_a_report_that_cannot_be_written_exits_1(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with running_simulator() as sim:
        fault = WriteFault(report.REPORT_FILE, errno.EDQUOT)
        code, output = await diskfull_cli(sim.base_url, out, SAMPLE_SEEDS, fault)
        assert code == 1, output
        assert f"cannot write {out / report.REPORT_FILE}: " in output and FULL in output
        assert not (out / report.REPORT_FILE).exists()
        assert not list(out.glob(f".{report.REPORT_FILE}.*"))
        code, output = await diskfull_cli(sim.base_url, out, SAMPLE_SEEDS)
        assert code == 0, output
    assert (out / report.REPORT_FILE).exists()
    assert_complete_output(out)
