from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from engine.config import GEN_TYPES, Config, load_config
from engine.errors import ConfigError
from tests.support.cli import DEFAULT_TOML

ENV = {
    "TEACHER_MODEL_BASE_URL": "http://localhost:8000/v1",
    "TEACHER_MODEL_NAME": "env-model",
    "TEACHER_MODEL_API_KEY": "sk-test-SECRET-0123456789",
}
SECRET = ENV["TEACHER_MODEL_API_KEY"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load(
    path: Path,
    overrides: tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
    dotenv_path: Path | None = None,
) -> Config:
    return load_config(
        path,
        overrides,
        environ=ENV if environ is None else environ,
        dotenv_path=dotenv_path if dotenv_path is not None else path.parent / "absent.env",
    )


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    err = excinfo.value
    # The message and the list say the same thing: the CLI prints the message.
    for problem in err.problems:
        assert problem in str(err)
    return err.problems


# --- the shipped config/default.toml ---------------------------------------------------


def test_default_toml_loads_with_teacher_from_environment(no_dotenv: Path) -> None:
    config = load_config(DEFAULT_TOML, environ=ENV, dotenv_path=no_dotenv)
    assert config.teacher.base_url == "http://localhost:8000/v1"
    assert config.teacher.model == "env-model"
    assert config.teacher.api_key is not None
    assert config.teacher.api_key.get_secret_value() == SECRET


def test_default_toml_without_environment_uses_the_embedded_teacher(no_dotenv: Path) -> None:
    config = load_config(DEFAULT_TOML, environ={}, dotenv_path=no_dotenv)
    assert config.teacher.mode == "embedded"


def test_default_toml_states_the_documented_values(no_dotenv: Path) -> None:
    config = load_config(DEFAULT_TOML, environ=ENV, dotenv_path=no_dotenv)
    assert config.input.seeds == Path("config/sample_seeds.jsonl")
    assert config.input.max_document_chars == 60_000
    assert config.output.dir == Path("output/step_03")
    assert config.teacher.timeout_s == 600
    assert config.teacher.connect_timeout_s == 10
    assert config.teacher.structured_output == "json_schema"
    assert config.teacher.supports_n is True
    assert config.limits.requests_per_minute == 600
    assert config.limits.max_concurrency == 32
    assert config.limits.workers == 0
    assert config.workers == 32  # "0 = max(4, max_concurrency)"
    assert config.retry.max_attempts == 6
    assert config.retry.backoff_base_s == 0.5
    assert config.retry.backoff_max_s == 30
    assert config.retry.retry_after_max_s == 120
    assert config.retry.invalid_reply_attempts == 3
    generation = config.generation
    assert tuple(generation.types) == GEN_TYPES
    assert generation.judge is False
    assert generation.judge_max_tokens == 512
    for summary in (generation.extractive_summary, generation.detailed_summary):
        assert summary.summaries == 50
        assert summary.questions_per_summary == 5
        assert summary.temperature == 1.0
        assert summary.max_tokens == 2048
        assert summary.qa_temperature == 0.3
        assert summary.qa_max_tokens == 1024
    assert generation.key_facts_to_qa.max_facts == 30
    assert generation.key_facts_to_qa.qa_per_fact == 5
    assert generation.key_facts_to_qa.temperature == 0.2
    assert generation.document_based_qa.questions == 10
    assert generation.document_based_qa.temperature == 0.7


def test_default_toml_agrees_with_model_defaults(tmp_path: Path) -> None:
    # The shipped file documents the defaults: an empty file must give the same config.
    shipped = load_config(DEFAULT_TOML, environ=ENV, dotenv_path=tmp_path / "absent.env")
    empty = load(write(tmp_path / "empty.toml", ""))
    assert shipped == empty


# --- precedence: TOML < .env < environment < --set ---------------------------------------


@pytest.fixture
def layered(tmp_path: Path) -> tuple[Path, Path]:
    toml = write(
        tmp_path / "c.toml",
        '[teacher]\nbase_url = "http://toml/v1"\nmodel = "toml-model"\n',
    )
    dotenv = write(
        tmp_path / ".env",
        "TEACHER_MODEL_BASE_URL=http://dotenv/v1\n"
        "TEACHER_MODEL_NAME=dotenv-model\n"
        "TEACHER_MODEL_API_KEY=dotenv-key\n",
    )
    return toml, dotenv


def test_toml_alone(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", '[teacher]\nbase_url = "http://toml/v1"\nmodel = "m"\n')
    config = load(toml, environ={})
    assert config.teacher.base_url == "http://toml/v1"
    assert config.teacher.api_key is None


def test_dotenv_beats_toml_when_environment_lacks_the_keys(layered: tuple[Path, Path]) -> None:
    toml, dotenv = layered
    config = load(toml, environ={"UNRELATED": "x"}, dotenv_path=dotenv)
    assert config.teacher.base_url == "http://dotenv/v1"
    assert config.teacher.model == "dotenv-model"
    assert config.teacher.api_key == SecretStr("dotenv-key")


def test_environment_beats_dotenv_key_by_key(layered: tuple[Path, Path]) -> None:
    toml, dotenv = layered
    environ = {"TEACHER_MODEL_NAME": "env-model"}
    config = load(toml, environ=environ, dotenv_path=dotenv)
    assert config.teacher.model == "env-model"
    assert config.teacher.base_url == "http://dotenv/v1"  # not in environ: .env still counts


def test_set_beats_everything(layered: tuple[Path, Path]) -> None:
    toml, dotenv = layered
    config = load(
        toml,
        ('teacher.model="cli-model"', "teacher.base_url=https://cli/v1"),
        environ={"TEACHER_MODEL_NAME": "env-model", "TEACHER_MODEL_BASE_URL": "http://env/v1"},
        dotenv_path=dotenv,
    )
    assert config.teacher.model == "cli-model"
    assert config.teacher.base_url == "https://cli/v1"


def test_empty_variable_does_not_blank_a_lower_layer(layered: tuple[Path, Path]) -> None:
    # .env.example ships "TEACHER_MODEL_API_KEY=" for servers that need no key.
    toml, _ = layered
    dotenv = write(toml.parent / "blank.env", "TEACHER_MODEL_API_KEY=\nTEACHER_MODEL_NAME=\n")
    config = load(toml, environ={}, dotenv_path=dotenv)
    assert config.teacher.api_key is None
    assert config.teacher.model == "toml-model"


def test_dotenv_defaults_to_the_working_directory(
    layered: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    toml, _ = layered  # layered wrote .env next to c.toml, in tmp_path
    monkeypatch.chdir(toml.parent)
    config = load_config(toml, environ={})
    assert config.teacher.model == "dotenv-model"


# --- --set parsing ------------------------------------------------------------------------


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    return write(tmp_path / "c.toml", "[limits]\nmax_concurrency = 8\n")


@pytest.mark.parametrize(
    ("item", "read", "expected"),
    [
        ("limits.max_concurrency=64", lambda c: c.limits.max_concurrency, 64),
        ("retry.backoff_base_s=1.5", lambda c: c.retry.backoff_base_s, 1.5),
        ('teacher.model="quoted/model"', lambda c: c.teacher.model, "quoted/model"),
        ("teacher.model=bare-word/model:v1", lambda c: c.teacher.model, "bare-word/model:v1"),
        ("teacher.supports_n=false", lambda c: c.teacher.supports_n, False),
        ("generation.judge=true", lambda c: c.generation.judge, True),
        (
            'generation.types=["key_facts_to_qa", "document_based_qa"]',
            lambda c: c.generation.types,
            ["key_facts_to_qa", "document_based_qa"],
        ),
        ("input.seeds=data/seeds.jsonl", lambda c: c.input.seeds, Path("data/seeds.jsonl")),
        (
            "generation.extractive_summary.summaries=3",
            lambda c: c.generation.extractive_summary.summaries,
            3,
        ),
        (" limits.max_concurrency = 5", lambda c: c.limits.max_concurrency, 5),
    ],
)
def test_set_values_are_toml_or_bare_strings(
    minimal: Path, item: str, read: Callable[[Config], object], expected: object
) -> None:
    assert read(load(minimal, (item,))) == expected


def test_set_creates_missing_tables(minimal: Path) -> None:
    # Neither [generation] nor its sub-table is in the file.
    config = load(minimal, ("generation.key_facts_to_qa.max_facts=7",))
    assert config.generation.key_facts_to_qa.max_facts == 7
    assert config.limits.max_concurrency == 8  # the file's other values survive


def test_several_overrides_at_once_last_wins(minimal: Path) -> None:
    config = load(
        minimal,
        (
            "limits.max_concurrency=2",
            "limits.workers=9",
            "limits.max_concurrency=3",
            "retry.max_attempts=1",
        ),
    )
    assert config.limits.max_concurrency == 3
    assert config.limits.workers == 9
    assert config.retry.max_attempts == 1


def test_set_value_goes_through_validation(minimal: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(minimal, ("limits.max_concurrency=0",))
    assert [p for p in problems_of(excinfo) if p.startswith("limits.max_concurrency:")]


def test_set_unknown_key_is_an_error(minimal: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(minimal, ("limits.max_concurency=4",))
    (problem,) = problems_of(excinfo)
    assert problem.startswith("limits.max_concurency: unknown key")


@pytest.mark.parametrize("item", ["limits.max_concurrency", "", "=5", "  =5"])
def test_set_without_key_or_equals_sign_is_an_error(minimal: Path, item: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(minimal, (item,))
    (problem,) = problems_of(excinfo)
    assert "expected section.key=value" in problem


def test_a_mistyped_set_does_not_echo_a_secret(minimal: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(minimal, ("teacher.api_key sk-live-123",))
    assert "sk-live-123" not in str(excinfo.value)


def test_set_through_a_non_table_is_an_error(minimal: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(minimal, ("limits.max_concurrency.extra=1",))
    (problem,) = problems_of(excinfo)
    assert "limits.max_concurrency.extra" in problem
    assert "max_concurrency is not a table" in problem


def test_every_bad_set_is_listed(minimal: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(minimal, ("nosep", "limits.max_concurrency.x=1", "limits.workers=2", "other"))
    problems = problems_of(excinfo)
    assert len(problems) == 3
    assert "no '='" in problems[0]
    assert "not a table" in problems[1]
    assert "no '='" in problems[2]


# --- validation problems, all in one error ------------------------------------------------


def test_all_problems_in_one_error(tmp_path: Path) -> None:
    toml = write(
        tmp_path / "c.toml",
        "[limits]\n"
        "max_concurency = 4\n"  # typo
        "max_concurrency = -1\n"
        "[teacher]\n"
        'structured_output = "yaml"\n',
    )
    with pytest.raises(ConfigError) as excinfo:
        load(toml)
    problems = problems_of(excinfo)
    assert len(problems) == 3
    message = str(excinfo.value)
    assert "limits.max_concurency: unknown key" in message
    assert "limits.max_concurrency: Input should be greater than or equal to 1" in message
    assert "teacher.structured_output:" in message
    assert "json_schema" in message  # says what would be accepted


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", "[limit]\nmax_concurrency = 4\n")
    with pytest.raises(ConfigError) as excinfo:
        load(toml)
    assert problems_of(excinfo) == [
        "limit: unknown key (check its spelling against config/default.toml)"
    ]


def test_missing_base_url_names_the_variable(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", '[teacher]\nbackend = "http"\n')
    with pytest.raises(ConfigError) as excinfo:
        load(toml, environ={"TEACHER_MODEL_NAME": "m"})
    (problem,) = problems_of(excinfo)
    assert problem.startswith("teacher:")
    assert "TEACHER_MODEL_BASE_URL" in problem


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://host/v1", "HTTP//host"])
def test_base_url_needs_http_scheme(tmp_path: Path, url: str) -> None:
    toml = write(tmp_path / "c.toml", "")
    with pytest.raises(ConfigError) as excinfo:
        load(toml, environ={**ENV, "TEACHER_MODEL_BASE_URL": url})
    (problem,) = problems_of(excinfo)
    assert "http:// or https://" in problem
    assert url in problem


@pytest.mark.parametrize(
    ("url", "bare", "origin", "pair"),
    [
        ("http://alice:pw@localhost:8000/v1", "http://localhost:8000/v1",
         "http://localhost:8000", ("alice", "pw")),
        ("https://token@api.example.com/v1", "https://api.example.com/v1",
         "https://api.example.com", ("token", "")),
        ("http://a%40b:p%3Aw%2F@gw:80/", "http://gw:80", "http://gw:80", ("a@b", "p:w/")),
    ],
)  # fmt: skip
def test_credentials_in_base_url_are_kept_apart_from_it(
    tmp_path: Path, url: str, bare: str, origin: str, pair: tuple[str, str]
) -> None:
    toml = write(tmp_path / "c.toml", "")
    env = {k: v for k, v in ENV.items() if k != "TEACHER_MODEL_API_KEY"}
    teacher = load(toml, environ={**env, "TEACHER_MODEL_BASE_URL": url}).teacher
    assert teacher.urls == (bare,)  # what every message and file shows
    assert teacher.url_credentials == {origin: pair}


def test_credentials_in_base_url_and_a_key_are_refused_without_showing_either(
    tmp_path: Path,
) -> None:
    toml = write(tmp_path / "c.toml", "")
    url = "http://ok:8000/v1,http://u:pw-s3cret@gpu2:8000/v1"
    with pytest.raises(ConfigError) as excinfo:
        load(toml, environ={**ENV, "TEACHER_MODEL_BASE_URL": url})
    (problem,) = problems_of(excinfo)
    assert "base_url has credentials in it" in problem and "keep one" in problem
    assert "s3cret" not in problem and SECRET not in problem


@pytest.mark.parametrize(
    "url", ["http://gw:8000/v1?api-key=s3cret-abc", "http://gw:8000/v1#s3cret", "http://gw/v1?"]
)
def test_a_query_string_in_base_url_is_refused_without_showing_it(tmp_path: Path, url: str) -> None:
    toml = write(tmp_path / "c.toml", "")
    with pytest.raises(ConfigError) as excinfo:
        load(toml, environ={**ENV, "TEACHER_MODEL_BASE_URL": url})
    (problem,) = problems_of(excinfo)
    assert "base_url http://" in problem and "has a query string or fragment" in problem
    assert "s3cret" not in problem


@pytest.mark.parametrize("url", ["http://h:8000/v1/@team/route", "https://h/openai/v1"])
def test_an_at_sign_after_the_host_is_not_credentials(tmp_path: Path, url: str) -> None:
    toml = write(tmp_path / "c.toml", "")
    assert load(toml, environ={**ENV, "TEACHER_MODEL_BASE_URL": url}).teacher.base_url == url


@pytest.mark.parametrize("url", ["http://localhost:8000/v1", "https://api.example.com/v1"])
def test_base_url_with_http_scheme_is_accepted(tmp_path: Path, url: str) -> None:
    toml = write(tmp_path / "c.toml", "")
    config = load(toml, environ={**ENV, "TEACHER_MODEL_BASE_URL": url})
    assert config.teacher.base_url == url


def test_missing_model_names_the_variable(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", "")
    with pytest.raises(ConfigError) as excinfo:
        load(toml, environ={"TEACHER_MODEL_BASE_URL": "http://x/v1"})
    (problem,) = problems_of(excinfo)
    assert "TEACHER_MODEL_NAME" in problem


def test_duplicate_generation_type(tmp_path: Path) -> None:
    toml = write(
        tmp_path / "c.toml", '[generation]\ntypes = ["key_facts_to_qa", "key_facts_to_qa"]\n'
    )
    with pytest.raises(ConfigError) as excinfo:
        load(toml)
    (problem,) = problems_of(excinfo)
    assert problem.startswith("generation:")
    assert "twice" in problem


def test_unknown_generation_type(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", '[generation]\ntypes = ["key_facts_to_qa", "poetry"]\n')
    with pytest.raises(ConfigError) as excinfo:
        load(toml)
    (problem,) = problems_of(excinfo)
    assert problem.startswith("generation.types.1:")
    assert "document_based_qa" in problem


def test_no_generation_types(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", "[generation]\ntypes = []\n")
    with pytest.raises(ConfigError) as excinfo:
        load(toml)
    (problem,) = problems_of(excinfo)
    assert problem.startswith("generation.types:")


def test_teacher_that_is_not_a_table(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", 'teacher = "http://x"\n')
    with pytest.raises(ConfigError) as excinfo:
        load(toml)
    assert problems_of(excinfo) == ["teacher: must be a table"]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path / "nope.toml")
    (problem,) = problems_of(excinfo)
    assert "config file not found" in problem
    assert "nope.toml" in problem


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path)
    (problem,) = problems_of(excinfo)
    assert str(tmp_path) in problem


def test_toml_syntax_error(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", "[limits]\nmax_concurrency = = 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load(toml)
    (problem,) = problems_of(excinfo)
    assert "is not valid TOML" in problem
    assert "line 2" in problem


def test_toml_that_is_not_utf8(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_bytes(b'[teacher]\nmodel = "caf\xe9"\n')
    with pytest.raises(ConfigError) as excinfo:
        load(toml)
    (problem,) = problems_of(excinfo)
    assert "is not valid TOML" in problem


# --- the API key stays secret -------------------------------------------------------------


def test_api_key_is_secret_in_repr_and_str(tmp_path: Path) -> None:
    config = load(write(tmp_path / "c.toml", ""))
    assert isinstance(config.teacher.api_key, SecretStr)
    for text in (repr(config), str(config), repr(config.teacher), str(config.teacher)):
        assert SECRET not in text
    assert config.teacher.api_key.get_secret_value() == SECRET


def test_api_key_not_in_error_when_something_else_fails(tmp_path: Path) -> None:
    toml = write(
        tmp_path / "c.toml", '[teacher]\nstructured_output = "yaml"\n[limits]\nworkers = -1\n'
    )
    with pytest.raises(ConfigError) as excinfo:
        load(toml, ("teacher.bogus=1",), environ={**ENV, "TEACHER_MODEL_BASE_URL": "nourl"})
    assert len(excinfo.value.problems) == 3
    assert SECRET not in str(excinfo.value)
    assert SECRET not in repr(excinfo.value)


def test_api_key_from_set_is_secret_too(tmp_path: Path) -> None:
    config = load(write(tmp_path / "c.toml", ""), ('teacher.api_key="sk-from-cli"',))
    assert config.teacher.api_key == SecretStr("sk-from-cli")
    assert "sk-from-cli" not in repr(config)


# --- derived values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_concurrency", "workers", "expected"),
    [
        (32, 0, 32),  # 0: derived from the concurrency cap
        (256, 0, 256),
        (1, 0, 4),  # never fewer than 4
        (4, 0, 4),
        (32, 7, 7),  # explicit value wins, above or below the cap
        (2, 100, 100),
    ],
)
def test_workers_derivation(
    tmp_path: Path, max_concurrency: int, workers: int, expected: int
) -> None:
    toml = write(
        tmp_path / "c.toml",
        f"[limits]\nmax_concurrency = {max_concurrency}\nworkers = {workers}\n",
    )
    assert load(toml).workers == expected


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(write(tmp_path / "c.toml", ""))
    with pytest.raises(ValueError, match="frozen"):
        config.limits.max_concurrency = 1  # type: ignore[misc]


def test_no_endpoint_means_the_embedded_teacher(tmp_path: Path) -> None:
    config = load(write(tmp_path / "c.toml", ""), environ={})
    assert config.teacher.mode == "embedded"
    assert config.teacher.urls == ()


def test_embedded_backend_with_a_base_url_is_an_error(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", '[teacher]\nbackend = "embedded"\n')
    with pytest.raises(ConfigError) as excinfo:
        load(toml, environ=ENV)
    (problem,) = problems_of(excinfo)
    assert "backend is 'embedded' but base_url is set" in problem


def test_base_url_may_list_several_endpoints(tmp_path: Path) -> None:
    toml = write(
        tmp_path / "c.toml",
        '[teacher]\nbase_url = ["http://a:8000/v1/", "http://b:8000/v1"]\nmodel = "m"\n',
    )
    config = load(toml, environ={})
    assert config.teacher.mode == "http"
    assert config.teacher.urls == ("http://a:8000/v1", "http://b:8000/v1")


def test_base_url_from_the_environment_may_be_comma_separated(tmp_path: Path) -> None:
    environ = {**ENV, "TEACHER_MODEL_BASE_URL": "http://a/v1, http://b/v1"}
    config = load(write(tmp_path / "c.toml", ""), environ=environ)
    assert config.teacher.urls == ("http://a/v1", "http://b/v1")


def test_the_same_endpoint_twice_is_an_error(tmp_path: Path) -> None:
    environ = {**ENV, "TEACHER_MODEL_BASE_URL": "http://a/v1,http://a/v1/"}
    with pytest.raises(ConfigError) as excinfo:
        load(write(tmp_path / "c.toml", ""), environ=environ)
    assert "lists an endpoint twice" in problems_of(excinfo)[0]


# --- the key as users paste it ------------------------------------------------------------


@pytest.mark.parametrize(
    "pasted",
    [f"{SECRET}\n", f"  {SECRET}\r\n", f"\t{SECRET} ", f"{SECRET}\u00a0"],
    ids=["newline", "crlf", "tab-space", "nbsp"],
)
def test_whitespace_around_the_key_is_dropped(tmp_path: Path, pasted: str) -> None:
    toml = write(tmp_path / "c.toml", "")
    for environ, dotenv in (
        ({**ENV, "TEACHER_MODEL_API_KEY": pasted}, None),
        ({k: v for k, v in ENV.items() if k != "TEACHER_MODEL_API_KEY"}, pasted),
    ):
        env_file = None
        if dotenv is not None:
            env_file = write(tmp_path / ".env", f'TEACHER_MODEL_API_KEY="{dotenv}"\n')
        config = load(toml, environ=environ, dotenv_path=env_file)
        assert config.teacher.api_key == SecretStr(SECRET)
    # JSON escapes are TOML escapes too.
    config = load(toml, (f"teacher.api_key={json.dumps(pasted)}",))
    assert config.teacher.api_key == SecretStr(SECRET)


def test_a_blank_key_is_no_key(tmp_path: Path) -> None:
    config = load(write(tmp_path / "c.toml", ""), environ={**ENV, "TEACHER_MODEL_API_KEY": " \n"})
    assert config.teacher.api_key is None


def test_a_blank_variable_does_not_hide_the_key_in_dotenv(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", f"TEACHER_MODEL_API_KEY={SECRET}\n")
    environ = {**ENV, "TEACHER_MODEL_API_KEY": "\n"}
    config = load(write(tmp_path / "c.toml", ""), environ=environ, dotenv_path=env_file)
    assert config.teacher.api_key == SecretStr(SECRET)


@pytest.mark.parametrize(
    ("inside", "says"),
    [
        ("\n", "control character"),
        ("\r", "control character"),
        ("\t", "control character"),
        ("\x00", "control character"),
        ("\x7f", "control character"),
        ("\u200b", "control character"),  # a zero-width space from a web page
        ("\u201d", "non-ASCII"),  # a typographic quote
        ("é", "non-ASCII"),
    ],
)
def test_a_key_with_a_bad_character_inside_is_refused_in_one_line(
    tmp_path: Path, inside: str, says: str
) -> None:
    key = f"sk-abc{inside}def-0123456789"
    with pytest.raises(ConfigError) as excinfo:
        load(write(tmp_path / "c.toml", ""), environ={**ENV, "TEACHER_MODEL_API_KEY": key})
    (problem,) = problems_of(excinfo)
    assert problem.startswith("teacher.api_key: TEACHER_MODEL_API_KEY ")
    assert says in problem and "\n" not in problem
    for text in (str(excinfo.value), repr(excinfo.value)):
        assert "sk-abc" not in text and "def-0123456789" not in text


def test_spaces_around_the_model_name_are_dropped(tmp_path: Path) -> None:
    environ = {**ENV, "TEACHER_MODEL_NAME": " env-model\n"}
    assert load(write(tmp_path / "c.toml", ""), environ=environ).teacher.model == "env-model"


@pytest.mark.parametrize(
    "bad", ["TEACHER_MODEL_API_KEY='sk-it's-s3cret'", 'export TEACHER_MODEL_BASE_URL="http://h/v1']
)
def test_a_dotenv_line_that_does_not_parse_is_an_error_naming_the_line(
    tmp_path: Path, bad: str
) -> None:
    """python-dotenv skipped it with a warning: no key (401), or no base URL (the embedded
    demo teacher ran instead of the server)."""
    dotenv = write(tmp_path / ".env", f"# teacher\nOTHER=1\n{bad}\nTEACHER_MODEL_NAME=m\n")
    toml = write(tmp_path / "c.toml", "")
    with pytest.raises(ConfigError) as excinfo:
        load(toml, environ={}, dotenv_path=dotenv)
    (problem,) = problems_of(excinfo)
    name = "TEACHER_MODEL_API_KEY" if "API_KEY" in bad else "TEACHER_MODEL_BASE_URL"
    assert problem.startswith(f"{dotenv} line 3 cannot be read as NAME=value")
    assert f"so {name} is not set from it" in problem
    assert "s3cret" not in problem and "http://h" not in problem


def test_a_dotenv_line_that_does_not_parse_is_no_error_when_the_environment_sets_it(
    tmp_path: Path,
) -> None:
    dotenv = write(tmp_path / ".env", "TEACHER_MODEL_API_KEY='sk-it's'\nUNRELATED='x\n")
    toml = write(tmp_path / "c.toml", "")
    config = load(toml, environ=ENV, dotenv_path=dotenv)
    assert config.teacher.api_key is not None
    assert config.teacher.api_key.get_secret_value() == SECRET
