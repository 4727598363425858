"""Small local HTTP servers that misbehave like real ones, for the tests that need them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """A server on a free port of 127.0.0.1 that answers every method and path with
    ``handler``; yields its base URL (``http://127.0.0.1:PORT/v1``), stopped on exit."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def redirecting_to(target: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A server that answers every request with a 301 to the same path under ``target``,
    like a load balancer moved to a new host; yields its base URL and the requests it saw."""
    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(status=301, headers={"Location": target + request.path[3:]})

    async with serving(moved) as base_url:
        yield base_url, seen
