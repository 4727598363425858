"""How the teacher is reached: the proxy for each URL, the certificate authorities trusted,
and what a failure to get through means.

Decisions and messages only, from the environment and ``teacher.ca_bundle``; the transport
(``engine.teacher.transport``) applies them and stays the only module that speaks aiohttp.

**Proxies**, read as curl and the OpenAI SDK read them: ``HTTPS_PROXY`` for https:// URLs,
``HTTP_PROXY`` for http:// ones, ``ALL_PROXY`` for either when the specific one is unset; the
lowercase spelling wins over the uppercase one, an empty value counts as unset, and a value
without a scheme means http://. An https:// URL goes through the proxy in a CONNECT tunnel,
so the proxy never sees the request or the key; an http:// URL is sent to the proxy whole.
``NO_PROXY`` lists what is reached directly, separated by commas or spaces: ``*`` (everything),
host names (the name and its subdomains; a leading dot or ``*.`` changes nothing), IP
addresses and CIDR blocks (``10.0.0.0/8``), each optionally with ``:port``. Loopback hosts
(``localhost``, ``127.0.0.0/8``, ``::1``) are never proxied, as in Go's net/http and Chrome:
a proxy cannot reach this machine's loopback, and the embedded demo teacher and local
servers must keep working under a machine-wide proxy (curl, unlike them, would send them to
the proxy).

``~/.netrc`` is deliberately not read. aiohttp reads it when a session trusts the environment:
it would send the file's login for the teacher's host as Basic auth (when no key is set), or
fail every request with "Cannot combine AUTHORIZATION header with AUTH argument" (when one
is). The OpenAI SDK does not read it either.

**Certificates**: the system's trusted CAs, as OpenSSL finds them (``SSL_CERT_FILE`` and
``SSL_CERT_DIR`` replace its default file and directory, as usual), plus ``teacher.ca_bundle``
(PEM) when set: a private CA is added to the public ones, so replicas behind public and
private certificates can be mixed.

**Failures**: a certificate that fails verification (``TLSVerificationError``) and a proxy
that refuses us (``ProxyRefused``: 407 credentials, 403 policy) stop the run, since every
request would meet them; a name that does not resolve (``TeacherDNSError``) is retried like
an outage, with a message that names the host and the proxy variables that decide it.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from engine.config.certificates import ca_bundle_problem
from engine.errors import (
    ConfigError,
    EngineError,
    ProxyRefused,
    TeacherConnectionError,
    TeacherDNSError,
    TLSVerificationError,
)

_PROXY_SCHEMES = ("http", "https")
_LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost")
CERT_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR")
# OpenSSL's X509_V_ERR_ codes: HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH; CERT_NOT_YET_VALID,
# CERT_HAS_EXPIRED.
_NAME_MISMATCH = frozenset({62, 64})
_EXPIRED = frozenset({9, 10})


@dataclass(frozen=True, slots=True)
class Proxy:
    """The proxy one URL goes through. ``url`` may hold credentials: show ``public``."""

    url: str
    variable: str  # where it came from, e.g. "HTTPS_PROXY" (or "https_proxy")

    @property
    def public(self) -> str:
        """The proxy without its credentials, for messages."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        return f"{parts.scheme}://{host}{port}"

    @property
    def host(self) -> str:
        """The proxy's host name or address, lowercase ("" if the URL has none)."""
        return urlsplit(self.url).hostname or ""

    def __repr__(self) -> str:
        return f"<Proxy {self.public} from {self.variable}>"


def proxy_for(url: str, environ: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy for ``url`` per the environment (default ``os.environ``); None: direct.

    Raises ``ConfigError`` when the proxy set for it is not an http:// or https:// one.
    """
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if not host or _is_loopback(host) or _bypassed(host, _port(url), _variable(env, "no_proxy")):
        return None
    for name in (f"{scheme}_proxy", "all_proxy"):
        found = _variable(env, name)
        if found is not None:
            variable, value = found
            return _proxy(value, variable)
    return None


def proxies_for(urls: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, Proxy]:
    """The proxied ones among ``urls``, with their proxy; ``ConfigError`` listing every
    unusable proxy setting."""
    found: dict[str, Proxy] = {}
    problems: list[str] = []
    for url in urls:
        try:
            proxy = proxy_for(url, environ)
        except ConfigError as err:
            problems.extend(p for p in err.problems if p not in problems)
            continue
        if proxy is not None:
            found[url] = proxy
    if problems:
        raise ConfigError(problems)
    return found


class Proxies:
    """The proxy for each URL the client sends to, decided once per origin (scheme, host and
    port), like NO_PROXY, from the environment (default ``os.environ``) as it is when first
    asked.

    The origins of ``urls`` (the teacher's base URLs) are decided at once: ``ConfigError``
    listing every unusable proxy setting among them. Another origin (a preflight probe's) is
    decided when first asked for, with the same error if its proxy is unusable.
    """

    def __init__(self, urls: Iterable[str], environ: Mapping[str, str] | None = None) -> None:
        urls = list(urls)
        self._environ = environ
        self._by_origin: dict[str, Proxy | None] = dict.fromkeys(map(origin, urls))
        self._by_origin.update((origin(u), p) for u, p in proxies_for(urls, environ).items())
        self._by_url: dict[str, Proxy | None] = {}

    def for_url(self, url: str) -> Proxy | None:
        """The proxy ``url`` goes through; None: it is reached directly."""
        try:
            return self._by_url[url]
        except KeyError:
            pass
        key = origin(url)
        if key not in self._by_origin:
            self._by_origin[key] = proxy_for(url, self._environ)
        proxy = self._by_url[url] = self._by_origin[key]
        return proxy

    @property
    def in_use(self) -> list[Proxy]:
        """The distinct proxies decided so far, in the order first met."""
        found: dict[str, Proxy] = {}
        for proxy in self._by_origin.values():
            if proxy is not None:
                found.setdefault(proxy.url, proxy)
        return list(found.values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{p.public} ({p.variable})" for p in self.in_use) or "none"
        return f"<Proxies {shown}>"


def origin(url: str) -> str:
    """``url``'s origin as ``scheme://host:port`` (lowercase, user info dropped): what a
    proxy decision is made for."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2].lower()}"


def direct_why(url: str, environ: Mapping[str, str] | None = None) -> str:
    """Why ``url`` goes to its server directly, and what would send it through a proxy: for
    a message about a host that cannot be reached."""
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    variable = "HTTPS_PROXY" if parts.scheme.lower() == "https" else "HTTP_PROXY"
    if _is_loopback(host):
        return "it is a loopback address, which is never reached through a proxy"
    no_proxy = _variable(env, "no_proxy")
    if no_proxy is not None and _bypassed(host, _port(url), no_proxy):
        return (
            f"{no_proxy[0]} lists it, so no proxy is used for it: if only the proxy can reach "
            f"it, take it out of {no_proxy[0]}"
        )
    return (
        f"no proxy is set for it: if this network reaches it only through a proxy, set "
        f"{variable} (and NO_PROXY for the hosts reached directly)"
    )


def tls_context(ca_bundle: str = "") -> ssl.SSLContext:
    """A verifying TLS context: the system's CAs (or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), plus
    ``ca_bundle`` when given. ``ConfigError`` if ``ca_bundle`` cannot be loaded."""
    context = ssl.create_default_context()
    if ca_bundle:
        if problem := ca_bundle_problem(ca_bundle):
            raise ConfigError([f"teacher.ca_bundle: {problem}"])
        context.load_verify_locations(cafile=ca_bundle)
    return context


def cert_env_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """SSL_CERT_FILE / SSL_CERT_DIR naming what is not there: OpenSSL would skip them without
    a word and every TLS connection would fail verification."""
    env = os.environ if environ is None else environ
    problems = []
    file, directory = env.get("SSL_CERT_FILE"), env.get("SSL_CERT_DIR")
    if file and not os.path.isfile(file):
        problems.append(f"SSL_CERT_FILE is set to {file}, which is not a file")
    if directory and not all(os.path.isdir(d) for d in directory.split(os.pathsep) if d):
        problems.append(f"SSL_CERT_DIR is set to {directory}, which is not a directory")
    return problems


def trusted(ca_bundle: str = "", environ: Mapping[str, str] | None = None) -> str:
    """What the TLS context trusts, in words for messages."""
    env = os.environ if environ is None else environ
    names = [f"{name}={env[name]}" for name in CERT_ENV if env.get(name)]
    base = f"the CAs of {' and '.join(names)}" if names else "the system's CAs"
    return f"{base} and teacher.ca_bundle={ca_bundle}" if ca_bundle else base


# --- what a failure means ---------------------------------------------------------------


def tls_failure(
    server: str, reason: str, code: int | None, *, ca_bundle: str, proxy: Proxy | None
) -> TLSVerificationError:
    """``server``'s certificate ("host:port") failed verification with OpenSSL's ``reason``
    and ``code``: whose it was (``proxy`` when it was the proxy's), and what to change."""
    whose = server if proxy is None else f"{server} (the proxy from {proxy.variable})"
    if code in _NAME_MISMATCH:
        advice = "use the host name the certificate was issued for in the base URL"
    elif code in _EXPIRED:
        advice = "the server's certificate must be renewed (or the clock here is wrong)"
    else:
        advice = (
            "if it is signed by a private certificate authority, set teacher.ca_bundle to "
            "that CA's PEM file (or SSL_CERT_FILE)"
        )
    return TLSVerificationError(
        server.rpartition(":")[0],
        f"TLS: the certificate of {whose} could not be verified ({reason}): {advice}; "
        f"trusted now: {trusted(ca_bundle)}",
    )


def dns_failure(url: str, host: str, proxy: Proxy | None) -> TeacherDNSError:
    """``host`` did not resolve for a request to ``url`` (through ``proxy``, if any): the
    host, and the proxy settings that decided where the lookup happened."""
    if proxy is not None:  # the teacher's name is the proxy's to resolve: it was the proxy's
        return TeacherDNSError(
            f"cannot resolve the host name of the proxy {proxy.public} (from "
            f"{proxy.variable}) for {url}: check {proxy.variable}"
        )
    return TeacherDNSError(
        f"cannot resolve host {host} (DNS) for {url}: check the host name; {direct_why(url)}"
    )


def proxy_failure(url: str, proxy: Proxy, status: int, message: str | None) -> EngineError:
    """The proxy answered ``status`` instead of the teacher: 407 (credentials) and 403 (its
    policy) stop the run; anything else is an outage between the proxy and the teacher."""
    said = f"HTTP {status} {message or ''}".rstrip()
    name = f"the proxy {proxy.public} (from {proxy.variable})"
    if status == HTTPStatus.PROXY_AUTHENTICATION_REQUIRED:
        if "@" in urlsplit(proxy.url).netloc:
            what = "refused the credentials in it"
        else:
            what = "asks for credentials: put them in it as http://USER:PASSWORD@host:port"
        return ProxyRefused(proxy.public, status, f"{name} {what} ({said})")
    if status == HTTPStatus.FORBIDDEN:
        return ProxyRefused(
            proxy.public,
            status,
            f"{name} refused to connect to {url} ({said}): its policy does not allow that "
            "host; if it is reached directly, add it to NO_PROXY",
        )
    return TeacherConnectionError(f"{name} could not reach {url}: {said}")


def _variable(env: Mapping[str, str], lower: str) -> tuple[str, str] | None:
    """(name, value) of the lowercase variable, else the uppercase one; empty counts as unset.

    Like Python's urllib, HTTP_PROXY in uppercase is ignored in a CGI request (REQUEST_METHOD
    set), where a client's "Proxy:" header could have set it (httpoxy).
    """
    upper = lower.upper()
    for name in (lower, upper):
        if name == "HTTP_PROXY" and "REQUEST_METHOD" in env:
            continue
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def _proxy(value: str, variable: str) -> Proxy:
    url = value if "://" in value else f"http://{value}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _PROXY_SCHEMES:
        raise ConfigError(
            [
                f"{variable}: {scheme}:// proxies are not supported: give an http:// (or "
                "https://) proxy, or unset it"
            ]
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = parts._replace(netloc="")
    if not parts.hostname:
        raise ConfigError([f"{variable}: not a proxy URL (expected http://host:port)"])
    return Proxy(url, variable)


def _bypassed(host: str, port: int | None, no_proxy: tuple[str, str] | None) -> bool:
    if no_proxy is None:
        return False
    entries = no_proxy[1].replace(",", " ").split()
    return any(_matches(host, port, entry.lower()) for entry in entries)


def _matches(host: str, port: int | None, entry: str) -> bool:
    if entry == "*":
        return True
    name, entry_port = _split_port(entry)
    if entry_port is not None and entry_port != port:
        return False
    address = _address(host)
    if address is not None:
        try:
            return address in ipaddress.ip_network(name, strict=False)
        except ValueError:
            return False
    name = name.removeprefix("*").lstrip(".")
    return bool(name) and (host == name or host.endswith("." + name))


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``, a bare IPv6 address or CIDR block, or a plain name."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return inside, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        name, port = entry.split(":")
        return name, int(port) if port.isdigit() else None
    return entry, None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    address = _address(host)
    if address is not None:
        return address.is_loopback
    return host in _LOOPBACK_NAMES or host.endswith(".localhost")


def _port(url: str) -> int | None:
    """The port written in ``url``, else the scheme's default; None if it is not a number."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None
    if port is not None:
        return port
    return {"http": 80, "https": 443}.get(parts.scheme.lower())
