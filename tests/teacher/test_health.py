"""The outage gate, driven through the real client with a fake endpoint on virtual time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from engine.errors import (
    EndpointDown,
    MalformedResponse,
    RetriesExhausted,
    RetryableError,
    TeacherConnectionError,
    TeacherDNSError,
    TeacherHTTPError,
    TeacherTimeout,
)
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.teacher.client import HTTPTeacher
from engine.teacher.health import AttemptOutcome, answered_outcome, unreachable
from engine.teacher.limits import Lease, RequestLimiter
from engine.teacher.protocol import ChatReply, ChatRequest, Message
from engine.teacher.transport import Response
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support.clock import run_virtual
from tests.support.fakes import make_teacher
from tests.support.runs import assert_complete_output, config_for

REQUEST = ChatRequest(messages=(Message("user", "hi"),))
OK_BODY = b'{"model": "m", "choices": [{"message": {"content": "ok"}}]}'
LATENCY_S = 1.0


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, AttemptOutcome.ANSWERED),
        (500, AttemptOutcome.ANSWERED),
        (429, AttemptOutcome.ANSWERED),
        (401, AttemptOutcome.ANSWERED),
        (502, AttemptOutcome.UNREACHABLE),
        (503, AttemptOutcome.UNREACHABLE),
        (504, AttemptOutcome.UNREACHABLE),
    ],
)
def test_an_answer_is_unreachable_only_from_a_gateway(status: int, outcome: AttemptOutcome) -> None:
    assert answered_outcome(status) is outcome


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (TeacherConnectionError("refused"), True),
        (TeacherDNSError("no such host"), True),
        (TeacherTimeout("late"), True),
        (TeacherHTTPError("HTTP 502", status=502), True),
        (TeacherHTTPError("HTTP 504", status=504), True),
        (TeacherHTTPError("HTTP 500", status=500), False),
        (TeacherHTTPError("HTTP 429", status=429), False),
        (MalformedResponse("not JSON", status=200), False),
    ],
    ids=repr,
)
def test_which_failures_say_the_server_is_not_there(err: RetryableError, expected: bool) -> None:
    assert unreachable(err) is expected


class FakeEndpoint:
    """Answers after ``LATENCY_S``; while ``is_down(now)``, fails at once with ``fail``: a
    refused connection, or an HTTP status."""

    def __init__(self, is_down: Callable[[float], bool], fail: int | None = None) -> None:
        self.is_down = is_down
        self.fail = fail
        self.in_flight = 0
        self.peak_in_flight_while_down = 0
        self.down_attempts: list[tuple[float, int]] = []  # (time, in flight) of each
        self.attempts = 0
        self.first_success_after: dict[float, float] = {}

    async def __call__(self, url: str, body: bytes | None) -> Response:
        loop = asyncio.get_running_loop()
        self.attempts += 1
        if self.is_down(loop.time()):
            self.in_flight += 1
            self.peak_in_flight_while_down = max(self.peak_in_flight_while_down, self.in_flight)
            self.down_attempts.append((loop.time(), self.in_flight))
            await asyncio.sleep(0.01)
            self.in_flight -= 1
            if self.fail is None:
                raise TeacherConnectionError("connection refused")
            return Response(self.fail, {}, b"upstream trouble")
        await asyncio.sleep(LATENCY_S)
        return Response(200, {}, OK_BODY)


async def _send_all(teacher: HTTPTeacher, count: int) -> list[ChatReply | BaseException]:
    async with teacher:
        return await asyncio.gather(
            *(teacher.complete(REQUEST) for _ in range(count)), return_exceptions=True
        )


def test_a_ten_minute_outage_mid_run_fails_no_item() -> None:
    outage = (60.0, 660.0)
    endpoint = FakeEndpoint(lambda now: outage[0] <= now < outage[1])
    teacher, _ = make_teacher(endpoint)
    resumed_at: list[float] = []

    async def scenario() -> list[ChatReply | BaseException]:
        results = await _send_all(teacher, 4000)
        resumed_at.append(asyncio.get_running_loop().time())
        return results

    results = run_virtual(scenario())
    assert [r for r in results if not isinstance(r, ChatReply)] == []
    assert teacher.endpoints.outages == 1 and not teacher.endpoints.down
    # The wave in flight when it went down fails at once; after that, one probe at a time.
    assert endpoint.peak_in_flight_while_down <= 32
    assert max(n for t, n in endpoint.down_attempts if t > outage[0] + 1) == 1
    probes = endpoint.attempts - 4000
    # Probing backs off to one every 30 s: a 600 s outage costs tens of attempts, not
    # thousands (4000 items x 4 attempts would all have been burnt within a minute).
    assert probes < 32 + 40, probes
    # Work resumed promptly after the endpoint came back: 4000 x 1 s at 32 in flight is
    # 125 s of work, 60 s of it before the outage.
    assert resumed_at[0] < outage[1] + 30 + 70, resumed_at


def test_only_one_probe_in_flight_while_down() -> None:
    down_from = 5.0
    endpoint = FakeEndpoint(lambda now: now >= down_from)
    teacher, _ = make_teacher(endpoint, outage_max_s=300)
    results = run_virtual(_send_all(teacher, 200))
    # After the first wave that tipped the gate, every attempt is a lone probe.
    assert endpoint.peak_in_flight_while_down <= 32
    assert max(n for t, n in endpoint.down_attempts if t > down_from + 1) == 1
    assert all(isinstance(r, EndpointDown) for r in results if not isinstance(r, ChatReply))


def test_an_endless_outage_stops_the_run_after_outage_max_s() -> None:
    endpoint = FakeEndpoint(lambda now: True)
    teacher, _ = make_teacher(endpoint, outage_max_s=120)
    ended: list[float] = []

    async def scenario() -> list[ChatReply | BaseException]:
        results = await _send_all(teacher, 50)
        ended.append(asyncio.get_running_loop().time())
        return results

    results = run_virtual(scenario())
    assert all(isinstance(r, EndpointDown) for r in results), results
    assert "unreachable for" in str(results[0]) and "teacher.test" in str(results[0])
    assert 120 <= ended[0] < 120 + 31 + 1
    assert endpoint.attempts < 50 * 4  # no item burnt its budget


def test_gateway_errors_count_as_an_outage_but_500_does_not() -> None:
    gateway = FakeEndpoint(lambda now: now < 100, 502)
    teacher, _ = make_teacher(gateway)
    results = run_virtual(_send_all(teacher, 40))
    assert all(isinstance(r, ChatReply) for r in results)
    assert teacher.endpoints.outages == 1

    server_error = FakeEndpoint(lambda now: True, 500)
    teacher, _ = make_teacher(server_error)
    results = run_virtual(_send_all(teacher, 10))
    assert all(isinstance(r, RetriesExhausted) and r.attempts == 4 for r in results)
    assert teacher.endpoints.outages == 0


def test_one_request_failing_alone_uses_its_own_budget_and_is_not_an_outage() -> None:
    # More attempts than the threshold: only *different* requests failing make an outage.
    endpoint = FakeEndpoint(lambda now: True)
    teacher, _ = make_teacher(endpoint, outage_threshold=5, max_attempts=6)

    async def one() -> None:
        with pytest.raises(RetriesExhausted) as caught:
            async with teacher:
                await teacher.complete(REQUEST)
        assert caught.value.attempts == 6

    run_virtual(one())
    assert endpoint.attempts == 6 and not teacher.endpoints.down


async def test_the_teacher_going_away_mid_run_loses_nothing(tmp_path: Path) -> None:
    """A real server stops (connections refused) and comes back on the same port."""
    sim_config = SimulatorConfig(latency_mean_s=0.05)
    stats = Stats()
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(running_simulator(sim_config))
        config = config_for(
            sim.base_url,
            tmp_path,
            # Without the gate, three quick attempts would be gone within the outage.
            "retry.max_attempts=3",
            "retry.backoff_base_s=0.01",
            "retry.backoff_max_s=0.05",
            "retry.outage_threshold=3",
            "retry.outage_probe_base_s=0.05",
            "retry.outage_probe_max_s=0.2",
        )
        job = asyncio.create_task(run_job(config, stats))
        await asyncio.sleep(0.15)
        assert not job.done()
        await stack.aclose()  # the teacher goes away mid-run
        await asyncio.sleep(1.0)
        async with running_simulator(sim_config, port=sim.port):
            await asyncio.wait_for(job, timeout=30)
    assert_complete_output(tmp_path)
    assert sum(stats.failures.values()) == 0
    assert stats.teacher.retries["connection"] > 0


def test_waiting_out_an_outage_spends_no_rate_budget() -> None:
    # 300 requests wait out an outage under a 600 rpm cap. A probe's result wakes them all;
    # those that find nothing to route go back to waiting, and the work after the outage
    # must not queue behind them.
    outage = (5.0, 200.0)
    endpoint = FakeEndpoint(lambda now: outage[0] <= now < outage[1])
    limiter = RequestLimiter(requests_per_minute=600, max_concurrency=32)
    teacher, stats = make_teacher(endpoint, limiter=limiter)
    ended: list[float] = []

    async def scenario() -> list[ChatReply | BaseException]:
        results = await _send_all(teacher, 300)
        ended.append(asyncio.get_running_loop().time())
        return results

    results = run_virtual(scenario())
    assert [r for r in results if not isinstance(r, ChatReply)] == []
    # 250 requests left at 10 a second take 25 s; the last probe may come up to 30 s late.
    assert ended[0] < outage[1] + 30 + 25 + 10, ended
    assert stats.requests_sent < 300 + 32 + 20


class CountingLimiter(RequestLimiter):
    """Counts the slots taken (each also spends rate budget)."""

    slots_taken = 0

    def slot(self, tokens: int = 0) -> AbstractAsyncContextManager[Lease]:
        self.slots_taken += 1
        return super().slot(tokens)


def test_while_the_endpoint_is_down_only_the_probe_takes_a_slot() -> None:
    outage = (5.0, 600.0)
    endpoint = FakeEndpoint(lambda now: outage[0] <= now < outage[1])
    # A rate cap, so that a slot can take a while to get: waiters racing for the probe
    # would each take one.
    limiter = CountingLimiter(requests_per_minute=600, max_concurrency=32)
    teacher, _ = make_teacher(endpoint, limiter=limiter)
    taken_during: list[int] = []

    async def scenario() -> list[ChatReply | BaseException]:
        task = asyncio.ensure_future(_send_all(teacher, 1000))
        await asyncio.sleep(outage[0] + 60)  # down, and known to be down, for a while
        before = limiter.slots_taken
        await asyncio.sleep(400)
        taken_during.append(limiter.slots_taken - before)
        return await task

    results = run_virtual(scenario())
    assert [r for r in results if not isinstance(r, ChatReply)] == []
    # 400 s of outage: probes every 30 s at most, one slot each. (Were every waiter woken
    # to compete for each probe, they would queue at the rate cap for slots they could not
    # use: 4,214 slots in this window, before the probe was claimed in ``ready``.)
    assert taken_during[0] <= 400 / 30 + 2, taken_during
