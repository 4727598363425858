"""The seam between the pipeline and Ray: ``remote_units`` gives the scheduler one
``RemoteFlow`` per type, run by worker actors, in place of the flows themselves.

Importing this module does not import ray; entering ``remote_units`` does (after setting,
for a Ray started for the run, what Ray reads when it is imported), and says what to install
when ray is missing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from engine.config import Config
from engine.distributed.dispatch import RemoteUnits
from engine.distributed.quota import QuotaLedger
from engine.distributed.worker import WorkerSettings, settings_for
from engine.errors import ConfigError
from engine.pipeline.stats import Stats
from engine.teacher.protocol import Wire

log = logging.getLogger(__name__)

# Read by ray when it is imported. 0: a Ray started here keeps 127.0.0.1 as its address
# (with 1, Ray swaps a loopback address for the machine's own, and listens there).
_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def cluster_address(config: Config) -> str:
    """The cluster a run joins: ``ray.address``, else ``RAY_ADDRESS``; "" = start one here."""
    return config.ray.address or os.environ.get("RAY_ADDRESS", "")


@asynccontextmanager
async def remote_units(
    config: Config, stats: Stats, wire: Wire, cache: Path | None
) -> AsyncIterator[RemoteUnits]:
    """Join or start Ray, start the limiter and worker actors, and yield the ``RemoteUnits``
    that runs units on them (``flows(types)`` gives the scheduler its runners; it is also
    what the progress display reads requests in flight from); everything is stopped when
    the block ends.

    ``wire`` is how requests are written for this server (the preflight's finding);
    ``cache`` the run's response cache file (None: no cache). Raises ``ConfigError`` when
    ray is not installed or the cluster cannot be joined; the run report gets
    ``stats.distributed``.
    """
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            ['run.backend = "ray" needs Ray: pip install -e ".[ray]" (or pip install ray)']
        )
    address = cluster_address(config)
    if address and (local := [u for u in config.teacher.urls if _loopback(u)]):
        log.warning(
            "teacher %s is a loopback address: workers on other machines than their own "
            "teacher cannot reach it",
            ", ".join(local),
        )
    if not address:
        for name, value in _LOOPBACK_ONLY.items():
            os.environ.setdefault(name, value)
    from engine.distributed import ray_backend

    probe = QuotaLedger(
        config.limits.requests_per_minute,
        config.limits.max_concurrency,
        config.limits.tokens_per_minute,
    )
    slices = (probe.slice_requests, probe.slice_tokens)

    def settings_of(count: int) -> list[WorkerSettings]:
        return [
            settings_for(config, wire, i, count, slices=slices, cache=cache) for i in range(count)
        ]

    async with ray_backend.session(config, address, settings_of) as cluster:
        units = RemoteUnits(cluster.workers, stats, lost_max_s=config.ray.lost_workers_max_s)
        try:
            async with units:
                yield units
        finally:
            stats.distributed = {
                "backend": "ray",
                "cluster": "started for the run" if cluster.started_here else address,
                **units.summary(),
                **await cluster.final_state(),
            }


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"
