"""Several endpoints: least-loaded routing, a replica cooled down and probed, the rest carry on.

Routing is driven through the real client with fake endpoints on virtual time; the last test
runs a real job against two local servers and stops one of them mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.errors import EndpointDown, TeacherConnectionError
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.teacher.client import HTTPTeacher
from engine.teacher.endpoints import EndpointPool
from engine.teacher.health import AttemptOutcome
from engine.teacher.limits import RequestLimiter
from engine.teacher.protocol import ChatReply, ChatRequest, Message
from engine.teacher.transport import Response
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.clock import run_virtual
from tests.support.fakes import make_teacher as fake_http_teacher
from tests.support.runs import assert_complete_output, config_for

REQUEST = ChatRequest(messages=(Message("user", "hi"),))
OK_BODY = b'{"model": "m", "choices": [{"message": {"content": "ok"}}]}'
URLS = ("http://a.test/v1", "http://b.test/v1")


class Replicas:
    """Fake replicas by URL: each answers after its latency, or refuses while it is down."""

    def __init__(self, latency: dict[str, float], down: Callable[[str, float], bool]) -> None:
        self.latency = latency
        self.down = down
        self.sent: Counter[str] = Counter()
        self.sent_while_down: list[tuple[str, float, int]] = []  # url, time, in flight there
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, url: str, body: bytes | None) -> Response:
        base = url.removesuffix("/chat/completions")
        now = asyncio.get_running_loop().time()
        self.sent[base] += 1
        self.in_flight[base] += 1
        try:
            if self.down(base, now):
                self.sent_while_down.append((base, now, self.in_flight[base]))
                await asyncio.sleep(0.01)
                raise TeacherConnectionError(f"connection to {url} refused")
            await asyncio.sleep(self.latency[base])
            return Response(200, {}, OK_BODY)
        finally:
            self.in_flight[base] -= 1


def make_teacher(
    replicas: Replicas, limiter: RequestLimiter | None = None, **retry: float
) -> HTTPTeacher:
    retry = {"outage_max_s": 300, **retry}
    return fake_http_teacher(replicas, list(URLS), concurrency=16, limiter=limiter, **retry)[0]


async def _send_all(teacher: HTTPTeacher, count: int) -> list[ChatReply | BaseException]:
    async with teacher:
        return await asyncio.gather(
            *(teacher.complete(REQUEST) for _ in range(count)), return_exceptions=True
        )


def _failures(results: list[ChatReply | BaseException]) -> list[BaseException]:
    return [r for r in results if not isinstance(r, ChatReply)]


def test_equal_replicas_share_the_load_evenly() -> None:
    replicas = Replicas({URLS[0]: 1.0, URLS[1]: 1.0}, lambda url, now: False)
    results = run_virtual(_send_all(make_teacher(replicas), 400))
    assert _failures(results) == []
    assert replicas.sent[URLS[0]] == replicas.sent[URLS[1]] == 200


def test_a_slower_replica_gets_fewer_requests() -> None:
    replicas = Replicas({URLS[0]: 1.0, URLS[1]: 3.0}, lambda url, now: False)
    results = run_virtual(_send_all(make_teacher(replicas), 400))
    assert _failures(results) == []
    # Least-loaded routing keeps as many in flight at each; the fast one turns them over
    # three times as often.
    assert 2.5 <= replicas.sent[URLS[0]] / replicas.sent[URLS[1]] <= 3.5


def test_a_dead_replica_is_cooled_down_and_probed_while_the_other_carries_on() -> None:
    dead_from = 5.0
    replicas = Replicas(
        {URLS[0]: 1.0, URLS[1]: 1.0}, lambda url, now: url == URLS[1] and now >= dead_from
    )
    teacher = make_teacher(replicas, outage_max_s=60)
    ended: list[float] = []

    async def scenario() -> list[ChatReply | BaseException]:
        results = await _send_all(teacher, 2000)
        ended.append(asyncio.get_running_loop().time())
        return results

    results = run_virtual(scenario())
    # Longer than outage_max_s, yet the run goes on: one replica is still up.
    assert ended[0] > 60 * 2
    assert _failures(results) == []
    health = teacher.endpoints.endpoints[1].health
    assert health.down and health.outages == 1
    late = [(t, n) for url, t, n in replicas.sent_while_down if t > dead_from + 2]
    # Cooled down: after the first wave, one probe at a time, with growing pauses.
    assert late and max(n for _, n in late) == 1
    assert len(late) < 12, late
    assert replicas.sent[URLS[0]] >= 1900


def test_a_replica_that_comes_back_rejoins() -> None:
    outage = (5.0, 40.0)
    replicas = Replicas(
        {URLS[0]: 1.0, URLS[1]: 1.0},
        lambda url, now: url == URLS[1] and outage[0] <= now < outage[1],
    )
    teacher = make_teacher(replicas)
    sent_after: Counter[str] = Counter()

    async def scenario() -> list[ChatReply | BaseException]:
        results = _send_all(teacher, 3000)
        task = asyncio.ensure_future(results)
        await asyncio.sleep(outage[1] + 30)
        sent_after.update(replicas.sent)
        done = await task
        for url in URLS:
            sent_after[url] = replicas.sent[url] - sent_after[url]
        return done

    results = run_virtual(scenario())
    assert _failures(results) == []
    assert teacher.endpoints.endpoints[1].health.outages == 1
    assert not teacher.endpoints.endpoints[1].health.down
    # Back in the rotation: after its return it takes its half again.
    assert abs(sent_after[URLS[0]] - sent_after[URLS[1]]) <= 0.1 * sum(sent_after.values())


def test_a_replica_marked_down_gets_only_probes_and_rejoins_when_one_is_answered() -> None:
    back_at = 30.0
    replicas = Replicas(
        {URLS[0]: 1.0, URLS[1]: 1.0}, lambda url, now: url == URLS[1] and now < back_at
    )
    teacher = make_teacher(replicas)

    async def scenario() -> list[ChatReply | BaseException]:
        teacher.endpoints.mark_down(URLS[1], "did not answer the preflight")
        return await _send_all(teacher, 2000)

    results = run_virtual(scenario())
    assert _failures(results) == []
    health = teacher.endpoints.endpoints[1].health
    assert not health.down and health.outages == 1
    # While down: one probe at a time, never the traffic a healthy replica gets.
    assert replicas.sent_while_down and max(n for _, _, n in replicas.sent_while_down) == 1
    assert len(replicas.sent_while_down) < 8
    assert replicas.sent[URLS[1]] > len(replicas.sent_while_down)  # it rejoined


async def test_a_retry_goes_to_another_replica_than_the_one_that_could_not_be_reached() -> None:
    pool = EndpointPool(URLS, threshold=3, probe_base_s=1, probe_max_s=10, give_up_s=60)
    busy = pool.route("a long request")  # keeps its replica the more loaded one
    assert busy is not None
    request = object()
    first = pool.route(request)
    assert first is not None and first.endpoint is not busy.endpoint  # the least loaded
    first.outcome = AttemptOutcome.UNREACHABLE
    pool.settle(first)
    # Still the least loaded, and not down (one failure), yet the retry goes to the other.
    again = pool.route(request)
    assert again is not None and again.endpoint is busy.endpoint
    again.outcome = AttemptOutcome.UNREACHABLE
    pool.settle(again)
    # Where every healthy replica failed it, it still goes out (its own attempts bound it).
    last = pool.route(request)
    assert last is not None and last.endpoint is first.endpoint


def test_marking_an_unknown_replica_down_is_a_key_error() -> None:
    pool = EndpointPool(URLS, threshold=3, probe_base_s=1, probe_max_s=10, give_up_s=60)
    with pytest.raises(KeyError):
        pool.mark_down("http://c.test/v1", "gone")


def test_all_replicas_down_stops_the_run_after_outage_max_s() -> None:
    replicas = Replicas({URLS[0]: 1.0, URLS[1]: 1.0}, lambda url, now: True)
    teacher = make_teacher(replicas, outage_max_s=120)
    results = run_virtual(_send_all(teacher, 50))
    assert all(isinstance(r, EndpointDown) for r in results), results
    assert "a.test" in str(results[0]) and "b.test" in str(results[0])
    assert sum(replicas.sent.values()) < 50 * 4  # no item burnt its budget


def test_requests_waiting_out_an_outage_hold_no_concurrency_slot() -> None:
    outage = (2.0, 30.0)
    replicas = Replicas({URLS[0]: 1.0, URLS[1]: 1.0}, lambda url, now: outage[0] <= now < outage[1])
    limiter = RequestLimiter(requests_per_minute=1_000_000, max_concurrency=16)
    teacher = make_teacher(replicas, limiter)
    during: list[int] = []

    async def scenario() -> list[ChatReply | BaseException]:
        task = asyncio.ensure_future(_send_all(teacher, 500))
        await asyncio.sleep(20.0)
        during.append(limiter.in_flight)
        return await task

    results = run_virtual(scenario())
    assert _failures(results) == []
    assert during[0] <= 2  # the probes at most, not the 16 the cap allows


async def test_one_of_two_real_servers_stopping_mid_run_loses_nothing(tmp_path: Path) -> None:
    fast = SimulatorConfig(latency_mean_s=0.02)
    busy = asyncio.Event()

    async def count(seq: int, body: dict[str, Any]) -> None:
        if seq >= 10:
            busy.set()  # the replica that leaves has served some of the run

    stats = Stats()
    async with running_simulator(fast) as keeps, contextlib.AsyncExitStack() as leaving_stack:
        leaving = await leaving_stack.enter_async_context(
            running_simulator(dataclasses.replace(fast, fault=count))
        )
        config = config_for(
            keeps.base_url,
            tmp_path,
            f'teacher.base_url=["{keeps.base_url}", "{leaving.base_url}"]',
            "retry.max_attempts=2",
            "retry.backoff_base_s=0.01",
            "retry.backoff_max_s=0.05",
            "retry.outage_threshold=2",
            "retry.outage_probe_base_s=0.05",
            "retry.outage_probe_max_s=0.2",
            "retry.outage_max_s=0.5",  # shorter than the rest of the run: must not stop it
        )
        job = asyncio.create_task(run_job(config, stats))
        await asyncio.wait_for(busy.wait(), timeout=30)
        before = len(keeps.state.requests)
        await leaving_stack.aclose()  # one replica goes away for good
        await asyncio.wait_for(job, timeout=30)
        after = len(keeps.state.requests) - before
    assert_complete_output(tmp_path)
    assert sum(stats.failures.values()) == 0
    assert after > 10  # the other carried the rest


def test_a_claimed_probe_that_is_not_sent_passes_to_the_next_waiter() -> None:
    pool = EndpointPool(["http://a.test/v1"], threshold=1, probe_base_s=1, probe_max_s=8,
                        give_up_s=300)  # fmt: skip

    async def scenario() -> tuple[bool, bool]:
        first = pool.route("request 1")
        assert first is not None
        first.outcome = AttemptOutcome.UNREACHABLE
        pool.settle(first)  # down now; a probe is due in 1 s
        claimed = await pool.ready()
        assert claimed is pool.endpoints[0] and claimed.health.probing
        second = asyncio.ensure_future(pool.ready())
        await asyncio.sleep(5)
        waited = not second.done()  # the probe is claimed: nobody else goes on
        pool.release(claimed)  # e.g. its request was cancelled while waiting for a slot
        return waited, await second is claimed

    waited, handed_on = run_virtual(scenario())
    assert waited and handed_on
