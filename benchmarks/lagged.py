"""``python -m engine`` with an event-loop lag probe, for the benchmarks.

    python -m benchmarks.lagged run CONFIG [--set ...]   (same arguments as python -m engine)

The probe is a task on the run's own event loop: a timer that asks to wake every 10 ms and
measures how late it wakes. Anything that holds the loop (a file read, a database query, a
long loop without an await) shows as lateness. At the end it writes, as JSON, to the file
named by ``ENGINE_LAG_FILE``: the largest lag seen, the 99th percentile, the number of samples
and when the largest happened (seconds after the probe started).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

import engine.cli as cli

INTERVAL_S = 0.01


class LagProbe:
    """Wakes every ``interval`` seconds on the running loop and records how late it woke."""

    def __init__(self, interval: float = INTERVAL_S) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self.worst = 0.0
        self.worst_at = 0.0
        self.started = time.monotonic()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.interval)
            lag = loop.time() - asked - self.interval
            self.lags.append(lag)
            if lag > self.worst:
                self.worst, self.worst_at = lag, time.monotonic() - self.started

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.lags)
        p99 = ordered[int(len(ordered) * 0.99)] if ordered else 0.0
        return {
            "max_lag_s": round(self.worst, 4),
            "p99_lag_s": round(p99, 4),
            "samples": len(ordered),
            "worst_at_s": round(self.worst_at, 2),
            "probe_started": self.started,
        }


def main() -> int:
    target = os.environ.get("ENGINE_LAG_FILE", "")
    real = cli.run_job

    async def probed(*args: Any, **options: Any) -> Any:
        probe = LagProbe()
        task = asyncio.create_task(probe.run())
        try:
            return await real(*args, **options)
        finally:
            task.cancel()
            if target:  # the run is over: nothing else is on the loop
                Path(target).write_bytes(orjson.dumps(probe.summary()))  # noqa: ASYNC240

    cli.run_job = probed  # type: ignore[assignment]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
