"""Configuration: pydantic models and ``load_config`` (TOML, then environment, then ``--set``).

Precedence, lowest to highest: model defaults, the TOML file, ``.env`` in the working
directory, the real environment, ``--set section.key=value`` overrides.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from engine.errors import ConfigError

GenType = Literal["extractive_summary", "detailed_summary", "key_facts_to_qa", "document_based_qa"]
GEN_TYPES: tuple[GenType, ...] = (
    "extractive_summary",
    "detailed_summary",
    "key_facts_to_qa",
    "document_based_qa",
)
ENV_KEYS = {
    "TEACHER_MODEL_BASE_URL": "base_url",
    "TEACHER_MODEL_API_KEY": "api_key",
    "TEACHER_MODEL_NAME": "model",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    seeds: Path = Path("config/sample_seeds.jsonl")
    max_document_chars: int = Field(60_000, ge=1, le=10_000_000)


class OutputConfig(_Section):
    dir: Path = Path("output/step_03")
    # The response cache (SQLite); "" = <dir>/cache.sqlite.
    cache: str = ""


class TeacherConfig(_Section):
    # "auto": "http" when a base_url is set, else "embedded" (a small local demo model).
    backend: Literal["auto", "http", "embedded"] = "auto"
    # One URL, or a list of replicas serving the same model (least-loaded healthy one wins).
    # TEACHER_MODEL_BASE_URL may list several, separated by commas.
    base_url: str | list[str] = ""
    model: str = ""
    api_key: SecretStr | None = None
    timeout_s: float = Field(600.0, gt=0, le=24 * 3600)
    connect_timeout_s: float = Field(10.0, gt=0, le=600)
    structured_output: Literal["json_schema", "json_object", "text"] = "json_schema"
    supports_n: bool = True

    @property
    def urls(self) -> tuple[str, ...]:
        """The endpoint URLs, without trailing slashes, in the order given."""
        items = [self.base_url] if isinstance(self.base_url, str) else self.base_url
        parts = (part.strip() for item in items for part in item.split(","))
        return tuple(part.rstrip("/") for part in parts if part)

    @property
    def mode(self) -> Literal["http", "embedded"]:
        """The backend in use once "auto" is decided."""
        if self.backend == "auto":
            return "http" if self.urls else "embedded"
        return self.backend

    @model_validator(mode="after")
    def _endpoint_given(self) -> TeacherConfig:
        urls = self.urls
        if self.mode == "embedded":
            if urls and self.backend == "embedded":
                raise ValueError(
                    "backend is 'embedded' but base_url is set: remove base_url (and "
                    "TEACHER_MODEL_BASE_URL) or set backend = 'http'"
                )
            return self
        if not urls:
            raise ValueError(
                "no teacher endpoint: set TEACHER_MODEL_BASE_URL (environment or .env) "
                "or teacher.base_url, e.g. http://localhost:8000/v1"
            )
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        if len(set(urls)) != len(urls):
            raise ValueError(f"base_url lists an endpoint twice: {list(urls)}")
        if not self.model:
            raise ValueError(
                "no teacher model: set TEACHER_MODEL_NAME (environment or .env) or teacher.model"
            )
        return self


class LimitsConfig(_Section):
    requests_per_minute: int = Field(600, ge=1, le=1_000_000)
    # Prompt plus completion tokens per minute; 0 = no token cap. Each request reserves an
    # estimate (prompt size + max_tokens x choices) and the estimate is settled from `usage`.
    tokens_per_minute: int = Field(0, ge=0, le=1_000_000_000)
    max_concurrency: int = Field(32, ge=1, le=4096)
    # Units (document x type) open at once; 0 = derived from max_concurrency.
    workers: int = Field(0, ge=0, le=4096)


class RetryConfig(_Section):
    max_attempts: int = Field(6, ge=1, le=100)
    backoff_base_s: float = Field(0.5, ge=0, le=60)
    backoff_max_s: float = Field(30.0, ge=0, le=3600)
    retry_after_max_s: float = Field(120.0, ge=0, le=3600)
    # Replies that do not parse/validate against the stage's schema are asked again this often.
    invalid_reply_attempts: int = Field(3, ge=1, le=20)
    # Failures in a row, across requests, that mean the endpoint is down (refused, reset,
    # timeout, 502/503/504): dispatch pauses and one probe at a time checks for its return.
    outage_threshold: int = Field(5, ge=1, le=10_000)
    outage_probe_base_s: float = Field(1.0, gt=0, le=600)
    outage_probe_max_s: float = Field(30.0, gt=0, le=3600)
    # Stop (resumably) when the endpoint has been down this long.
    outage_max_s: float = Field(3600.0, gt=0, le=7 * 24 * 3600)


class RunConfig(_Section):
    # After SIGINT/SIGTERM, units in flight get this long to finish before they are cancelled.
    grace_s: float = Field(30.0, ge=0, le=3600)
    # When stdout is not a terminal, a progress line this often (seconds).
    progress_interval_s: float = Field(60.0, gt=0, le=24 * 3600)


class _StageKnobs(_Section):
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(2048, ge=16, le=131_072)
    qa_temperature: float = Field(0.3, ge=0, le=2)
    qa_max_tokens: int = Field(1024, ge=16, le=131_072)


class SummaryConfig(_StageKnobs):
    summaries: int = Field(50, ge=1, le=1000)
    questions_per_summary: int = Field(5, ge=1, le=100)
    temperature: float = Field(1.0, ge=0, le=2)


class KeyFactsConfig(_StageKnobs):
    max_facts: int = Field(30, ge=1, le=500)
    qa_per_fact: int = Field(5, ge=1, le=100)
    temperature: float = Field(0.2, ge=0, le=2)


class DocumentQAConfig(_StageKnobs):
    questions: int = Field(10, ge=1, le=200)


class GenerationConfig(_Section):
    types: list[GenType] = Field(default_factory=lambda: list(GEN_TYPES), min_length=1)
    judge: bool = False
    judge_temperature: float = Field(0.0, ge=0, le=2)
    judge_max_tokens: int = Field(512, ge=16, le=131_072)
    extractive_summary: SummaryConfig = SummaryConfig()
    detailed_summary: SummaryConfig = SummaryConfig()
    key_facts_to_qa: KeyFactsConfig = KeyFactsConfig()
    document_based_qa: DocumentQAConfig = DocumentQAConfig()

    @model_validator(mode="after")
    def _no_repeats(self) -> GenerationConfig:
        if len(set(self.types)) != len(self.types):
            raise ValueError(f"types lists a type twice: {self.types}")
        return self


class Config(_Section):
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    teacher: TeacherConfig
    limits: LimitsConfig = LimitsConfig()
    retry: RetryConfig = RetryConfig()
    run: RunConfig = RunConfig()
    generation: GenerationConfig = GenerationConfig()

    @property
    def workers(self) -> int:
        """Units worked on at once: enough that the request cap stays saturated."""
        return self.limits.workers or max(4, self.limits.max_concurrency)


def load_config(
    path: Path | str,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    dotenv_path: Path | None = None,
) -> Config:
    """Read ``path`` (TOML), merge environment and ``--set`` overrides, validate.

    Raises ``ConfigError`` listing every problem found.
    """
    raw = _read_toml(Path(path))
    env = _environment(environ, dotenv_path)
    teacher = raw.setdefault("teacher", {})
    if not isinstance(teacher, dict):
        raise ConfigError(["teacher: must be a table"])
    for env_key, field in ENV_KEYS.items():
        if env.get(env_key):
            teacher[field] = env[env_key]
    problems: list[str] = []
    for item in overrides:
        try:
            _apply_override(raw, item)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError([_describe(e) for e in err.errors()]) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except OSError as err:  # a directory, no permission: still a config problem, not a crash
        raise ConfigError([f"cannot read config file {path}: {err.strerror or err}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path} is not valid TOML: {err}"]) from None


def _environment(environ: Mapping[str, str] | None, dotenv_path: Path | None) -> dict[str, str]:
    dotenv_file = dotenv_path if dotenv_path is not None else Path.cwd() / ".env"
    merged = {k: v for k, v in dotenv_values(dotenv_file).items() if v}
    # An empty variable in the environment does not hide a value set in .env.
    merged.update((k, v) for k, v in (os.environ if environ is None else environ).items() if v)
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        # Not echoed: a mistyped "--set teacher.api_key sk-..." must not print the key.
        raise ValueError("a --set argument has no '=' or no key: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: take it as a string
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {part} is not a table")
        node = child
    node[leaf] = value


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (check its spelling against config/default.toml)"
    return f"{where}: {message}"
