"""A small HTTP forward proxy for tests, on 127.0.0.1: absolute-URI requests and CONNECT.

``ForwardProxy(hosts)`` resolves host names only through ``hosts`` (name -> address), so a
teacher URL on such a name is reachable through the proxy and through nothing else: a test
that passes cannot have gone around it. With ``credentials`` ("user:password") it answers
407 to requests without the matching ``Proxy-Authorization``; hosts in ``deny`` get 403.
``seen`` records each request line, and whether it carried proxy credentials.

Plain HTTP requests are forwarded one per connection (``Connection: close`` both ways); a
CONNECT tunnel copies bytes both ways until either side closes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-connection"}
_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class ProxySeen:
    method: str
    target: str  # "host:port" for CONNECT, the absolute URI otherwise
    authenticated: bool  # carried Proxy-Authorization
    authorization: str | None  # the Authorization header it could read (plain HTTP only)


class ForwardProxy:
    """Use as ``async with ForwardProxy({...}) as proxy:``; ``proxy.url`` is its address."""

    def __init__(
        self,
        hosts: Mapping[str, str],
        *,
        credentials: str | None = None,
        deny: Iterable[str] = (),
    ) -> None:
        self.hosts = dict(hosts)
        self.credentials = credentials
        self.deny = set(deny)
        self.seen: list[ProxySeen] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, credentials: str) -> str:
        return f"http://{credentials}@127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *lines = head[:-4].split("\r\n")
        method, target, version = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        login = headers.get("proxy-authorization")
        self.seen.append(ProxySeen(method, target, login is not None, headers.get("authorization")))
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if login != expected:
                await _answer(writer, 407, "Proxy Authentication Required", 'Basic realm="t"')
                return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
        else:
            parts = urlsplit(target)
            host, port = parts.hostname or "", str(parts.port or 80)
        if host in self.deny:
            await _answer(writer, 403, "Forbidden")
            return
        address = self.hosts.get(host)
        if address is None:
            await _answer(writer, 502, "Bad Gateway")  # this proxy resolves nothing else
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(address, int(port))
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await asyncio.gather(_copy(reader, upstream_writer), _copy(upstream_reader, writer))
            else:
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await _forward(
                    method, target, version, lines, body, upstream_reader, upstream_writer, writer
                )
        finally:
            upstream_writer.close()
            with contextlib.suppress(ConnectionError):
                await upstream_writer.wait_closed()

    def __repr__(self) -> str:
        return f"<ForwardProxy {self.url} hosts={sorted(self.hosts)} seen={len(self.seen)}>"


async def _forward(
    method: str,
    target: str,
    version: str,
    lines: list[str],
    body: bytes,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
    client: asyncio.StreamWriter,
) -> None:
    """One absolute-URI request sent on in origin form, its whole response sent back."""
    parts = urlsplit(target)
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    kept = [line for line in lines if line.partition(":")[0].strip().lower() not in _HOP_BY_HOP]
    head = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""])
    upstream_writer.write(head.encode("latin-1") + body)
    await upstream_writer.drain()
    response = await upstream_reader.read()  # to the end: the upstream closes after it
    status_and_headers, _, rest = response.partition(b"\r\n\r\n")
    status_line, *response_lines = status_and_headers.decode("latin-1").split("\r\n")
    kept = [
        line for line in response_lines if line.partition(":")[0].strip().lower() != "connection"
    ]
    out = "\r\n".join([status_line, *kept, "Connection: close", "", ""])
    client.write(out.encode("latin-1") + rest)
    await client.drain()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(_CHUNK):
            sink.write(chunk)
            await sink.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            sink.write_eof()


async def _answer(
    writer: asyncio.StreamWriter, status: int, reason: str, authenticate: str | None = None
) -> None:
    extra = f"Proxy-Authenticate: {authenticate}\r\n" if authenticate else ""
    head = f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    writer.write(head.encode())
    await writer.drain()
