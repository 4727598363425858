from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from engine.config import RetryConfig, TeacherConfig
from engine.errors import OutputWriteError, RequestRejected, RetriesExhausted
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.teacher.cache import ResponseCache, canonical_body, request_key
from engine.teacher.client import HTTPTeacher
from engine.teacher.limits import RequestLimiter
from engine.teacher.protocol import ChatRequest, Message
from engine.teacher.stats import RequestStats
from engine.testing.simulator import RunningSimulator, SimulatorConfig, running_simulator
from tests.support.cli import (
    DEFAULT_TOML,
    engine_cli,
    set_args,
    teacher_env,
)
from tests.support.runs import (
    EXPECTED_PER_DOC,
    REQUESTS_PER_DOC,
    SMALL,
    assert_complete_output,
    config_for,
    read_gen,
    seed_count,
)

SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "facts", "schema": {"type": "object", "required": ["facts"]}},
}
REQUEST = ChatRequest(
    messages=(Message("system", "Be brief."), Message("user", "List the facts.")),
    temperature=0.3,
    max_tokens=100,
    n=2,
    response_format=SCHEMA,
    stage="key_facts",
)
TOTAL = seed_count() * REQUESTS_PER_DOC


def key_of(request: ChatRequest, model: str = "m") -> bytes:
    return request_key(canonical_body(request.payload(model)))


def stored_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        count: int = conn.execute("SELECT count(*) FROM replies").fetchone()[0]
    conn.close()
    return count


def aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


# --- the key -----------------------------------------------------------------------------


def test_key_ignores_the_order_of_keys_at_every_level() -> None:
    payload = REQUEST.payload("m")
    reordered = {k: payload[k] for k in reversed(payload)}
    reordered["response_format"] = {
        "json_schema": {"schema": {"required": ["facts"], "type": "object"}, "name": "facts"},
        "type": "json_schema",
    }
    assert list(reordered) != list(payload)
    assert request_key(canonical_body(reordered)) == request_key(canonical_body(payload))


def test_key_ignores_the_stage_which_is_never_sent() -> None:
    assert key_of(dataclasses.replace(REQUEST, stage="other")) == key_of(REQUEST)


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(REQUEST, temperature=0.31),
        dataclasses.replace(REQUEST, max_tokens=101),
        dataclasses.replace(REQUEST, n=1),
        dataclasses.replace(REQUEST, n=3),
        dataclasses.replace(REQUEST, response_format=None),
        dataclasses.replace(REQUEST, response_format={"type": "json_object"}),
        dataclasses.replace(
            REQUEST,
            response_format={**SCHEMA, "json_schema": {"name": "facts", "schema": {}}},
        ),
        dataclasses.replace(REQUEST, messages=REQUEST.messages[1:]),
        dataclasses.replace(REQUEST, messages=REQUEST.messages[::-1]),
        dataclasses.replace(REQUEST, messages=(*REQUEST.messages[:1], Message("user", "List."))),
        dataclasses.replace(
            REQUEST, messages=(Message("user", "Be brief."), *REQUEST.messages[1:])
        ),
    ],
    ids=[
        "temperature",
        "max_tokens",
        "n=1",
        "n=3",
        "no_response_format",
        "json_object",
        "other_schema",
        "fewer_messages",
        "message_order",
        "message_text",
        "message_role",
    ],
)
def test_every_sent_parameter_is_in_the_key(changed: ChatRequest) -> None:
    assert key_of(changed) != key_of(REQUEST)


def test_the_model_is_in_the_key() -> None:
    assert key_of(REQUEST, "m2") != key_of(REQUEST, "m")


# --- the store -----------------------------------------------------------------------------


def test_put_then_get_before_and_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache.open(path) as cache:
        assert cache.get(b"k1") is None
        cache.put(b"k1", b'{"choices": [1]}')
        cache.put(b"k2", b"two")
        assert cache.get(b"k1") == b'{"choices": [1]}'  # pending, not yet committed
        assert repr(cache).endswith("open hits=1 misses=1 stored=2 pending=2>")
    assert stored_count(path) == 2
    with ResponseCache.open(path) as cache:
        assert (cache.get(b"k1"), cache.get(b"k2"), cache.get(b"k3")) == (
            b'{"choices": [1]}',
            b"two",
            None,
        )


def test_discard_forgets_pending_and_committed_entries(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache.open(path) as cache:
        cache.put(b"committed", b"one")
        cache.flush()
        cache.put(b"pending", b"two")
        cache.discard(b"committed")
        cache.discard(b"pending")
        assert cache.get(b"committed") is None and cache.get(b"pending") is None
    assert stored_count(path) == 0


async def test_a_forgotten_reply_is_asked_for_again(tmp_path: Path, sim: RunningSimulator) -> None:
    with ResponseCache.open(tmp_path / "cache.sqlite") as cache:
        stats = RequestStats()
        async with teacher_for(sim.base_url, stats, cache) as teacher:
            await teacher.complete(REQUEST)
            teacher.forget(REQUEST)  # e.g. its reply did not validate
            await teacher.complete(REQUEST)
            await teacher.complete(REQUEST)
    assert (stats.requests_sent, stats.cache_hits) == (2, 1)


def test_puts_are_committed_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache.open(path, batch_size=3)
    cache.put(b"a", b"1")
    cache.put(b"b", b"2")
    assert stored_count(path) == 0
    cache.put(b"c", b"3")
    assert stored_count(path) == 3
    cache.put(b"d", b"4")
    assert stored_count(path) == 3
    cache.close()
    assert stored_count(path) == 4


async def test_a_timer_commits_a_partial_batch(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache.open(path, batch_size=100, flush_after_s=0.0) as cache:
        cache.put(b"a", b"1")
        assert stored_count(path) == 0
        await asyncio.sleep(0.01)  # the flush timer is due first
        await cache.drain()  # its commit runs on the cache's thread
        assert stored_count(path) == 1
        assert "pending=0" in repr(cache)


async def test_lookup_waits_on_the_cache_thread_not_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache.open(path, batch_size=1) as cache:
        cache.put(b"k", b"v")  # committed on the cache's thread, not waited for
        assert await cache.lookup(b"k") == b"v"  # ordered after the commit
        assert await cache.lookup(b"other") is None
        assert (cache.hits, cache.misses) == (1, 1)


# --- the size bound ------------------------------------------------------------------------

BODY = 20_000  # bytes a reply


def fill(cache: ResponseCache, keys: range) -> None:
    for i in keys:
        cache.put(b"k%d" % i, bytes([i % 251]) * BODY)
        cache.flush()


def test_the_oldest_entries_are_evicted_and_the_file_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    bound = 400_000
    with ResponseCache.open(path, max_bytes=bound) as cache:
        fill(cache, range(100))  # 2 MB of replies into a 0.4 MB cache
        assert 0 < cache.size_bytes <= bound
        evicted = cache.evicted
        assert cache.get(b"k0") is None and cache.get(b"k99") == bytes([99]) * BODY
    assert evicted > 80  # about 90 % of 100: the oldest went first
    assert stored_count(path) == 100 - evicted
    assert path.stat().st_size <= bound * 1.1  # the file itself, not only its free list


def test_a_lower_bound_shrinks_a_file_filled_under_a_higher_one(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache.open(path) as cache:  # unbounded
        fill(cache, range(100))
    before = path.stat().st_size
    assert before > 2_000_000
    with ResponseCache.open(path, max_bytes=500_000) as cache:
        assert cache.size_bytes > 2_000_000  # measured at open
        fill(cache, range(100, 101))  # the first commit evicts
        assert cache.get(b"k100") is not None and cache.get(b"k0") is None
    assert path.stat().st_size <= 500_000 * 1.1 < before


def test_a_full_database_stops_the_run_at_the_next_use(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache.open(path)
    # SQLite's own page limit: a real SQLITE_FULL, as a full disk gives.
    assert cache._conn is not None
    cache._conn.execute("PRAGMA max_page_count = 8")
    cache.put(b"big", b"x" * 200_000)
    cache.flush()  # outside a loop: waits for the thread, which meets the full database
    with pytest.raises(OutputWriteError) as caught:
        cache.put(b"next", b"y")
    message = str(caught.value)
    assert str(path) in message
    assert "free space and run the same command again: nothing is lost" in message
    with pytest.raises(OutputWriteError):
        cache.close()  # a run that asks nothing more still ends on it


def test_a_file_that_is_not_a_database_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"torn garbage " * 500)
    with ResponseCache.open(path) as cache:
        assert cache.enabled
        assert cache.get(b"k") is None
        cache.put(b"k", b"v")
    [moved] = aside(path)
    assert moved.read_bytes() == b"torn garbage " * 500
    assert "damaged" in caplog.text
    with ResponseCache.open(path) as cache:
        assert cache.get(b"k") == b"v"


def test_a_truncated_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache.open(path) as cache:
        for i in range(300):
            cache.put(request_key(b"%d" % i), b"x" * 2000)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with ResponseCache.open(path) as cache:
        assert cache.enabled
        assert cache.get(request_key(b"1")) is None
    assert len(aside(path)) == 1


def test_damage_found_mid_run_turns_the_cache_off_without_raising(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    keys = [request_key(b"%d" % i) for i in range(20)]
    with ResponseCache.open(path) as cache:
        for i, key in enumerate(keys):
            cache.put(key, bytes([65 + i]) * 50_000)  # on overflow pages, last ones at the end
    data = bytearray(path.read_bytes())
    data[-3 * 4096 :] = b"\x00\x00\xff\xff" * 3072
    path.write_bytes(bytes(data))
    cache = ResponseCache.open(path)
    assert cache.enabled  # the damage is not where opening looks
    got = [cache.get(key) for key in keys]
    assert None in got
    assert not cache.enabled
    cache.put(b"k", b"v")  # ignored, no error
    assert cache.get(b"k") is None
    cache.close()
    assert not path.exists()
    assert len(aside(path)) == 1


def test_an_unusable_path_runs_without_a_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with ResponseCache.open(tmp_path) as cache:  # a directory
        assert not cache.enabled
        cache.put(b"k", b"v")
        assert cache.get(b"k") is None
    assert "running without it" in caplog.text
    assert aside(tmp_path) == []


def test_a_failure_that_is_not_damage_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache.open(path)
    with sqlite3.connect(path) as other:
        other.execute("DROP TABLE replies")
    other.close()
    assert cache.get(b"k") is None
    assert not cache.enabled
    cache.close()
    assert path.exists()
    assert aside(path) == []


# --- the client ----------------------------------------------------------------------------


def teacher_for(
    base_url: str, stats: RequestStats, cache: ResponseCache, attempts: int = 4
) -> HTTPTeacher:
    async def no_sleep(_delay: float) -> None:
        pass

    return HTTPTeacher(
        TeacherConfig(base_url=base_url, model="sim-teacher"),
        RetryConfig(max_attempts=attempts),
        RequestLimiter(requests_per_minute=100_000, max_concurrency=4),
        stats=stats,
        sleep=no_sleep,
        cache=cache,
    )


async def test_only_valid_replies_are_stored(tmp_path: Path) -> None:
    rejected = dataclasses.replace(REQUEST, max_tokens=999)

    async def fault(seq: int, body: dict[str, Any]) -> web.StreamResponse | None:
        if body["max_tokens"] == 999:
            return web.json_response({"error": {"message": "too long"}}, status=400)
        if seq == 0:
            return web.json_response({"error": {"message": "overloaded"}}, status=500)
        if seq == 1:
            return web.json_response({"id": "x", "choices": []})  # malformed
        return None

    path = tmp_path / "cache.sqlite"
    stats = RequestStats()
    async with running_simulator(SimulatorConfig(fault=fault)) as sim:
        with ResponseCache.open(path) as cache:
            async with teacher_for(sim.base_url, stats, cache) as teacher:
                first = await teacher.complete(REQUEST)
                assert sim.state.total_requests == stats.requests_sent == 3
                with pytest.raises(RequestRejected):
                    await teacher.complete(rejected)
                assert stats.requests_sent == 4
                again = await teacher.complete(REQUEST)
                with pytest.raises(RequestRejected):
                    await teacher.complete(rejected)
            assert sim.state.total_requests == stats.requests_sent == 5
    assert again == first
    assert stats.cache_hits == 1
    assert stored_count(path) == 1
    with ResponseCache.open(path) as cache:
        stored = cache.get(key_of(REQUEST, "sim-teacher"))
    assert stored is not None and len(orjson.loads(stored)["choices"]) == 2


async def test_a_hit_sends_nothing_and_is_shared_across_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    async with running_simulator() as sim:
        with ResponseCache.open(path) as cache:
            async with teacher_for(sim.base_url, RequestStats(), cache) as teacher:
                first = await teacher.complete(REQUEST)
    stats = RequestStats()
    # Another replica (here: nothing listens at all) with the same model.
    with ResponseCache.open(path) as cache:
        async with teacher_for("http://127.0.0.1:9/v1", stats, cache, attempts=1) as teacher:
            assert await teacher.complete(REQUEST) == first
            with pytest.raises(RetriesExhausted):
                await teacher.complete(dataclasses.replace(REQUEST, n=3))
    assert (stats.cache_hits, stats.requests_sent) == (1, 1)
    assert (stats.prompt_tokens, stats.completion_tokens) == (0, 0)


# --- whole runs ----------------------------------------------------------------------------


def records(out: Path, gen_type: str) -> list[dict[str, Any]]:
    return sorted(read_gen(out, gen_type), key=lambda r: str(r["id"]))


async def test_a_repeated_run_is_answered_from_the_cache(tmp_path: Path) -> None:
    shared = f'output.cache="{tmp_path / "shared.sqlite"}"'
    first, second = tmp_path / "first", tmp_path / "second"
    async with running_simulator() as sim:
        await run_job(config_for(sim.base_url, first, shared), Stats(), preflight=False)
        assert sim.state.total_requests == TOTAL
        stats = Stats()
        # One request a minute: anything that waited for the limiter would take hours.
        slow = config_for(
            sim.base_url, second, shared, "limits.requests_per_minute=1", "limits.max_concurrency=1"
        )
        async with asyncio.timeout(10):
            await run_job(slow, stats, preflight=False)
        assert sim.state.total_requests == TOTAL
    assert (stats.teacher.requests_sent, stats.teacher.cache_hits) == (0, TOTAL)
    assert "from cache" in stats.summary()
    assert_complete_output(second)
    for gen_type in EXPECTED_PER_DOC:
        assert records(second, gen_type) == records(first, gen_type)
    assert not (first / "cache.sqlite").exists()


async def test_the_default_cache_lives_in_the_output_directory(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    config = config_for(sim.base_url, tmp_path)
    await run_job(config, Stats(), preflight=False)
    (tmp_path / "progress.jsonl").unlink()  # forget the units, keep the cache
    for gen in tmp_path.glob("*/gen.jsonl"):
        gen.unlink()
    stats = Stats()
    await run_job(config, stats, preflight=False)
    assert sim.state.total_requests == TOTAL
    assert stored_count(tmp_path / "cache.sqlite") == TOTAL
    assert (stats.teacher.requests_sent, stats.teacher.cache_hits) == (0, TOTAL)
    assert_complete_output(tmp_path)


async def test_without_the_cache_every_request_is_sent_again(tmp_path: Path) -> None:
    shared = tmp_path / "shared.sqlite"
    async with running_simulator() as sim:
        await run_job(
            config_for(sim.base_url, tmp_path / "a", f'output.cache="{shared}"'),
            Stats(),
            preflight=False,
        )
        stats = Stats()
        config = config_for(sim.base_url, tmp_path / "b", f'output.cache="{shared}"')
        await run_job(config, stats, cache=False, preflight=False)
        assert sim.state.total_requests == 2 * TOTAL
    assert (stats.teacher.requests_sent, stats.teacher.cache_hits) == (TOTAL, 0)
    assert_complete_output(tmp_path / "b")


async def test_cli_no_cache_flag(tmp_path: Path) -> None:
    shared = tmp_path / "shared.sqlite"
    async with running_simulator() as sim:
        await run_job(
            config_for(sim.base_url, tmp_path / "a", f'output.cache="{shared}"'),
            Stats(),
            preflight=False,
        )
        before = shared.stat().st_mtime_ns, stored_count(shared)
        sets = set_args(*SMALL, f'output.dir="{tmp_path / "b"}"', f'output.cache="{shared}"')
        code, output = await engine_cli(
            "run", DEFAULT_TOML, "--no-cache", "--no-preflight", *sets,
            env=teacher_env(sim.base_url),
        )  # fmt: skip
        assert code == 0, output
        assert sim.state.total_requests == 2 * TOTAL
    assert (shared.stat().st_mtime_ns, stored_count(shared)) == before
    assert "from cache 0" in output
    assert_complete_output(tmp_path / "b")


def used_bytes(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        pages, free, size = (
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_count", "freelist_count", "page_size")
        )
    conn.close()
    return int((pages - free) * size)


async def test_the_report_gives_the_cache_size_bound_and_evictions(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    out = tmp_path / "out"
    sets = set_args(*SMALL, f'output.dir="{out}"', "output.cache_max_gb=0.00003")
    code, output = await engine_cli(
        "run", DEFAULT_TOML, "--no-preflight", *sets, env=teacher_env(sim.base_url)
    )
    assert code == 0, output
    cache = orjson.loads((out / "run_report.json").read_bytes())["cache"]
    path = out / "cache.sqlite"
    assert cache["path"] == str(path.resolve())
    assert cache["max_bytes"] == 30_000
    assert cache["size_bytes"] == used_bytes(path) <= 30_000
    assert cache["stored"] == TOTAL
    assert cache["evicted"] == TOTAL - stored_count(path) > 0
    assert f"response cache: {cache['size_bytes'] / 1e6:.1f} MB of 3e-05 GB" in output
    assert_complete_output(out)


async def test_the_lookups_of_one_pass_go_to_the_thread_as_one_query(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache.open(path, batch_size=1) as cache:
        for i in range(0, 600, 2):  # more keys than one query of the batch takes
            cache.put(b"k%d" % i, b"v%d" % i)
        await cache.drain()
        keys = [b"k%d" % i for i in range(600)] + [b"k0", b"k1"]  # repeats too
        got = await asyncio.gather(*(cache.lookup(key) for key in keys))
        assert cache.read_batches == 1
        assert got == [b"v%d" % i if i % 2 == 0 else None for i in range(600)] + [b"v0", None]
        assert (cache.hits, cache.misses) == (301, 301)


async def test_a_cancelled_lookup_leaves_the_rest_of_its_batch_answered(tmp_path: Path) -> None:
    with ResponseCache.open(tmp_path / "cache.sqlite", batch_size=1) as cache:
        cache.put(b"a", b"1")
        cache.put(b"b", b"2")
        await cache.drain()
        first = asyncio.create_task(cache.lookup(b"a"))
        second = asyncio.create_task(cache.lookup(b"b"))
        await asyncio.sleep(0)  # both are waiting for their batch
        first.cancel()
        assert await second == b"2"
        assert first.cancelled()


async def test_a_lookup_whose_batch_meets_a_closed_cache_misses(tmp_path: Path) -> None:
    cache = ResponseCache.open(tmp_path / "cache.sqlite", batch_size=1)
    cache.put(b"a", b"1")
    lookup = asyncio.create_task(cache.lookup(b"a"))
    await asyncio.sleep(0)  # waiting for its batch, which is not sent yet
    cache.close()
    assert await lookup is None
