"""Ray itself: the cluster a run joins or starts, the limiter and worker actors, and Ray's
errors turned into the engine's. The only module of the engine that imports ray.

- The limiter actor holds the run's ``QuotaLedger``. It is named (``engine-limiter-<run>`` in
  the ``engine`` namespace, so workers restarted by Ray find it again by name), pinned to
  the driver's node (it lives and dies with the run) and reserves no CPU.
- Worker actors (``UnitWorker``), ``ray.workers`` of them or one per node that has
  ``ray.worker_cpus`` CPUs, each placed on its node by a soft node affinity: Ray restarts one
  that dies (``max_restarts=-1``), on another node if its own is gone. Their calls are not
  retried by Ray (``max_task_retries=0``): a unit in flight on a worker that dies comes back to
  the driver as ``WorkerLost`` and is sent to another worker (``engine.distributed.dispatch``).
- A Ray started for the run (no ``ray.address``, no ``RAY_ADDRESS``) listens on 127.0.0.1
  only, without dashboard or usage reporting, inherits the driver's environment (the API key
  included: process inheritance, not Ray's runtime_env) and is shut down with the run; a
  ``kill -9`` of the driver takes it down too (Ray's reaper process, given a stdin that
  lasts as long as the driver: ``_lifeline_as_stdin``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine.config import Config
from engine.distributed.dispatch import RemoteFatal, WorkerLost
from engine.distributed.quota import Grant, Outcomes, QuotaLedger
from engine.distributed.worker import UnitReply, UnitWorker, WorkerInfo, WorkerSettings
from engine.errors import ConfigError, FatalRunError
from engine.seeds import SeedRow

log = logging.getLogger(__name__)

NAMESPACE = "engine"
# How long the end of a run waits for the actors' last state.
FINAL_STATE_S = 10.0
# Joining a cluster or starting one here (a local start takes about 4 s on two cores).
CONNECT_TIMEOUT_S = 120.0
# How long the end of a run waits for Ray to shut down.
STOP_WAIT_S = 60.0
# A ray.address that does not accept a TCP connection within this is refused at once.
REACH_TIMEOUT_S = 5.0
# How often a worker that Ray is restarting is asked whether it is up again.
REVIVE_POLL_S = 1.0
# ray.nodes, typed: one dict per node ever seen ("NodeID", "Alive", "Resources"...).
_nodes: Callable[[], list[dict[str, Any]]] = ray.nodes
# Ray's errors that mean the worker (or its node, or the object it returned) is gone.
_LOST = (RayActorError, ActorUnavailableError, ObjectLostError)


class LimiterActor:
    """The run's ``QuotaLedger`` as an actor (one per run)."""

    def __init__(
        self, requests_per_minute: int, max_concurrency: int, tokens_per_minute: int, workers: int
    ) -> None:
        self.ledger = QuotaLedger(
            requests_per_minute, max_concurrency, tokens_per_minute, workers=workers
        )

    async def lease(self, worker: int, requests: int, tokens: int, outcomes: Outcomes) -> Grant:
        """``QuotaLedger.lease``."""
        return await self.ledger.lease(worker, requests, tokens, outcomes)

    async def state(self) -> dict[str, Any]:
        """The ledger's concurrency and totals, for the run report."""
        ledger = self.ledger
        return {
            "concurrency": ledger.adaptive.limit,
            "concurrency_cuts": ledger.adaptive.decreases,
            "leases": ledger.totals.leases,
            "granted_requests": ledger.totals.requests,
            "granted_by_worker": {str(w): n for w, n in sorted(ledger.totals.by_worker.items())},
        }


class WorkerActor(UnitWorker):
    """A ``UnitWorker`` whose lease calls go to the limiter actor named ``limiter``."""

    def __init__(self, settings: WorkerSettings, limiter: str) -> None:
        super().__init__(settings, self._lease_remote)
        self._limiter_name = limiter
        self._limiter: Any = None

    def node(self) -> str:
        """The Ray node id of this actor."""
        return str(ray.get_runtime_context().get_node_id())

    async def _lease_remote(self, requests: int, tokens: int, outcomes: Outcomes) -> Grant:
        if self._limiter is None:
            self._limiter = ray.get_actor(self._limiter_name, namespace=NAMESPACE)
        grant: Grant = await self._limiter.lease.remote(
            self.settings.index, requests, tokens, outcomes
        )
        return grant


@dataclass
class RayWorker:
    """The driver's handle on one worker actor (``engine.distributed.dispatch.WorkerHandle``)."""

    index: int
    actor: Any

    async def ready(self) -> WorkerInfo:
        """The worker's ``ready`` once it is up, again if Ray is restarting it; ``WorkerLost``
        once it is dead for good (restarts used up, killed, its constructor failed);
        ``RemoteFatal`` with the worker's own message when it cannot work.

        A call to an actor that Ray is restarting fails at once with ``ActorUnavailableError``
        ("The actor is restarting") rather than waiting, so it is asked again every
        ``REVIVE_POLL_S``, for as long as the run lasts (the dispatch stops waiting for it
        at the end, and stops the run when no worker at all came back in time)."""
        while True:
            try:
                info: WorkerInfo = await self.actor.ready.remote()
            except ActorUnavailableError:
                await asyncio.sleep(REVIVE_POLL_S)
                continue
            except _LOST as err:
                raise WorkerLost(_first_line(err)) from None
            except RayTaskError as err:
                # The worker cannot work (no key on its node...): its own message, without
                # the remote traceback Ray wraps it in.
                if isinstance(err.cause, FatalRunError):
                    raise RemoteFatal(str(err.cause)) from None
                raise
            return info

    async def run_unit(self, seed: SeedRow, gen_type: str) -> UnitReply:
        """The worker's ``run_unit``; Ray's loss errors as ``WorkerLost``."""
        try:
            reply: UnitReply = await self.actor.run_unit.remote(seed, gen_type)
        except _LOST as err:
            raise WorkerLost(_first_line(err)) from None
        return reply

    async def close(self) -> dict[str, dict[str, int]]:
        """The worker's ``close`` (its endpoints' summary); {} when it is gone."""
        try:
            summary: dict[str, dict[str, int]] = await self.actor.close.remote()
        except _LOST:
            return {}
        return summary


@dataclass
class Cluster:
    """The Ray session of one run: the limiter, the workers, whether Ray was started here."""

    limiter: Any
    workers: list[RayWorker]
    started_here: bool
    run_id: str

    async def final_state(self) -> dict[str, Any]:
        """At the end of the run: the limiter actor's ``state`` (``"limiter"``) and the
        endpoints as the workers used them (``"by_endpoint"``: requests and outages summed,
        down if any worker found it down), after each worker reported its last outcomes and
        closed its client; what cannot be reached within ``FINAL_STATE_S`` is left out."""
        found: dict[str, Any] = {"limiter": {}, "by_endpoint": {}}
        try:
            async with asyncio.timeout(FINAL_STATE_S):
                summaries = await asyncio.gather(*(w.close() for w in self.workers))
                found["limiter"] = await self.limiter.state.remote()
        except (TimeoutError, *_LOST):
            return found
        merged: dict[str, dict[str, int]] = {}
        for summary in summaries:
            for url, counts in summary.items():
                into = merged.setdefault(url, {"requests": 0, "outages": 0, "down": 0})
                into["requests"] += counts["requests"]
                into["outages"] += counts["outages"]
                into["down"] = max(into["down"], counts["down"])
        found["by_endpoint"] = merged
        return found


class _OwnSignals(logging.Filter):
    """Drops Ray's warning that it set no SIGTERM handler: ``connect`` runs in a thread so
    that it does not (its handler would exit at once, where the engine's gives units in
    flight their grace period)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for that one warning."""
        return not record.getMessage().startswith("SIGTERM handler is not set")


def connect(address: str) -> bool:
    """Join the cluster at ``address``, or start a Ray on this machine for the run when it is
    "" (True then). ``ConfigError`` when the cluster cannot be reached. Call it from a
    ``RayHost``'s thread (see there why)."""
    logging.getLogger("ray._private.worker").addFilter(_OwnSignals())
    if address:
        _check_reachable(address)
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        return False
    with _lifeline_as_stdin():
        ray.init(
            namespace=NAMESPACE,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    return True


# The write end of the pipe a Ray started here reads as its parent's life (see below).
_lifeline: list[int] = []


@contextlib.contextmanager
def _lifeline_as_stdin() -> Iterator[None]:
    """Give the Ray started inside the block a stdin that ends only when this process does.

    Where the kernel's parent-death signal is not available, Ray's reaper process takes the
    driver's stdin as its life: at end of input it kills the whole local Ray. A run under
    nohup, systemd, cron or CI has /dev/null there, which ends at once, and the Ray it
    starts would be killed within a second. So fd 0 is, while Ray starts, the
    read end of a pipe whose write end this process keeps open (and never hands to a child):
    the reaper then stops Ray when the driver dies, even by kill -9, and not before.
    """
    read, write = os.pipe()
    saved = os.dup(0)
    try:
        os.dup2(read, 0)
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read)
    _lifeline.append(write)


def _check_reachable(address: str) -> None:
    """``ConfigError`` at once when a host:port ``address`` does not accept a connection:
    ``ray.init`` would retry it for ever."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", ray://...: Ray's own resolution
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(
            [
                f"ray.address: nothing answers at {address} ({err.strerror or err}): is the "
                "head node up, and is this its GCS address (host:6379 by default)?"
            ]
        ) from None


class RayHost:
    """The thread Ray is joined or started from, and shut down from: it lives as long as
    the run's Ray does.

    Why a thread that stays: a Ray started here runs its processes with Linux's parent-death
    signal, which fires when the *thread* that started them ends, not the process: started
    from a passing thread (``asyncio.to_thread``), Ray would be killed as soon as it was up.
    Why a thread at all: ``ray.init`` takes seconds, which the event loop (signals, progress)
    must not wait out, and from the main thread it replaces the engine's SIGTERM handling.
    A daemon thread: a join that hangs never keeps the process from exiting, and whatever
    ends the process (even kill -9) ends the Ray it started.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.cluster: Cluster | None = None
        self._release = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._main, name="ray-host", daemon=True)
        self._started: asyncio.Future[bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> bool:
        """Join (False) or start (True) Ray; ``ConfigError`` when that fails or takes over
        ``CONNECT_TIMEOUT_S`` (Ray is then let go by the thread itself)."""
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_future()
        self._thread.start()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await asyncio.shield(self._started)
        except TimeoutError:
            self._release.set()
            raise ConfigError(
                [f"Ray: could not join or start a cluster within {CONNECT_TIMEOUT_S:g} s"]
            ) from None
        except BaseException:
            self._release.set()
            raise

    def stop(self, cluster: Cluster | None, wait_s: float = STOP_WAIT_S) -> None:
        """Have the thread kill ``cluster``'s actors and shut Ray down; wait for it (not in
        the event loop's executor: it must be done even when the run is cancelled)."""
        self.cluster = cluster
        self._release.set()
        self._stopped.wait(wait_s)

    def _main(self) -> None:
        try:
            started = connect(self.address)
        except BaseException as err:  # handed to the awaiting side, whatever it is
            self._settle(None, err)
            self._stopped.set()
            return
        self._settle(started, None)
        self._release.wait()
        try:
            stop(self.cluster)
        finally:
            self._stopped.set()

    def _settle(self, started: bool | None, err: BaseException | None) -> None:
        def settle() -> None:
            future = self._started
            if future is None or future.done():
                return
            if err is not None:
                future.set_exception(err)
            else:
                future.set_result(bool(started))

        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(settle)


def start_actors(config: Config, settings: Sequence[WorkerSettings], run_id: str) -> Cluster:
    """The limiter on this node and one worker actor per ``settings``, spread over the nodes
    that can host one."""
    here = ray.get_runtime_context().get_node_id()
    limits = config.limits
    name = f"engine-limiter-{run_id}"
    limiter = (
        ray.remote(LimiterActor)
        .options(
            name=name,
            namespace=NAMESPACE,
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote(
            limits.requests_per_minute,
            limits.max_concurrency,
            limits.tokens_per_minute,
            len(settings),
        )
    )
    nodes = worker_nodes(config.ray.worker_cpus) or [here]
    workers = []
    for s in settings:
        node = nodes[s.index % len(nodes)]
        actor = (
            ray.remote(WorkerActor)
            .options(
                name=f"engine-worker-{run_id}-{s.index}",
                namespace=NAMESPACE,
                num_cpus=config.ray.worker_cpus,
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=10_000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
            )
            .remote(s, name)
        )
        workers.append(RayWorker(s.index, actor))
    return Cluster(limiter, workers, started_here=False, run_id=run_id)


def worker_nodes(cpus: float) -> list[str]:
    """The ids of the live nodes with at least ``cpus`` CPUs, in Ray's order."""
    return [
        node["NodeID"]
        for node in _nodes()
        if node["Alive"] and node["Resources"].get("CPU", 0) >= max(cpus, 1e-9)
    ]


def stop(cluster: Cluster | None) -> None:
    """Kill the run's actors; shut Ray down (a Ray started for the run stops with it)."""
    if cluster is not None:
        for worker in cluster.workers:
            ray.kill(worker.actor, no_restart=True)
        ray.kill(cluster.limiter, no_restart=True)
    ray.shutdown()
    while _lifeline:
        os.close(_lifeline.pop())


@asynccontextmanager
async def session(config: Config, address: str, settings_of: Any) -> AsyncIterator[Cluster]:
    """Join or start Ray (off the event loop: starting takes seconds), start the actors,
    and tear them down however the block ends. ``settings_of(workers)`` gives the workers'
    settings once the number of workers is known."""
    host = RayHost(address)
    started = await host.start()
    cluster: Cluster | None = None
    try:
        count = config.ray.workers or len(worker_nodes(config.ray.worker_cpus)) or 1
        run_id = uuid.uuid4().hex[:8]
        cluster = start_actors(config, settings_of(count), run_id)
        cluster.started_here = started
        log.info(
            "Ray: %s, run %s: %d workers, limiter %s",
            "started on 127.0.0.1 for this run" if started else f"joined {address}",
            run_id,
            count,
            f"engine-limiter-{run_id}",
        )
        yield cluster
    finally:
        # Blocking: however the run ends, even cancelled, Ray is down before it does.
        host.stop(cluster)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
