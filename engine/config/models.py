"""The configuration's shape: one pydantic model per TOML section, with bounds on every number.

Attribute docstrings are the keys' descriptions: the README's reference is generated from them
(``engine.config.reference``). ``engine.config.load`` fills the models from files and the
environment.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from engine.config.certificates import ca_bundle_problem

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
    # Attribute docstrings are the field descriptions: the README's config reference is
    # generated from them (engine.config.reference).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class InputConfig(_Section):
    """``[input]``: the seed file and which of its rows are usable."""

    seeds: Path = Path("config/sample_seeds.jsonl")
    """Module 2's seed_data.jsonl: one JSON object per line with document,
    document_outline, domain, icl_document, icl_query_1..3. Read as a stream, gzip, bzip2
    or xz compressed or not."""
    max_document_chars: int = Field(60_000, ge=1, le=10_000_000)
    """Rows whose document is longer than this (characters) go to rejects.jsonl."""


class OutputConfig(_Section):
    """``[output]``: where the datasets, logs, report and response cache go."""

    dir: Path = Path("output/step_03")
    """Where <type>/gen.jsonl, failures.jsonl, rejects.jsonl, the resume state
    (progress.jsonl, state.sqlite) and run_report.json go."""
    cache: str = ""
    """The response cache (one SQLite file); "" = <dir>/cache.sqlite."""
    cache_max_gb: float = Field(10.0, gt=0, le=1_000_000)
    """The response cache's size bound, in GB (10^9 bytes): past it the oldest entries are
    evicted and the file shrinks."""

    @property
    def cache_max_bytes(self) -> int:
        """``cache_max_gb`` in bytes."""
        return int(self.cache_max_gb * 1e9)


class TeacherConfig(_Section):
    """``[teacher]``: the endpoint(s), model, credentials, timeouts, TLS and request shape."""

    backend: Literal["auto", "http", "embedded"] = "auto"
    """"auto": "http" when a base_url is set, else "embedded" (a tiny local demo model,
    started and stopped by the run)."""
    base_url: str | list[str] = ""
    """The OpenAI-compatible endpoint, e.g. http://localhost:8000/v1, or a list of replicas
    of one model (TEACHER_MODEL_BASE_URL: commas). Usually set via TEACHER_MODEL_BASE_URL."""
    model: str = ""
    """The model name the endpoint serves. Usually set via TEACHER_MODEL_NAME."""
    api_key: SecretStr | None = None
    """Sent as a Bearer token. Set it only via TEACHER_MODEL_API_KEY (environment or .env).
    Whitespace around it (a pasted newline) is dropped; a control character inside it is an
    error."""
    ca_bundle: str = ""
    """A PEM file of CA certificates to trust besides the system's (an endpoint behind a
    private certificate authority); "" = the system's only (SSL_CERT_FILE / SSL_CERT_DIR are
    honoured as usual). Proxies come from HTTPS_PROXY / HTTP_PROXY / NO_PROXY."""
    timeout_s: float = Field(600.0, gt=0, le=24 * 3600)
    """Per request; keep it above the longest legitimate reply (a retry starts over)."""
    connect_timeout_s: float = Field(10.0, gt=0, le=600)
    """Time to open a connection."""
    structured_output: Literal["json_schema", "json_object", "text"] = "json_schema"
    """How replies are held to each stage's schema: json_schema (OpenAI, vLLM), json_object
    (llama.cpp), or text (schema in the prompt, first JSON value taken from the reply)."""
    supports_n: bool = True
    """false: ask for N samples as N requests instead of one request with n=N."""

    @field_validator("api_key", mode="before")
    @classmethod
    def _clean_key(cls, value: Any) -> Any:
        """Surrounding whitespace (a key pasted with its newline) is dropped; a blank key is no
        key; a key with a character that cannot be in a Bearer token is refused, by naming the
        variable, never the value."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        key = value.strip()
        if problem := _key_problem(key):
            raise ValueError(f"TEACHER_MODEL_API_KEY {problem}")
        return key or None

    @field_validator("ca_bundle")
    @classmethod
    def _readable_bundle(cls, value: str) -> str:
        if value and (problem := ca_bundle_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _strip_model(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @property
    def urls(self) -> tuple[str, ...]:
        """The endpoint URLs, without trailing slashes, in the order given."""
        return tuple(_split_credentials(url)[0] for url in self._given_urls())

    @property
    def url_credentials(self) -> dict[str, tuple[str, str]]:
        """The user and password (percent-decoded) given in an endpoint URL
        (``http://user:password@host/v1``), by the endpoint's origin (``http://host``), sent
        as HTTP Basic authentication; ``urls`` never holds them, so no message shows them."""
        found = (_split_credentials(url) for url in self._given_urls())
        return {_origin(url): pair for url, pair in found if pair is not None}

    def _given_urls(self) -> tuple[str, ...]:
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
            if "?" in url or "#" in url:
                shown = url.split("?")[0].split("#")[0]
                raise ValueError(
                    f"base_url {shown}?... has a query string or fragment: the engine appends "
                    "/chat/completions and /models to the base URL, so it must end with the "
                    f"path (e.g. {shown}); a key goes in TEACHER_MODEL_API_KEY"
                )
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        if self.url_credentials and self.api_key is not None:
            raise ValueError(
                "base_url has credentials in it (user:password@ before the host) and "
                "TEACHER_MODEL_API_KEY is set: both would be the request's Authorization "
                "header; keep one (the key is sent as a Bearer token, the URL's credentials "
                "as HTTP Basic authentication)"
            )
        if len(set(urls)) != len(urls):
            raise ValueError(f"base_url lists an endpoint twice: {list(urls)}")
        if not self.model:
            raise ValueError(
                "no teacher model: set TEACHER_MODEL_NAME (environment or .env) or teacher.model"
            )
        return self


class LimitsConfig(_Section):
    """``[limits]``: requests and tokens per minute, requests in flight, units at once."""

    requests_per_minute: int = Field(600, ge=1, le=1_000_000)
    """Requests per minute, paced: at most half a second of quota goes out at once."""
    tokens_per_minute: int = Field(0, ge=0, le=1_000_000_000)
    """Prompt plus completion tokens per minute; 0 = no token cap. Each request reserves
    its estimated prompt plus max_tokens per choice; the reply's usage settles it."""
    max_concurrency: int = Field(32, ge=1, le=4096)
    """Requests in flight, at most (halved on 429, grown back on success). vLLM never
    answers 429: this cap is its only protection."""
    workers: int = Field(0, ge=0, le=4096)
    """(document, type) units worked on at once; 0 = max(4, max_concurrency)."""


class RetryConfig(_Section):
    """``[retry]``: retries and back-off, invalid-reply re-asks, outages and the breaker."""

    max_attempts: int = Field(6, ge=1, le=100)
    """Attempts per request for timeouts, resets, 408/409/429/5xx and malformed replies."""
    backoff_base_s: float = Field(0.5, ge=0, le=60)
    """Back-off: uniform(0, min(backoff_max_s, backoff_base_s x 2^attempt)) seconds."""
    backoff_max_s: float = Field(30.0, ge=0, le=3600)
    """The longest back-off between two attempts."""
    retry_after_max_s: float = Field(120.0, ge=0, le=3600)
    """A server's Retry-After is honoured up to this many seconds."""
    invalid_reply_attempts: int = Field(3, ge=1, le=20)
    """A reply that does not match the stage's schema is asked again, this many times in all."""
    outage_threshold: int = Field(5, ge=1, le=10_000)
    """Different requests failing in a row as if the endpoint were gone (refused, reset,
    timeout, 502/503/504) that mark it down: dispatch to it pauses, one probe at a time."""
    outage_probe_base_s: float = Field(1.0, gt=0, le=600)
    """The first pause before probing an endpoint that is down; doubles per failed probe."""
    outage_probe_max_s: float = Field(30.0, gt=0, le=3600)
    """The longest pause between two probes."""
    outage_max_s: float = Field(3600.0, gt=0, le=7 * 24 * 3600)
    """Stop the run (resumably) when every endpoint has been down this long."""
    breaker_documents: int = Field(5, ge=0, le=100_000)
    """Stop the run when this many different documents lost items of one stage the same
    way (same HTTP status, or same reply check) before any item of that stage succeeded;
    0 = never stop on repeated losses."""
    breaker_window: int = Field(50, ge=1, le=100_000)
    """Once a stage has succeeded: the last items of the stage (won or lost) that the
    breaker weighs."""
    breaker_share: float = Field(0.8, gt=0, le=1)
    """Stop the run when this share of a stage's last breaker_window items were lost the
    same way, from at least breaker_documents different documents."""
    breaker_reject_share: float = Field(0.5, gt=0, le=1)
    """Stop the run when this share of a stage's last breaker_window reply choices were
    rejected by the reply checks (schema or quality gates), from at least breaker_documents
    different documents: ten times a capable teacher's usual rate, a teacher that mostly
    writes junk."""


class RunConfig(_Section):
    """``[run]``: where units run, signal grace period and progress logging."""

    backend: Literal["local", "ray"] = "local"
    """"local": this process runs every unit. "ray": worker actors on a Ray cluster run them
    (see [ray]), while this process keeps the seeds, the resume state, the one writer and the
    report; needs the ray extra (pip install -e ".[ray]")."""

    grace_s: float = Field(30.0, ge=0, le=3600)
    """After SIGINT/SIGTERM, units in flight get this long to finish; a second signal stops
    at once."""
    progress_interval_s: float = Field(60.0, gt=0, le=24 * 3600)
    """When stdout is not a terminal (nohup, systemd, CI): a progress log line this often."""


class RayConfig(_Section):
    """``[ray]``: the cluster a run with ``run.backend = "ray"`` uses, and its workers."""

    address: str = ""
    """The Ray cluster to join, e.g. "ray-head:6379"; "" = RAY_ADDRESS if set (ray job submit
    sets it), else a Ray started for the run on this machine, bound to 127.0.0.1 and stopped
    at its end."""
    workers: int = Field(0, ge=0, le=4096)
    """Worker actors (each runs flows with its own HTTP client and response cache); 0 = one
    per node alive when the run starts."""
    worker_cpus: float = Field(1.0, ge=0, le=1024)
    """CPUs a worker actor reserves on its node (Ray's num_cpus)."""
    lost_workers_max_s: float = Field(600.0, gt=0, le=7 * 24 * 3600)
    """Stop the run (resumably) when no worker has been alive this long."""


class _StageKnobs(_Section):
    temperature: float = Field(0.7, ge=0, le=2)
    """Sampling temperature of the type's first stage (summaries, key facts, questions)."""
    max_tokens: int = Field(2048, ge=16, le=131_072)
    """max_tokens of the first stage, per choice."""
    qa_temperature: float = Field(0.3, ge=0, le=2)
    """Temperature of the question and answer stages."""
    qa_max_tokens: int = Field(1024, ge=16, le=131_072)
    """max_tokens of the question and answer stages."""


class SummaryConfig(_StageKnobs):
    """``[generation.extractive_summary]`` / ``[generation.detailed_summary]``: N summaries
    of each chunk, questions on each summary, an answer per question."""

    summaries: int = Field(50, ge=1, le=1000)
    """Summaries per chunk (one request with n=N when the teacher supports n)."""
    questions_per_summary: int = Field(5, ge=1, le=100)
    """Questions asked of each summary, each answered once."""
    temperature: float = Field(1.0, ge=0, le=2)
    """Sampling temperature of the summaries: high, so the N summaries differ."""


class KeyFactsConfig(_StageKnobs):
    """``[generation.key_facts_to_qa]``: key facts of each chunk, question/answer pairs per
    fact."""

    max_facts: int = Field(30, ge=1, le=500)
    """At most this many key facts per chunk."""
    qa_per_fact: int = Field(5, ge=1, le=100)
    """Question/answer pairs per fact."""
    temperature: float = Field(0.2, ge=0, le=2)
    """Sampling temperature of the key-facts stage."""


class DocumentQAConfig(_StageKnobs):
    """``[generation.document_based_qa]``: questions on each chunk, an answer per question."""

    questions: int = Field(10, ge=1, le=200)
    """Questions asked directly of each chunk, each answered once."""


class GenerationConfig(_Section):
    """``[generation]``: the types to generate, the judge, and each type's own section."""

    types: list[GenType] = Field(default_factory=lambda: list(GEN_TYPES), min_length=1)
    """The datasets to generate, each into <output.dir>/<type>/gen.jsonl."""
    judge: bool = False
    """Check each answer for faithfulness; unfaithful pairs are dropped and counted."""
    judge_temperature: float = Field(0.0, ge=0, le=2)
    """Temperature of the judge."""
    judge_max_tokens: int = Field(512, ge=16, le=131_072)
    """max_tokens of the judge."""
    extractive_summary: SummaryConfig = SummaryConfig()
    detailed_summary: SummaryConfig = SummaryConfig()
    key_facts_to_qa: KeyFactsConfig = KeyFactsConfig()
    document_based_qa: DocumentQAConfig = DocumentQAConfig()

    @model_validator(mode="after")
    def _no_repeats(self) -> GenerationConfig:
        if len(set(self.types)) != len(self.types):
            raise ValueError(f"types lists a type twice: {self.types}")
        return self


class QualityConfig(_Section):
    """Content checks on every reply (engine.flows.quality), on top of its schema. A reply that
    fails one is asked again within retry.invalid_reply_attempts. Lengths are characters,
    bounded relative to the text the reply was made from (its source)."""

    enabled: bool = True
    """false: only the schema is checked (no content checks, no duplicate re-asks)."""
    summary_min_ratio: float = Field(0.05, ge=0, le=1)
    """A summary has at least this share of its chunk's length. The prompts ask for a
    quarter to a third (extractive) or more (detailed): a twentieth is only a label."""
    summary_max_ratio: float = Field(2.0, gt=0, le=100)
    """A summary has at most this multiple of its chunk's length (detailed summaries of short
    chunks run longer than the chunk; far longer is a model looping)."""
    question_max_ratio: float = Field(1.0, gt=0, le=100)
    """A question is at most as long as this multiple of its source (chunk, summary or key
    fact): longer is the source or the prompt echoed back."""
    question_min_chars: int = Field(4, ge=1, le=1_000)
    """A question has at least this many characters: "a" or "Q?" names nothing it could be
    about, while the shortest real ones ("Why?", "长江多长?") have four or five."""
    question_max_chars: int = Field(1000, ge=1, le=1_000_000)
    """A question is never longer than this many characters, whatever its source: a
    thousand characters is a paragraph, not a question."""
    answer_max_ratio: float = Field(2.0, gt=0, le=100)
    """An answer is at most this multiple of its source's length: an answer may explain, but
    one twice as long as everything it may use adds what the source does not say."""
    fact_max_ratio: float = Field(1.5, gt=0, le=100)
    """A key fact, and its context, at most this multiple of the chunk's length."""
    length_floor_chars: int = Field(200, ge=1, le=1_000_000)
    """The maxima above are never below this many characters (a short source still gets a
    full sentence)."""
    echo_min_chars: int = Field(20, ge=1, le=10_000)
    """A sentence of the prompt's instructions or of the seed's example document counts as
    copied when a reply holds it whole and it has at least this many characters."""


class Config(_Section):
    """The whole configuration, one field per TOML section (``load_config`` builds it)."""

    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    teacher: TeacherConfig
    limits: LimitsConfig = LimitsConfig()
    retry: RetryConfig = RetryConfig()
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    generation: GenerationConfig = GenerationConfig()
    quality: QualityConfig = QualityConfig()

    @property
    def workers(self) -> int:
        """Units worked on at once: enough that the request cap stays saturated."""
        return self.limits.workers or max(4, self.limits.max_concurrency)


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its ``user:password@`` part, and that part (percent-decoded), if any.
    The authority is what comes after the scheme's ``//`` (if any), up to the path."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    cut = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    return f"{scheme}{sep}{host}{path}", (unquote(user), unquote(password))


def _origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: the part that credentials belong to."""
    return "/".join(url.split("/", 3)[:3])


def _key_problem(key: str) -> str | None:
    """What makes ``key`` unusable in an Authorization header, in words that do not show it."""
    for char in key:
        if unicodedata.category(char).startswith("C"):
            return (
                "has a control character inside it (a line break or tab pasted into it?): "
                "set it again as one line"
            )
    if not key.isascii():
        return (
            "has a non-ASCII character in it (a typographic quote or a letter pasted with "
            "it?): set it again, exactly as issued"
        )
    return None
