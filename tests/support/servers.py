"""Small local HTTP servers that misbehave like real ones, for the tests that need them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


@asynccontextmanager
async def redirecting_to(target: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A server that answers every request with a 301 to the same path under ``target``,
    like a load balancer moved to a new host; yields its base URL and the requests it saw."""
    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(status=301, headers={"Location": target + request.path[3:]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", seen
    finally:
        await runner.cleanup()
