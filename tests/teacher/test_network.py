"""Reaching the teacher through proxies and private certificate authorities.

Unit tables for ``engine.teacher.network`` (which proxy, which CAs), then runs against real local
servers: a forward proxy (``tests.support.proxy``) that alone can resolve the teacher's host name,
and the simulator over HTTPS with a certificate from a throwaway CA made by trustme.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import trustme

from engine.config import RetryConfig, TeacherConfig
from engine.errors import (
    ConfigError,
    ProxyRefused,
    RetriesExhausted,
    TLSVerificationError,
)
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.teacher.client import HTTPTeacher
from engine.teacher.limits import RequestLimiter
from engine.teacher.network import (
    Proxy,
    cert_env_problems,
    direct_why,
    proxy_for,
    tls_context,
    trusted,
)
from engine.teacher.protocol import ChatRequest, Message
from engine.testing.simulator import RunningSimulator, SimulatorConfig, running_simulator
from tests.support.cli import PROXY_VARIABLES, engine_cli
from tests.support.proxy import ForwardProxy
from tests.support.runs import REPO, assert_complete_output, config_for, pipeline_requests

# A name no resolver knows: only the test proxy maps it to the simulator.
HIDDEN = "teacher.internal"
KEY = "sk-network-test-0123456789abcdef"
REQUEST = ChatRequest(messages=(Message("user", "Say hi."),), stage="test")


# --- which proxy --------------------------------------------------------------------------------

P = "http://proxy.corp:3128"


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("https://api.example.com/v1", {}, None),
        ("https://api.example.com/v1", {"HTTPS_PROXY": P}, ("HTTPS_PROXY", P)),
        ("https://api.example.com/v1", {"https_proxy": P}, ("https_proxy", P)),
        # The lowercase spelling wins, as in curl and Python's urllib.
        (
            "https://api.example.com/v1",
            {"https_proxy": P, "HTTPS_PROXY": "http://other:1"},
            ("https_proxy", P),
        ),
        ("http://gpu1:8000/v1", {"HTTP_PROXY": P}, ("HTTP_PROXY", P)),
        # Each scheme has its own variable; ALL_PROXY serves both when it is unset.
        ("https://api.example.com/v1", {"HTTP_PROXY": P}, None),
        ("http://gpu1:8000/v1", {"HTTPS_PROXY": P}, None),
        ("http://gpu1:8000/v1", {"ALL_PROXY": P}, ("ALL_PROXY", P)),
        ("https://a.b/v1", {"HTTPS_PROXY": "", "ALL_PROXY": P}, ("ALL_PROXY", P)),
        # No scheme means http://, as curl reads it.
        ("https://a.b/v1", {"HTTPS_PROXY": "proxy.corp:3128"}, ("HTTPS_PROXY", P)),
        # In a CGI request a client could set HTTP_PROXY through a header (httpoxy).
        ("http://gpu1:8000/v1", {"HTTP_PROXY": P, "REQUEST_METHOD": "GET"}, None),
        ("http://gpu1:8000/v1", {"http_proxy": P, "REQUEST_METHOD": "GET"}, ("http_proxy", P)),
    ],
)
def test_the_proxy_variable_for_each_scheme(
    url: str, env: dict[str, str], expected: tuple[str, str] | None
) -> None:
    proxy = proxy_for(url, env)
    assert (None if proxy is None else (proxy.variable, proxy.url)) == expected


@pytest.mark.parametrize(
    ("url", "no_proxy", "direct"),
    [
        ("https://api.example.com/v1", "*", True),
        ("https://api.example.com/v1", "api.example.com", True),
        ("https://api.example.com/v1", "example.com", True),  # and its subdomains
        ("https://api.example.com/v1", ".example.com", True),
        ("https://api.example.com/v1", "*.example.com", True),
        ("https://api.example.com/v1", "EXAMPLE.COM", True),
        ("https://api.example.com/v1", "ample.com", False),  # not a suffix of labels
        ("https://api.example.com/v1", "other.org, example.com", True),
        ("https://api.example.com/v1", "other.org example.com", True),
        ("https://api.example.com/v1", "example.com:443", True),
        ("https://api.example.com/v1", "example.com:8443", False),
        ("https://api.example.com:8443/v1", "example.com:8443", True),
        ("http://10.1.2.3:8000/v1", "10.0.0.0/8", True),
        ("http://11.1.2.3:8000/v1", "10.0.0.0/8", False),
        ("http://10.1.2.3:8000/v1", "10.1.2.3", True),
        ("http://[fd00::5]:8000/v1", "fd00::/8", True),
        ("http://[fd00::5]:8000/v1", "[fd00::5]:8000", True),
        ("http://[fd00::5]:8000/v1", "[fd00::5]:9000", False),
        ("http://gpu1:8000/v1", "", False),
    ],
)
def test_no_proxy_entries(url: str, no_proxy: str, direct: bool) -> None:
    env = {"HTTP_PROXY": P, "HTTPS_PROXY": P, "NO_PROXY": no_proxy}
    assert (proxy_for(url, env) is None) == direct
    assert (proxy_for(url, {**env, "no_proxy": no_proxy, "NO_PROXY": "nothing.else"}) is None) == (
        direct
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8000/v1",
        "http://LOCALHOST:8000/v1",
        "http://127.0.0.1:8000/v1",
        "http://127.9.9.9:8000/v1",
        "http://[::1]:8000/v1",
        "https://vllm.localhost/v1",
    ],
)
def test_loopback_is_never_proxied(url: str) -> None:
    assert proxy_for(url, {"HTTP_PROXY": P, "HTTPS_PROXY": P, "ALL_PROXY": P}) is None
    assert "loopback" in direct_why(url, {"HTTP_PROXY": P})


@pytest.mark.parametrize("value", ["socks5://proxy:1080", "socks5h://u:pw@proxy:1080"])
def test_a_socks_proxy_is_a_config_error_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        proxy_for("https://api.example.com/v1", {"ALL_PROXY": value})
    (problem,) = info.value.problems
    assert problem.startswith("ALL_PROXY: socks5")
    assert "pw" not in problem


def test_a_proxy_is_shown_without_its_credentials() -> None:
    proxy = Proxy("http://me%40corp:s3cret-pass@proxy.corp:3128", "HTTPS_PROXY")
    assert proxy.public == "http://proxy.corp:3128"
    assert "s3cret" not in repr(proxy)


def test_the_client_repr_names_its_proxy_without_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://me:proxy-password-0123@proxy.corp:3128")
    config = TeacherConfig(base_url="https://a.example/v1,http://localhost/v1", model="m")
    limiter = RequestLimiter(requests_per_minute=60, max_concurrency=1)
    text = repr(HTTPTeacher(config, RetryConfig(), limiter))
    assert text == (
        "<HTTPTeacher https://a.example/v1, http://localhost/v1 model=m "
        "via http://proxy.corp:3128 (HTTPS_PROXY)>"
    )


def test_why_a_host_is_reached_directly() -> None:
    url = "https://api.example.com/v1"
    assert "set HTTPS_PROXY" in direct_why(url, {})
    assert "set HTTP_PROXY" in direct_why("http://gpu1/v1", {})
    assert "no_proxy lists it" in direct_why(url, {"HTTPS_PROXY": P, "no_proxy": "example.com"})


# --- which certificates -------------------------------------------------------------------------


def test_cert_variables_naming_nothing_are_found(tmp_path: Path, ca_file: Path) -> None:
    assert cert_env_problems({"SSL_CERT_FILE": str(ca_file), "SSL_CERT_DIR": str(tmp_path)}) == []
    problems = cert_env_problems(
        {"SSL_CERT_FILE": str(tmp_path / "gone.pem"), "SSL_CERT_DIR": str(tmp_path / "gone")}
    )
    assert problems == [
        f"SSL_CERT_FILE is set to {tmp_path / 'gone.pem'}, which is not a file",
        f"SSL_CERT_DIR is set to {tmp_path / 'gone'}, which is not a directory",
    ]


def test_what_is_trusted_in_words(ca_file: Path) -> None:
    assert trusted("", {}) == "the system's CAs"
    assert trusted(str(ca_file), {"SSL_CERT_FILE": "/x.pem"}) == (
        f"the CAs of SSL_CERT_FILE=/x.pem and teacher.ca_bundle={ca_file}"
    )
    assert isinstance(tls_context(str(ca_file)), ssl.SSLContext)


# --- real servers -------------------------------------------------------------------------------


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with running_simulator(SimulatorConfig(api_key=KEY)) as running:
        yield running


def hidden_url(sim: RunningSimulator, scheme: str = "http") -> str:
    return f"{scheme}://{HIDDEN}:{sim.port}/v1"


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
async def test_a_run_goes_through_the_proxy_when_only_the_proxy_can_reach_the_teacher(
    sim: RunningSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    async with ForwardProxy({HIDDEN: "127.0.0.1"}) as proxy:
        monkeypatch.setenv(variable, proxy.url)
        config = config_for(hidden_url(sim), tmp_path, f'teacher.api_key="{KEY}"')
        stats = Stats()
        await run_job(config, stats)
    assert_complete_output(tmp_path)
    # Every request went through the proxy: the run's and the preflight's (GET /models, and
    # its chat probes, which the simulator counts with the rest).
    assert len(proxy.seen) == stats.teacher.requests_sent + stats.teacher.preflight_requests
    assert len(pipeline_requests(sim)) == stats.teacher.requests_sent
    base = f"http://{HIDDEN}:{sim.port}/v1"
    assert {(s.method, s.target) for s in proxy.seen} == {
        ("POST", f"{base}/chat/completions"),
        ("GET", f"{base}/models"),
    }


async def test_https_goes_through_a_connect_tunnel_the_proxy_cannot_read(
    ca: trustme.CA, ca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = server_context(ca, HIDDEN)
    async with (
        running_simulator(SimulatorConfig(api_key=KEY), ssl_context=context) as sim,
        ForwardProxy({HIDDEN: "127.0.0.1"}) as proxy,
    ):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        out = tmp_path / "out"
        config = config_for(
            hidden_url(sim, "https"),
            out,
            f'teacher.api_key="{KEY}"',
            f'teacher.ca_bundle="{ca_file}"',
        )
        stats = Stats()
        await run_job(config, stats)
        sent = len(pipeline_requests(sim))
    assert_complete_output(out)
    assert sent == stats.teacher.requests_sent
    assert proxy.seen, "the proxy was not used"
    assert {s.method for s in proxy.seen} == {"CONNECT"}
    assert {s.target for s in proxy.seen} == {f"{HIDDEN}:{sim.port}"}
    assert all(s.authorization is None for s in proxy.seen)  # the key stayed in the tunnel


async def test_no_proxy_sends_a_host_around_the_proxy(
    sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch, limiter: RequestLimiter
) -> None:
    async with ForwardProxy({HIDDEN: "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "other.host,.internal")
        with pytest.raises(RetriesExhausted) as info:
            await complete(hidden_url(sim), limiter)
    assert proxy.seen == []
    message = str(info.value)
    assert f"cannot resolve host {HIDDEN} (DNS)" in message
    assert "NO_PROXY lists it, so no proxy is used for it" in message


async def test_a_dns_failure_names_the_host_and_the_proxy_variables(
    sim: RunningSimulator, limiter: RequestLimiter
) -> None:
    with pytest.raises(RetriesExhausted) as info:
        await complete(hidden_url(sim), limiter)
    message = str(info.value)
    assert f"cannot resolve host {HIDDEN} (DNS) for {hidden_url(sim)}/chat/completions" in message
    assert "no proxy is set for it" in message and "set HTTP_PROXY" in message
    assert "NO_PROXY" in message


async def test_a_proxy_host_that_does_not_resolve_is_named(
    sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch, limiter: RequestLimiter
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    with pytest.raises(RetriesExhausted) as info:
        await complete(hidden_url(sim, "https"), limiter)
    assert (
        "cannot resolve the host name of the proxy http://proxy.invalid:3128 (from HTTPS_PROXY)"
        in str(info.value)
    )


async def test_loopback_teachers_ignore_a_machine_wide_proxy(
    sim: RunningSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ForwardProxy({}) as proxy:  # it could not reach the simulator anyway
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        await run_job(config_for(sim.base_url, tmp_path, f'teacher.api_key="{KEY}"'), Stats())
    assert proxy.seen == []
    assert_complete_output(tmp_path)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_proxy_credentials_from_the_proxy_url(
    ca: trustme.CA,
    ca_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scheme: str,
) -> None:
    context = server_context(ca, HIDDEN) if scheme == "https" else None
    login = "me@corp:proxy-password-0123"
    async with (
        running_simulator(SimulatorConfig(api_key=KEY), ssl_context=context) as sim,
        ForwardProxy({HIDDEN: "127.0.0.1"}, credentials=login) as proxy,
    ):
        monkeypatch.setenv(
            f"{scheme.upper()}_PROXY", proxy.url_with("me%40corp:proxy-password-0123")
        )
        out = tmp_path / "out"
        config = config_for(
            hidden_url(sim, scheme),
            out,
            f'teacher.api_key="{KEY}"',
            f'teacher.ca_bundle="{ca_file}"',
        )
        await run_job(config, Stats())
    assert_complete_output(out)
    assert proxy.seen and all(s.authenticated for s in proxy.seen)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxy_that_wants_credentials_stops_the_run_at_once(
    ca: trustme.CA,
    ca_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    limiter: RequestLimiter,
    scheme: str,
) -> None:
    context = server_context(ca, HIDDEN) if scheme == "https" else None
    async with (
        running_simulator(SimulatorConfig(api_key=KEY), ssl_context=context) as sim,
        ForwardProxy({HIDDEN: "127.0.0.1"}, credentials="me:pw") as proxy,
    ):
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", proxy.url)
        with pytest.raises(ProxyRefused) as info:
            await complete(hidden_url(sim, scheme), limiter, ca_bundle=str(ca_file))
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", proxy.url_with("me:wrong-password"))
        with pytest.raises(ProxyRefused) as wrong:
            await complete(hidden_url(sim, scheme), limiter, ca_bundle=str(ca_file))
    variable = f"{scheme.upper()}_PROXY"
    assert str(info.value) == (
        f"the proxy {proxy.url} (from {variable}) asks for credentials: put them in it as "
        "http://USER:PASSWORD@host:port (HTTP 407 Proxy Authentication Required)"
    )
    assert "refused the credentials in it (HTTP 407" in str(wrong.value)
    assert "wrong-password" not in str(wrong.value)
    assert len(proxy.seen) == 2  # one request each: nothing retried


async def test_a_proxy_that_forbids_the_host_stops_the_run(
    ca: trustme.CA, ca_file: Path, monkeypatch: pytest.MonkeyPatch, limiter: RequestLimiter
) -> None:
    async with (
        running_simulator(SimulatorConfig(), ssl_context=server_context(ca, HIDDEN)) as sim,
        ForwardProxy({HIDDEN: "127.0.0.1"}, deny={HIDDEN}) as proxy,
    ):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        with pytest.raises(ProxyRefused, match=r"refused to connect to .* add it to NO_PROXY"):
            await complete(hidden_url(sim, "https"), limiter, ca_bundle=str(ca_file))


async def test_netrc_is_never_read(
    sim: RunningSimulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limiter: RequestLimiter,
) -> None:
    # aiohttp's trust_env would turn this entry into Basic auth, which clashes with the key.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-password\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    reply = await complete(sim.base_url, limiter)
    assert reply.choices


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture
def limiter() -> RequestLimiter:
    return RequestLimiter(requests_per_minute=100_000, max_concurrency=4)


async def complete(
    base_url: str, limiter: RequestLimiter, *, ca_bundle: str = "", attempts: int = 1
) -> object:
    """One request through ``HTTPTeacher``, with ``attempts`` attempts."""
    config = TeacherConfig(base_url=base_url, model="sim-teacher", api_key=KEY, ca_bundle=ca_bundle)
    retry = RetryConfig(max_attempts=attempts)
    async with HTTPTeacher(config, retry, limiter) as teacher:
        return await teacher.complete(REQUEST)


async def test_https_with_ca_bundle_and_with_ssl_cert_file(
    ca: trustme.CA, ca_file: Path, monkeypatch: pytest.MonkeyPatch, limiter: RequestLimiter
) -> None:
    async with running_simulator(
        SimulatorConfig(api_key=KEY), ssl_context=server_context(ca, "127.0.0.1")
    ) as sim:
        assert sim.base_url.startswith("https://127.0.0.1:")
        await complete(sim.base_url, limiter, ca_bundle=str(ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        await complete(sim.base_url, limiter)
        assert sim.state.total_requests == 2


async def test_an_untrusted_certificate_stops_at_once_naming_host_and_what_to_set(
    ca: trustme.CA, limiter: RequestLimiter
) -> None:
    async with running_simulator(
        SimulatorConfig(api_key=KEY), ssl_context=server_context(ca, "127.0.0.1")
    ) as sim:
        with pytest.raises(TLSVerificationError) as info:
            await complete(sim.base_url, limiter, attempts=6)
        assert sim.state.total_requests == 0
    message = str(info.value)
    assert message.startswith(f"TLS: the certificate of 127.0.0.1:{sim.port} could not be verified")
    assert "set teacher.ca_bundle to that CA's PEM file (or SSL_CERT_FILE)" in message
    assert "trusted now: the system's CAs" in message


@pytest.mark.parametrize(("host", "says"), [("localhost", "Hostname"), ("127.0.0.1", "IP address")])
async def test_a_certificate_for_another_name_says_so(
    ca: trustme.CA, ca_file: Path, limiter: RequestLimiter, host: str, says: str
) -> None:
    async with running_simulator(ssl_context=server_context(ca, "other.example")) as sim:
        url = f"https://{host}:{sim.port}/v1"
        with pytest.raises(TLSVerificationError) as info:
            await complete(url, limiter, ca_bundle=str(ca_file))
    assert f"({says} mismatch, certificate is not valid for " in str(info.value)
    assert "use the host name the certificate was issued for in the base URL" in str(info.value)


async def test_https_to_a_plain_http_port_says_tls_failed(
    sim: RunningSimulator, limiter: RequestLimiter
) -> None:
    with pytest.raises(
        RetriesExhausted, match=r"TLS handshake with 127\.0\.0\.1:.* plain-HTTP port"
    ):
        await complete(sim.base_url.replace("http://", "https://"), limiter)


async def test_ssl_cert_file_naming_nothing_is_a_config_error_for_https(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limiter: RequestLimiter
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "gone.pem"))
    with pytest.raises(
        ConfigError, match=r"SSL_CERT_FILE is set to .*gone\.pem, which is not a file"
    ):
        await complete("https://127.0.0.1:9/v1", limiter)
    # A plain-HTTP teacher does not care.
    with pytest.raises(RetriesExhausted, match="connection to"):
        await complete("http://127.0.0.1:9/v1", limiter)


# --- through the CLI ------------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    drop = ("TEACHER_MODEL_", "SSL_CERT_")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in PROXY_VARIABLES
    }
    return env | extra


async def test_cli_untrusted_certificate_exits_1_with_one_message(
    ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    context = server_context(ca, "127.0.0.1")
    async with running_simulator(SimulatorConfig(api_key=KEY), ssl_context=context) as sim:
        env = cli_env(
            TEACHER_MODEL_BASE_URL=sim.base_url,
            TEACHER_MODEL_NAME="sim-teacher",
            TEACHER_MODEL_API_KEY=KEY,
        )
        out = tmp_path / "out"
        sets = ["--set", f'output.dir="{out}"']
        code, output = await engine_cli("run", "config/default.toml", *sets, cwd=REPO, env=env)
        assert sim.state.total_requests == 0
        assert code == 1, output
        assert output.count(f"the certificate of 127.0.0.1:{sim.port} could not be verified") == 2
        assert "run stopped: TLS:" in output and "retrying" not in output
        assert "Traceback" not in output
        # The same run, told about the CA, goes through.
        sets += [
            "--set",
            f'teacher.ca_bundle="{ca_file}"',
            "--set",
            "limits.requests_per_minute=100000",
        ]
        sets += ["--set", "generation.types=['document_based_qa']"]
        code, output = await engine_cli("run", "config/default.toml", *sets, cwd=REPO, env=env)
        assert code == 0, output


async def test_cli_validate_names_the_route_and_refuses_a_socks_proxy(tmp_path: Path) -> None:
    base = f"https://{HIDDEN}:8443/v1"
    env = cli_env(
        TEACHER_MODEL_BASE_URL=base,
        TEACHER_MODEL_NAME="m",
        HTTPS_PROXY="http://me:proxy-password-0123@proxy.corp:3128",
    )
    sets = ["--set", f'output.dir="{tmp_path / "out"}"']
    code, output = await engine_cli("validate", "config/default.toml", *sets, cwd=REPO, env=env)
    assert code == 0, output
    assert f"teacher: m at {base} via proxy http://proxy.corp:3128 (HTTPS_PROXY)" in output
    assert "proxy-password" not in output
    env["HTTPS_PROXY"] = "socks5://proxy.corp:1080"
    code, output = await engine_cli("validate", "config/default.toml", *sets, cwd=REPO, env=env)
    assert code == 2, output
    assert "HTTPS_PROXY: socks5:// proxies are not supported" in output
