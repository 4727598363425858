"""The HTTP exchange with the teacher: the ``Transport`` interface and its aiohttp implementation.

The only module that imports aiohttp. A transport sends one request and returns what came
back (status, headers, raw body) whatever the status; it never retries, parses or follows a
redirect. What failed on the way is raised as the engine error that says what to change
(``engine.teacher.network`` words them): aiohttp's exceptions end here.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from engine.config import TeacherConfig
from engine.errors import (
    ConfigError,
    EngineError,
    TeacherConnectionError,
    TeacherConnectTimeout,
    TeacherTimeout,
)
from engine.teacher.network import (
    Proxies,
    Proxy,
    cert_env_problems,
    dns_failure,
    proxy_failure,
    tls_context,
    tls_failure,
)

# Connections beyond the concurrency cap, so a connection being closed never blocks a new one.
SPARE_CONNECTIONS = 8


@dataclass(frozen=True, slots=True)
class Response:
    """What one request got back: the HTTP ``status``, the ``headers`` (case-insensitive
    when the transport's are) and the whole ``body``, undecoded."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """Sends HTTP requests to the teacher. ``HTTPTeacher`` uses one for all its requests and
    closes it when it closes; tests use a fake (``tests.support.fakes.FakeTransport``)."""

    async def send(self, method: str, url: str, body: bytes | None) -> Response:
        """Send ``method url`` with ``body`` (JSON bytes, or None for no body); the answer,
        whatever its status. Raises ``TeacherTimeout`` or ``TeacherConnectionError`` (and
        its ``TeacherDNSError``) when there was no answer and another try may get one;
        ``TLSVerificationError``, ``ProxyRefused`` or ``ConfigError`` when no request could
        ever get through as configured."""
        ...

    async def close(self) -> None:
        """Release the connections; a later ``send`` opens new ones."""
        ...


class AiohttpTransport:
    """``Transport`` over one ``aiohttp.ClientSession``, opened at the first ``send``.

    Sends the key as ``Authorization: Bearer`` (when ``teacher.api_key`` is set) or the
    credentials of an endpoint's URL as HTTP Basic authentication, each
    request through the proxy ``proxies`` decides for its URL, with the CAs
    ``teacher.ca_bundle`` and the environment trust. Up to ``max_concurrency`` +
    ``SPARE_CONNECTIONS`` connections (aiohttp's default of 100 would silently cap a larger
    ``limits.max_concurrency``); ``teacher.timeout_s`` for a whole exchange and
    ``teacher.connect_timeout_s`` to connect (seconds). Redirects are never followed: a POST
    re-sent as a GET would be answered 405 and hide the cause.

    Raises ``ConfigError`` when TLS is used and ``SSL_CERT_FILE``/``SSL_CERT_DIR`` name
    nothing (OpenSSL would ignore them and every handshake would fail verification), or when
    ``teacher.ca_bundle`` cannot be loaded.
    """

    def __init__(self, teacher: TeacherConfig, proxies: Proxies, *, max_concurrency: int) -> None:
        self._teacher = teacher
        self._proxies = proxies
        self._connections = max_concurrency + SPARE_CONNECTIONS
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if teacher.api_key is not None:
            self._headers["Authorization"] = f"Bearer {teacher.api_key.get_secret_value()}"
        # Credentials given in an endpoint URL, by origin (the config refuses them with a key).
        self._basic_auth = {
            origin: aiohttp.BasicAuth(user, password)
            for origin, (user, password) in teacher.url_credentials.items()
        }
        self._tls = self._tls_context()
        self.session: aiohttp.ClientSession | None = None

    def _tls_context(self) -> ssl.SSLContext:
        tls_used = any(url.startswith("https:") for url in self._teacher.urls) or any(
            proxy.url.startswith("https:") for proxy in self._proxies.in_use
        )
        if tls_used and (problems := cert_env_problems()):
            raise ConfigError(problems)
        return tls_context(self._teacher.ca_bundle)

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0, ssl=self._tls)
        timeout = aiohttp.ClientTimeout(
            total=self._teacher.timeout_s, sock_connect=self._teacher.connect_timeout_s
        )
        # trust_env stays off: proxies are chosen per request (engine.teacher.network), and
        # aiohttp's trust_env would also read ~/.netrc and clash with our Authorization header.
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=self._headers, trust_env=False
        )
        return self.session

    async def send(self, method: str, url: str, body: bytes | None) -> Response:
        """See ``Transport.send``."""
        session = self.session if self.session is not None else self._open()
        proxy = self._proxies.for_url(url)
        try:
            async with session.request(
                method,
                url,
                data=body,
                allow_redirects=False,
                proxy=None if proxy is None else proxy.url,
                auth=self._basic_auth.get("/".join(url.split("/", 3)[:3])),
            ) as response:
                return Response(response.status, response.headers, await response.read())
        # ServerTimeoutError is also a ClientConnectionError: catch timeouts first.
        except aiohttp.ConnectionTimeoutError as err:
            raise TeacherConnectTimeout(
                f"no connection to {url} within teacher.connect_timeout_s = "
                f"{self._teacher.connect_timeout_s:g} s"
            ) from err
        except TimeoutError as err:
            raise TeacherTimeout(
                f"no reply from {url} within teacher.timeout_s = {self._teacher.timeout_s:g} s"
            ) from err
        except aiohttp.InvalidURL as err:
            raise ConfigError([f"teacher.base_url is not a usable URL: {err}"]) from err
        except aiohttp.ClientError as err:
            raise self._connection_failure(url, proxy, err) from err

    async def close(self) -> None:
        """See ``Transport.close``."""
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()

    def _connection_failure(
        self, url: str, proxy: Proxy | None, err: aiohttp.ClientError
    ) -> EngineError:
        """What a failed connection means, as the engine error that says what to change."""
        if isinstance(err, aiohttp.ClientConnectorCertificateError):
            cause = err.certificate_error
            return tls_failure(
                f"{err.host}:{err.port}",
                getattr(cause, "verify_message", None) or str(cause),
                getattr(cause, "verify_code", None),
                ca_bundle=self._teacher.ca_bundle,
                proxy=proxy if proxy is not None and proxy.host == err.host else None,
            )
        if isinstance(err, aiohttp.ClientConnectorDNSError):
            return dns_failure(url, err.host, proxy)
        if isinstance(err, aiohttp.ClientHttpProxyError) and proxy is not None:
            return proxy_failure(url, proxy, err.status, err.message)
        if isinstance(err, aiohttp.ClientProxyConnectionError) and proxy is not None:
            return TeacherConnectionError(
                f"cannot connect to the proxy {proxy.public} (from {proxy.variable}) for "
                f"{url}: {err.os_error.strerror or err.os_error}"
            )
        if isinstance(err, aiohttp.ClientConnectorSSLError):
            return TeacherConnectionError(
                f"TLS handshake with {err.host}:{err.port} failed for {url}: {err.os_error} "
                "(an https:// URL on a plain-HTTP port fails like this)"
            )
        return TeacherConnectionError(f"connection to {url} failed: {type(err).__name__}: {err}")

    def __repr__(self) -> str:
        state = "open" if self.session is not None else "closed"
        return f"<AiohttpTransport {state} connections={self._connections} {self._proxies!r}>"
