"""The event loop's passes, counted for tests of what runs in which pass."""

from __future__ import annotations

import asyncio


class Passes:
    """Counts passes of the running loop: one ``sleep(0)`` each."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Passes:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.count += 1
