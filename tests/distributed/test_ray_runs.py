"""Whole runs on Ray (run.backend = "ray"): real engine processes, a real two-node Ray cluster
on 127.0.0.1 (``ray_cluster``) or a Ray the engine starts itself, the simulator as the teacher.

Each proves one guarantee of the issue: the same records as a local run, with both nodes
working; a node removed without grace; the driver killed and run again; SIGINT; the API key
nowhere in Ray. Slow by nature (a Ray cluster takes seconds to start on two cores).
"""

from __future__ import annotations

import asyncio
import bisect
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import orjson
import pytest

from engine.output.checkpoint import PROGRESS_FILE
from engine.testing.simulator import RunningSimulator, SimulatorConfig, running_simulator
from tests.distributed.conftest import (
    KEY,
    RAY_ENV,
    RayCluster,
    alive,
    engine_env,
    kill_session,
    needs_ray,
    outside_loopback,
    session_pids,
)
from tests.support.cli import DEFAULT_TOML, progress_lines, set_args, start_engine, teacher_env
from tests.support.runs import (
    EXPECTED_PER_DOC,
    SMALL,
    D,
    F,
    N,
    Q,
    assert_complete,
    corpus,
    pipeline_requests,
    records,
)

pytestmark = [pytest.mark.slow, needs_ray]

# Requests one unit of each type sends with the SMALL fan-out and a clean teacher.
REQUESTS_PER_UNIT = {
    "extractive_summary": 1 + N + N * Q,
    "detailed_summary": 1 + N + N * Q,
    "key_facts_to_qa": 1 + F,
    "document_based_qa": 1 + D,
}
RUN_TIMEOUT_S = 240


def _args(out: Path, seeds: Path, *extra: str) -> list[str]:
    sets = set_args(
        *SMALL,
        f'output.dir="{out}"',
        f'input.seeds="{seeds}"',
        "run.progress_interval_s=1",
        *extra,
    )
    return ["run", DEFAULT_TOML, "--no-cache", *sets]


def _ray(address: str = "") -> list[str]:
    return ['run.backend="ray"', *([f'ray.address="{address}"'] if address else [])]


async def _start(sim: RunningSimulator, args: list[str], **kw: Any) -> asyncio.subprocess.Process:
    env = engine_env(teacher_env(sim.base_url, key=KEY))
    out = kw.pop("log")
    return await start_engine(*args, env=env, output=out, **kw)


async def _start_own_ray(
    sim: RunningSimulator, args: list[str], log: IO[bytes]
) -> asyncio.subprocess.Process:
    """The engine starting a Ray of its own, in a session of its own, with nothing of the
    tests' loopback settings: what keeps that Ray on 127.0.0.1 is the engine's own doing."""
    env = engine_env(teacher_env(sim.base_url, key=KEY))
    for name in RAY_ENV:
        env.pop(name)
    return await start_engine(*args, env=env, output=log, start_new_session=True)


async def _wait(proc: asyncio.subprocess.Process, log: Path, within: float = RUN_TIMEOUT_S) -> int:
    try:
        async with asyncio.timeout(within):
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code is not None
    if code not in (0, 130):
        print(log.read_text()[-5000:])
    return code


async def _engine_actors_end(cluster: RayCluster, within: float = 30) -> None:
    """Every actor the engine started on ``cluster`` (its limiter and workers, named
    ``engine-...``) is dead within ``within`` seconds of its run's end, however it ended."""
    deadline = time.monotonic() + within
    while True:
        actors = await asyncio.to_thread(cluster.actors)
        ours = {name: state for name, state in actors.items() if name.startswith("engine-")}
        assert ours, "the engine started no actor on the cluster"
        left = {name: state for name, state in ours.items() if state != "DEAD"}
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert left == {}, f"the engine's actors outlived its run: {left}"


def _report(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = orjson.loads((out / "run_report.json").read_bytes())
    return report


def _units_once(out: Path, docs: int) -> None:
    units = [
        (e["doc_id"], e["gen_type"])
        for e in (orjson.loads(line) for line in (out / PROGRESS_FILE).read_bytes().splitlines())
        if "doc_id" in e
    ]
    assert len(units) == len(set(units)) == docs * len(EXPECTED_PER_DOC)


async def test_two_nodes_write_the_records_of_a_local_run_and_both_send(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    docs = 200
    seeds = corpus(tmp_path / "seeds.jsonl", docs)
    outputs = {}
    for backend in ("ray", "local"):
        out = tmp_path / backend
        extra = _ray(ray_cluster.address) if backend == "ray" else []
        config = SimulatorConfig(api_key=KEY, seed=7)
        async with running_simulator(config) as sim:
            log = tmp_path / f"{backend}.log"
            with log.open("wb") as f:
                proc = await _start(sim, _args(out, seeds, *extra), log=f)
                if backend == "ray":
                    await asyncio.sleep(8)  # the workers are up by now
                    ray_cluster.check_listeners()
                assert await _wait(proc, log) == 0
            outputs[backend] = (out, len(sim.state.requests), len(pipeline_requests(sim)))
    (ray_out, ray_sent, ray_pipeline), (local_out, _, local_pipeline) = (
        outputs["ray"],
        outputs["local"],
    )
    for gen_type in EXPECTED_PER_DOC:
        got, want = records(ray_out, gen_type), records(local_out, gen_type)
        assert sorted(got, key=lambda r: r["id"]) == sorted(want, key=lambda r: r["id"])
    assert_complete(ray_out, docs)
    assert ray_pipeline == local_pipeline
    ray = _report(ray_out)["ray"]
    by_node = Counter[str]()
    for worker in ray["workers"]:
        by_node[worker["node"]] += worker["requests"]
    assert set(by_node) == set(ray_cluster.node_ids) and min(by_node.values()) > 0
    # What the workers say they sent is what the server got (besides the driver's preflight).
    assert sum(by_node.values()) == ray_pipeline < ray_sent
    _key_nowhere_in_ray(ray_cluster)
    await _engine_actors_end(ray_cluster)


def _key_nowhere_in_ray(cluster: RayCluster) -> None:
    """Neither Ray's logs and files (what ``ray logs`` and the dashboard serve) nor its GCS
    tables (what the dashboard and the state API show) hold the key."""
    found = subprocess.run(
        ["grep", "-rl", "--binary-files=text", KEY, str(cluster.session_dir)],
        capture_output=True,
        text=True,
    ).stdout
    assert found == ""
    tables = cluster.tables()
    assert "engine-limiter-" in tables and "engine-worker-" in tables  # the actors are there
    assert KEY not in tables


@pytest.mark.timeout(300)
async def test_a_node_removed_without_grace_loses_only_its_units_in_flight(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    docs = 60
    seeds = corpus(tmp_path / "seeds.jsonl", docs)
    out, log = tmp_path / "out", tmp_path / "run.log"
    units = docs * len(EXPECTED_PER_DOC)
    # Latency-bound (about 15 s), so that the node's end comes near 30 % and the worker Ray
    # restarts on the other node has units left to take.
    config = SimulatorConfig(api_key=KEY, latency_mean_s=0.2)
    async with running_simulator(config) as sim:
        with log.open("wb") as f:
            proc = await _start(sim, _args(out, seeds, *_ray(ray_cluster.address)), log=f)
            async with asyncio.timeout(RUN_TIMEOUT_S):
                while progress_lines(out) < 0.3 * units:
                    assert proc.returncode is None, log.read_text()[-3000:]
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(ray_cluster.remove, 1)
            removed_at = progress_lines(out)
            assert await _wait(proc, log) == 0
        await _engine_actors_end(ray_cluster)
        sent = len(pipeline_requests(sim))
    _units_once(out, docs)
    assert_complete(out, docs)
    ray = _report(out)["ray"]
    rerun = ray["units_rerun"]
    assert sum(rerun.values()) > 0, "the node had no unit in flight: the test proves nothing"
    extra = sent - docs * sum(REQUESTS_PER_UNIT.values())
    bound = sum(REQUESTS_PER_UNIT[t] * n for t, n in rerun.items())
    print(
        f"node removed at {removed_at}/{units} units: units run again {rerun}, "
        f"extra requests {extra} (bound {bound})"
    )
    assert 0 <= extra <= bound
    assert sum(w["lost"] for w in ray["workers"]) == 1
    # Ray restarted the lost worker on the other node, and it took units again.
    assert all(w["alive"] for w in ray["workers"])
    assert {w["node"] for w in ray["workers"]} == {ray_cluster.node_ids[0]}


async def test_nodes_without_the_key_stop_the_run_saying_where_to_set_it(
    keyless_ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """The driver has the key, the nodes do not: exit 1 before any unit is written, with
    the one message that says where the key goes, and the key nowhere in it."""
    seeds = corpus(tmp_path / "seeds.jsonl", 10)
    out, log = tmp_path / "out", tmp_path / "run.log"
    async with running_simulator(SimulatorConfig(api_key=KEY)) as sim:
        with log.open("wb") as f:
            proc = await _start(sim, _args(out, seeds, *_ray(keyless_ray_cluster.address)), log=f)
            assert await _wait(proc, log, within=120) == 1
        assert pipeline_requests(sim) == []
    text = log.read_text()
    assert "TEACHER_MODEL_API_KEY is not set in this node's environment" in text
    fatal = [line for line in text.splitlines() if line.startswith("run fatal (exit 1): ")]
    assert len(fatal) == 1
    assert re.fullmatch(
        r"run fatal \(exit 1\): worker [01] on \S+: invalid configuration:", fatal[0]
    )
    assert "ray::" not in text and 'File "' not in text  # no remote traceback
    assert KEY not in text
    assert progress_lines(out) == 0
    await _engine_actors_end(keyless_ray_cluster)


@pytest.mark.timeout(300)
async def test_the_driver_killed_then_run_again_resumes_without_duplicates(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    docs = 40
    seeds = corpus(tmp_path / "seeds.jsonl", docs)
    out = tmp_path / "out"
    args = _args(out, seeds, *_ray(ray_cluster.address))
    config = SimulatorConfig(api_key=KEY, latency_mean_s=0.05)
    async with running_simulator(config) as sim:
        with (tmp_path / "first.log").open("wb") as f:
            proc = await _start(sim, args, log=f)
            async with asyncio.timeout(RUN_TIMEOUT_S):
                while progress_lines(out) < 20:
                    assert proc.returncode is None
                    await asyncio.sleep(0.02)
            proc.kill()
            assert await proc.wait() == -signal.SIGKILL
        # Ray ends a dead driver's job, and its actors with it.
        await _engine_actors_end(ray_cluster)
        done_before = progress_lines(out)
        with (tmp_path / "second.log").open("wb") as f:
            proc = await _start(sim, args, log=f)
            assert await _wait(proc, tmp_path / "second.log") == 0
        await _engine_actors_end(ray_cluster)
    assert "resuming" in (tmp_path / "second.log").read_text()
    _units_once(out, docs)
    assert_complete(out, docs)
    report = _report(out)
    skipped = sum(t["units_skipped"] for t in report["types"].values())
    assert skipped >= done_before - 1  # the last line may have been cut by the kill


# Ray's agents (dashboard agent, runtime-env agent) notice their raylet's death within
# seconds but then try to report it to the GCS, which is gone too: they end about 60 s later.
RAY_AGENTS = ("DashboardAgent", "RuntimeEnvAgent", "dashboard/agent.py", "runtime_env/agent")
AGENTS_LINGER_S = 90.0


@pytest.mark.timeout(240)
async def test_the_driver_killed_takes_the_ray_it_started_down_and_runs_again(
    tmp_path: Path,
) -> None:
    """kill -9 of a driver that started its own Ray: that Ray goes with it (its GCS and
    raylet at once, its agents by themselves within Ray's own timeout), and the same command
    resumes."""
    docs = 30
    seeds = corpus(tmp_path / "seeds.jsonl", docs)
    out = tmp_path / "out"
    args = _args(out, seeds, *_ray())
    config = SimulatorConfig(api_key=KEY, latency_mean_s=0.05)
    sessions: list[int] = []
    try:
        async with running_simulator(config) as sim:
            with (tmp_path / "first.log").open("wb") as f:
                proc = await _start_own_ray(sim, args, f)
                sessions.append(proc.pid)
                async with asyncio.timeout(90):
                    while progress_lines(out) < 10:
                        assert proc.returncode is None, (tmp_path / "first.log").read_text()
                        await asyncio.sleep(0.05)
                ray_pids = [p for p in session_pids(proc.pid) if p != proc.pid]
                assert ray_pids, "the engine started no Ray processes"
                assert outside_loopback(session_pids(proc.pid)) == []
                agents = {p for p in ray_pids if any(a in _cmdline(p) for a in RAY_AGENTS)}
                proc.kill()
                assert await proc.wait() == -signal.SIGKILL
                killed_at = time.monotonic()
                left = await _outlive(set(ray_pids) - agents, within=15)
                assert left == set(), f"Ray processes outlived their driver: {sorted(left)}"
            with (tmp_path / "second.log").open("wb") as f:
                proc = await _start_own_ray(sim, args, f)
                sessions.append(proc.pid)
                assert await _wait(proc, tmp_path / "second.log") == 0
        wait_s = killed_at + AGENTS_LINGER_S - time.monotonic()
        left = await _outlive(ray_pids, within=wait_s)
        assert left == set(), f"Ray's agents outlived their driver: {sorted(left)}"
    finally:
        for sid in sessions:
            kill_session(sid)
    assert "resuming" in (tmp_path / "second.log").read_text()
    _units_once(out, docs)
    assert_complete(out, docs)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.timeout(120)
async def test_sigint_exits_130_and_leaves_no_ray_process(tmp_path: Path) -> None:
    """A Ray the engine starts itself: on 127.0.0.1 only, and gone with the run."""
    docs = 40
    seeds = corpus(tmp_path / "seeds.jsonl", docs)
    out, log = tmp_path / "out", tmp_path / "run.log"
    config = SimulatorConfig(api_key=KEY, latency_mean_s=0.2)
    async with running_simulator(config) as sim:
        with log.open("wb") as f:
            proc = await _start_own_ray(sim, _args(out, seeds, *_ray(), "run.grace_s=5"), f)
            try:
                async with asyncio.timeout(90):
                    while progress_lines(out) < 4:
                        assert proc.returncode is None, log.read_text()[-3000:]
                        await asyncio.sleep(0.05)
                ray_pids = [p for p in session_pids(proc.pid) if p != proc.pid]
                assert ray_pids, "the engine started no Ray processes"
                assert outside_loopback(session_pids(proc.pid)) == []
                proc.send_signal(signal.SIGINT)
                assert await _wait(proc, log, within=60) == 130
                await asyncio.sleep(1)
                left = session_pids(proc.pid)
            finally:
                kill_session(proc.pid)
    assert left == [], f"Ray processes left behind: {left}"
    assert alive(ray_pids) == set()
    report = _report(out)
    assert report["exit"]["code"] == 130
    assert report["ray"]["cluster"] == "started for the run"


async def _outlive(pids: Iterable[int], within: float) -> set[int]:
    """Those of ``pids`` still alive after ``within`` seconds (or none as soon as all end)."""
    deadline = time.monotonic() + within
    while (left := alive(pids)) and time.monotonic() < deadline:  # noqa: ASYNC110 (other processes)
        await asyncio.sleep(0.2)
    return left


RATE_CAP = 300
RATE_SPAN_S = 135.0


def _windows(
    arrivals: list[float], begin: float, end: float, span: float = 60.0
) -> tuple[int, int]:
    """The busiest ``span`` of ``arrivals`` (sorted), and the quietest one that lies wholly
    between ``begin`` and ``end``: the arrivals in (t, t+span] for t = ``begin`` and every
    arrival after it (a sliding window holds fewest just after it loses an arrival)."""
    busiest = hi = 0
    quietest = len(arrivals)
    starts = [begin, *(a for a in arrivals if a >= begin)]
    for lo, start in enumerate(arrivals):
        while hi < len(arrivals) and arrivals[hi] < start + span:
            hi += 1
        busiest = max(busiest, hi - lo)
    for start in starts:
        if start + span <= end:
            inside = bisect.bisect_right(arrivals, start + span) - bisect.bisect_right(
                arrivals, start
            )
            quietest = min(quietest, inside)
    return busiest, quietest


@pytest.mark.timeout(360)
async def test_a_global_cap_over_two_workers_holds_at_the_server(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    seeds = corpus(tmp_path / "seeds.jsonl", 60)
    out, log = tmp_path / "out", tmp_path / "run.log"
    extra = [*_ray(ray_cluster.address), "ray.workers=2", f"limits.requests_per_minute={RATE_CAP}"]
    config = SimulatorConfig(api_key=KEY, latency_mean_s=0.05)
    async with running_simulator(config) as sim:
        with log.open("wb") as f:
            proc = await _start(sim, _args(out, seeds, *extra, "run.grace_s=1"), log=f)
            async with asyncio.timeout(120):
                while not pipeline_requests(sim):
                    assert proc.returncode is None, log.read_text()[-3000:]
                    await asyncio.sleep(0.05)
            first = pipeline_requests(sim)[0].arrival
            await asyncio.sleep(RATE_SPAN_S - (time.monotonic() - first))
            ray_cluster.check_listeners()
            stopped = time.monotonic()
            proc.send_signal(signal.SIGINT)
            assert await _wait(proc, log, within=60) == 130
        await _engine_actors_end(ray_cluster)
        # Every request the server got, the driver's preflight probes included.
        arrivals = sorted(r.arrival for r in sim.state.requests if r.arrival <= stopped)
    busiest, quietest = _windows(arrivals, first, stopped)
    ray = _report(out)["ray"]
    print(
        f"rate cap {RATE_CAP}/min over 2 workers, {stopped - first:.0f} s: busiest 60 s "
        f"{busiest}, quietest full 60 s {quietest}, {len(arrivals)} requests; "
        f"leases {ray['limiter'].get('leases')}"
    )
    assert busiest <= RATE_CAP * 1.02
    assert quietest >= RATE_CAP * 0.97
    assert all(w["requests"] > 0 for w in ray["workers"])
    # Slices, not a remote call per request.
    assert ray["limiter"]["leases"] < len(arrivals) / 1.5


def test_windows_count_what_they_should() -> None:
    arrivals = [0.0, 10.0, 30.0, 59.0, 60.0, 61.0, 100.0]
    # [10, 70) holds 5; (30, 90] holds 3, the fewest of the windows that end by 100.
    assert _windows(arrivals, begin=0.0, end=100.0) == (5, 3)
    # Windows start at ``begin`` at the earliest: (59, 119] is the only full one here.
    assert _windows(arrivals, begin=59.0, end=119.0) == (5, 3)
    assert _windows(arrivals, begin=59.0, end=118.0) == (5, len(arrivals))
