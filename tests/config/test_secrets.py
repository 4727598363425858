"""The API key, whatever its value, never reaches a file or a log, and never breaks a run.

Unit tests for ``engine.config.secrets``, then whole runs through the CLI with odd keys: short
placeholders that local servers accept (which once rewrote the report's own field names and
crashed its summary), a key pasted with its newline, and a long real-looking key that a
gateway echoes back in its error bodies.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote, quote_plus

import orjson
import pytest

from engine.config import load_config
from engine.config.secrets import REDACTED, redact
from engine.output import report
from engine.output.report import RunOutcome
from engine.pipeline.preflight import PROBE_PROMPT
from engine.pipeline.stats import Stats
from engine.testing.simulator import SimulatorConfig, running_simulator
from tests.support import faults
from tests.support.cli import engine_cli
from tests.support.faults import FaultInjector, Plan, Seen
from tests.support.runs import REPO, SAMPLE_SEEDS, SMALL

LONG_KEY = "sk-proj-Q7v2Lx9KmP4sT8wZ1aB6cD3eF5gH0jN2rU4yV6xW8zA"


def test_redact_replaces_every_occurrence_of_a_real_key() -> None:
    text = f"bad key {LONG_KEY}; Authorization: Bearer {LONG_KEY}."
    assert redact(text, LONG_KEY) == f"bad key {REDACTED}; Authorization: Bearer {REDACTED}."


@pytest.mark.parametrize("placeholder", ["x", "e", "token", "EMPTY", "/", "sk-1234"])
def test_redact_leaves_text_alone_for_a_placeholder_key(placeholder: str) -> None:
    text = "the token budget of /v1/chat/completions: EMPTY reply, exit 1"
    assert redact(text, placeholder) == text
    assert redact(text, None) == text


# Printable ASCII, with every character that an encoder rewrites: JSON (" \ /), Go's JSON
# (< > &), URLs (% + space ' and the rest) and HTML (& < > " ').
ODD_LONG_KEY = "sk-a\"b\\c/d<e>f&g'h+i%20j k=l"


def encodings(key: str) -> dict[str, str]:
    """``key`` as servers and gateways write it back: escaped in a JSON string (once, twice,
    Go's way), percent-encoded, form-encoded, with HTML entities."""
    json_once = orjson.dumps(key).decode()[1:-1]
    go = json_once.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return {
        "verbatim": key,
        "json": json_once,
        "json, twice": orjson.dumps(json_once).decode()[1:-1],
        "json, Go": go,
        "json, \\u escapes": "".join(f"\\u{ord(c):04x}" for c in key),
        "json, escaped slash": json_once.replace("/", "\\/"),
        "percent": quote(key, safe=""),
        "percent, lower case": quote(key, safe="").lower(),
        "form": quote_plus(key),
        "html": html.escape(key),
        "html, numeric": "".join(f"&#{ord(c)};" for c in key),
    }


@pytest.mark.parametrize(("form", "echoed"), encodings(ODD_LONG_KEY).items())
def test_redact_takes_out_an_echoed_key_in_any_encoding(form: str, echoed: str) -> None:
    text = f"401: invalid key 'Bearer {echoed}' (request 7)"
    assert redact(text, ODD_LONG_KEY) == f"401: invalid key 'Bearer {REDACTED}' (request 7)"


def test_redact_leaves_a_near_miss_alone() -> None:
    near = ODD_LONG_KEY[:-1] + "m"  # the same key but for its last character
    text = " ".join(encodings(near).values())
    assert redact(text, ODD_LONG_KEY) == text


ODD_KEYS = ["x", "e", "token", "EMPTY", "/", "exit", "extractive_summary"]


@pytest.mark.parametrize("key", ODD_KEYS)
def test_a_placeholder_key_changes_nothing_in_the_report(tmp_path: Path, key: str) -> None:
    def build(api_key: str | None) -> dict[str, object]:
        sets = [f'output.dir="{tmp_path / "extractive_summary"}"']
        if api_key is not None:
            sets.append(f"teacher.api_key={orjson.dumps(api_key).decode()}")
        env = {"TEACHER_MODEL_BASE_URL": "http://127.0.0.1:9/v1", "TEACHER_MODEL_NAME": "m"}
        config = load_config(
            REPO / "config" / "default.toml", sets, environ=env, dotenv_path=tmp_path / "no.env"
        )
        outcome = RunOutcome(1, "fatal", "the teacher at http://127.0.0.1:9/v1 answered HTTP 401")
        return report.build(config, Stats(), outcome, {"fresh": False}, now=0.0)

    with_key, without = build(key), build(None)
    assert "run fatal (exit 1)" in report.summary(with_key)
    timing = {"started_at", "wall_time_s"}
    assert {k: v for k, v in with_key.items() if k not in timing} == {
        k: v for k, v in without.items() if k not in timing
    }


# --- whole runs -------------------------------------------------------------------------------


def one_row_seeds(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(SAMPLE_SEEDS.read_bytes().splitlines()[0] + b"\n")
    return path


async def run_with_key(
    tmp_path: Path, server_key: str, env_key: str, sim: SimulatorConfig | None = None
) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    config = SimulatorConfig(api_key=server_key) if sim is None else sim
    async with running_simulator(config) as running:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
        env |= {
            "TEACHER_MODEL_BASE_URL": running.base_url,
            "TEACHER_MODEL_NAME": "sim-teacher",
            "TEACHER_MODEL_API_KEY": env_key,
        }
        sets = [*SMALL, f'output.dir="{out}"', f'input.seeds="{one_row_seeds(tmp_path)}"']
        args = [a for s in sets for a in ("--set", s)]
        code, output = await engine_cli(
            "run", "config/default.toml", "-v", *args, cwd=REPO, env=env
        )
    return code, output, out


@pytest.mark.parametrize("key", [*ODD_KEYS, "  sk-pasted-with-its-newline\n"])
async def test_a_run_with_an_odd_key_finishes_and_reports(tmp_path: Path, key: str) -> None:
    code, output, out = await run_with_key(tmp_path, key.strip(), key)
    assert code == 0, output
    assert "Traceback" not in output and "[redacted]" not in output
    got = orjson.loads((out / "run_report.json").read_bytes())
    assert got["exit"] == {"code": 0, "status": "done", "reason": "every unit finished"}
    assert set(got["types"]) == {
        "extractive_summary",
        "detailed_summary",
        "key_facts_to_qa",
        "document_based_qa",
    }
    assert got["files"]["output_dir"] == str(out.resolve())
    assert f"report: {out.resolve() / 'run_report.json'}" in output


def echoes_the_key(seen: Seen) -> faults.Outcome:
    """A gateway that quotes the request's credentials in its error bodies (of the data
    requests: the preflight's probes get real answers)."""
    if PROBE_PROMPT not in seen.prompt and seen.index % 5 == 0:
        return faults.error(400, f"bad request (Authorization: Bearer {LONG_KEY})")
    return None


def echoes_the_key_always(seen: Seen) -> faults.Outcome:
    """The same gateway quoting the credentials to every request, the preflight's too."""
    return faults.error(400, f"bad request (Authorization: Bearer {LONG_KEY})")


@pytest.mark.parametrize(
    ("plan", "exit_code", "where"),
    [
        # The echoed 400s lose some items: the key would be in failures.jsonl.
        (echoes_the_key, 3, "failures.jsonl"),
        # The preflight stops the run: the key would be in its message and the report.
        (echoes_the_key_always, 1, "run_report.json"),
    ],
)
async def test_a_real_key_is_nowhere_in_the_output_or_the_logs(
    tmp_path: Path, plan: Plan, exit_code: int, where: str
) -> None:
    sim = SimulatorConfig(api_key=LONG_KEY, fault=FaultInjector(plan))
    code, output, out = await run_with_key(tmp_path, LONG_KEY, f"{LONG_KEY}\n", sim)
    assert code == exit_code, output
    assert "Traceback" not in output
    assert b"bad request (Authorization: Bearer [redacted])" in (out / where).read_bytes()
    assert LONG_KEY not in output
    files = [path for path in out.rglob("*") if path.is_file()]
    assert {p.name for p in files} >= {"run_report.json", where, "cache.sqlite"}
    for path in files:
        assert LONG_KEY.encode() not in path.read_bytes(), path


def every_encoding() -> str:
    return "; ".join(f"{form}: Bearer {echoed}" for form, echoed in encodings(ODD_LONG_KEY).items())


def echoes_an_odd_key_every_way(seen: Seen) -> faults.Outcome:
    """A gateway that quotes the credentials in its JSON error bodies, in every encoding (the
    JSON encoder escapes the key's quotes and backslashes once more on the wire); of the data
    requests only."""
    if PROBE_PROMPT not in seen.prompt and seen.index % 5 == 0:
        return faults.error(400, f"bad request ({every_encoding()})")
    return None


def echoes_an_odd_key_always(seen: Seen) -> faults.Outcome:
    """The same, to every request: the preflight quotes it in its message."""
    return faults.error(400, f"bad request ({every_encoding()})")


@pytest.mark.parametrize(
    ("plan", "exit_code", "where"),
    [
        (echoes_an_odd_key_every_way, 3, "failures.jsonl"),
        (echoes_an_odd_key_always, 1, "run_report.json"),
    ],
)
async def test_an_odd_key_echoed_in_any_encoding_is_nowhere_in_the_output_or_the_logs(
    tmp_path: Path, plan: Plan, exit_code: int, where: str
) -> None:
    sim = SimulatorConfig(api_key=ODD_LONG_KEY, fault=FaultInjector(plan))
    code, output, out = await run_with_key(tmp_path, ODD_LONG_KEY, ODD_LONG_KEY, sim)
    assert code == exit_code, output
    assert "Traceback" not in output
    assert b"verbatim: Bearer [redacted]; json: Bearer [redacted]" in (out / where).read_bytes()
    files = [path for path in out.rglob("*") if path.is_file() and path.suffix != ".sqlite"]
    texts = {"the logs": output} | {str(p): p.read_text("utf-8") for p in files}
    for where, text in texts.items():
        for form, echoed in encodings(ODD_LONG_KEY).items():
            assert echoed not in text, (where, form)
        if where.endswith(".jsonl"):  # and once decoded
            for line in text.splitlines():
                assert ODD_LONG_KEY not in str(orjson.loads(line)), (where, line)
        elif where.endswith(".json"):
            assert ODD_LONG_KEY not in str(orjson.loads(text)), where


async def run_with_url_credentials(
    tmp_path: Path, sim: SimulatorConfig, user: str, password: str, key: str = ""
) -> tuple[int, str, Path, int]:
    async with running_simulator(sim) as running:
        url = running.base_url.replace("http://", f"http://{user}:{password}@")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
        env |= {
            "TEACHER_MODEL_BASE_URL": url,
            "TEACHER_MODEL_NAME": "sim-teacher",
            "TEACHER_MODEL_API_KEY": key,
        }
        out = tmp_path / "out"
        sets = [*SMALL, f'output.dir="{out}"', f'input.seeds="{one_row_seeds(tmp_path)}"']
        args = [a for s in sets for a in ("--set", s)]
        code, output = await engine_cli(
            "run", "config/default.toml", "-v", *args, cwd=REPO, env=env
        )
        return code, output, out, running.state.total_requests


PASSWORD = "pw-" + LONG_KEY[::-1]


@pytest.mark.parametrize(
    ("server_user", "exit_code"),
    [
        ("alice", 0),  # a gateway with Basic authentication lets the run through
        ("bob", 1),  # one that refuses them: the preflight stops the run (401)
    ],
)
async def test_credentials_in_the_base_url_are_sent_and_shown_nowhere(
    tmp_path: Path, server_user: str, exit_code: int
) -> None:
    """They used to be logged with the URL, in every message that names it and, when the
    run stopped on one, in run_report.json."""
    sim = SimulatorConfig(basic_auth=(server_user, PASSWORD))
    code, output, out, _ = await run_with_url_credentials(tmp_path, sim, "alice", PASSWORD)
    assert code == exit_code, output
    assert "Traceback" not in output
    assert "http://127.0.0.1:" in output  # the URL is shown, without them
    assert PASSWORD not in output and "alice" not in output
    for path in (p for p in out.rglob("*") if p.is_file()):
        assert PASSWORD.encode() not in path.read_bytes(), path


async def test_credentials_in_the_base_url_and_a_key_stop_the_run_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    """aiohttp refuses to send both, and the run used to crash on its ValueError."""
    sim = SimulatorConfig(basic_auth=("alice", PASSWORD))
    code, output, _, sent = await run_with_url_credentials(
        tmp_path, sim, "alice", PASSWORD, key=LONG_KEY
    )
    assert (code, sent) == (2, 0), output
    assert "has credentials in it" in output and "Traceback" not in output
    assert PASSWORD not in output and LONG_KEY not in output


@pytest.mark.parametrize("quote", ["", "'", '"'])
async def test_a_key_in_dotenv_is_sent_as_written(tmp_path: Path, quote: str) -> None:
    """python-dotenv expands ${NAME} by default: such a key was sent altered, and refused."""
    key = "sk-a${HOME}b$USER-c#d${UNSET}e"
    line = f"TEACHER_MODEL_API_KEY={quote}{key}{quote}\n"
    (tmp_path / ".env").write_text(line, encoding="utf-8")
    async with running_simulator(SimulatorConfig(api_key=key)) as running:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_MODEL_")}
        env |= {"TEACHER_MODEL_BASE_URL": running.base_url, "TEACHER_MODEL_NAME": "sim-teacher"}
        sets = [f'input.seeds="{one_row_seeds(tmp_path)}"', f'output.dir="{tmp_path / "o"}"']
        args = [a for s in sets for a in ("--set", s)]
        code, output = await engine_cli(
            "validate", str(REPO / "config" / "default.toml"), "--probe", *args,
            cwd=tmp_path, env=env,
        )  # fmt: skip
    assert code == 0, output
    assert "teacher OK" in output
