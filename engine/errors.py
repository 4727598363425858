"""The engine's exception hierarchy, grouped by what the caller can do about it.

- ``RetryableError``: the same request may succeed later (timeouts, resets, 429, 5xx).
- ``FatalRunError``: every request would fail the same way; stop the run (auth, config).
- ``ItemError``: this one item is lost (bad request, unparseable reply, bad seed row);
  record it and carry on.

Third-party exceptions (aiohttp, pydantic, orjson) are translated into these at one
boundary each and never leak upward.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(EngineError):
    """The configuration, the seed path or the output directory is unusable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class OutputInUse(ConfigError):
    """Another run holds the output directory (``engine.output.lock``): this one must not start."""

    def __init__(self, message: str) -> None:
        self.problems = [message]
        EngineError.__init__(self, message)


class FatalRunError(EngineError):
    """Every further request would fail the same way: the run must stop."""


class AuthError(FatalRunError):
    """The endpoint refused our credentials (401/403)."""

    def __init__(self, endpoint: str, status: int) -> None:
        self.endpoint = endpoint
        self.status = status
        super().__init__(
            f"the teacher at {endpoint} answered HTTP {status}: check TEACHER_MODEL_API_KEY "
            "(and that the key may use this model)"
        )


class TLSVerificationError(FatalRunError):
    """A server's certificate failed verification: every connection would fail the same way.

    ``host`` is the server whose certificate it was (the teacher's, or an https:// proxy's).
    """

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(message)


class ProxyRefused(FatalRunError):
    """The proxy refused the run's requests (407: credentials; 403: its policy)."""

    def __init__(self, proxy: str, status: int, message: str) -> None:
        self.proxy = proxy
        self.status = status
        super().__init__(message)


class Redirected(FatalRunError):
    """The endpoint answered with a redirect (3xx). It is never followed: clients that follow
    one re-send the POST as a GET (and drop the key on another host), and the server then
    answers 405 or 401, hiding the real cause. The user is asked for the final URL."""

    def __init__(self, url: str, status: int, location: str, suggestion: str = "") -> None:
        self.url = url
        self.status = status
        self.location = location
        self.suggestion = suggestion
        where = f"to {location}" if location else "without a Location"
        fix = (
            f"set TEACHER_MODEL_BASE_URL to the final URL, {suggestion}"
            if suggestion
            else "set TEACHER_MODEL_BASE_URL to the URL it ends at"
        )
        super().__init__(
            f"the teacher at {url} answered HTTP {status}, a redirect {where}: requests are "
            f"not re-sent to another URL (a POST would become a GET); {fix}"
        )


class OutputWriteError(FatalRunError):
    """An output file cannot be written: the disk is full, a quota is exceeded, the file system
    is read-only (``engine.output.files``). Every later write would fail the same way, so the
    run stops; what it committed stays, and the same command resumes it once the cause is gone.
    """

    def __init__(self, path: object, reason: str, remedy: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot write {path}: {reason}: {remedy} and run the same command again: "
            "nothing is lost"
        )


class SystematicFailure(FatalRunError):
    """Items keep being lost the same way across documents (``engine.pipeline.breaker``): every
    further request of the stage would be lost too."""


class PreflightFailed(FatalRunError):
    """The preflight (``engine.pipeline.preflight``) found the teacher unusable as configured; the
    message says what to change."""


class EmbeddedTeacherError(FatalRunError):
    """The embedded demo teacher (a local llama.cpp server) did not start or stopped."""


class RetryableError(EngineError):
    """A transient failure: the same request may succeed if sent again."""

    kind = "retryable"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        body: str = "",
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        self.body = body
        super().__init__(message)


class TeacherTimeout(RetryableError):
    """No reply within ``teacher.timeout_s`` (or no connection within
    ``teacher.connect_timeout_s``)."""

    kind = "timeout"


class TeacherConnectTimeout(TeacherTimeout):
    """No connection within ``teacher.connect_timeout_s``: nothing answered at that address
    (unlike a ``TeacherTimeout`` after connecting, where a server is there but slow)."""


class TeacherConnectionError(RetryableError):
    """The connection failed: refused, reset, closed mid-reply, a name that does not resolve."""

    kind = "connection"


class TeacherDNSError(TeacherConnectionError):
    """A host name (the teacher's, or the proxy's) did not resolve."""

    kind = "dns"


class TeacherHTTPError(RetryableError):
    """A retryable HTTP status (408, 409, 429, 5xx)."""

    kind = "http"


class MalformedResponse(RetryableError):
    """HTTP 200 whose body is not a chat completion (bad JSON, no ``choices``)."""

    kind = "malformed_response"


class ItemError(EngineError):
    """One item is lost; the run continues. ``kind`` names why, for the failure log."""

    kind = "item"

    def __init__(
        self, message: str, *, status: int | None = None, body: str = "", attempts: int = 1
    ) -> None:
        self.status = status
        self.body = body
        self.attempts = attempts
        super().__init__(message)


class RequestRejected(ItemError):
    """The endpoint rejected the request itself (400, 404, 413, 422): retrying cannot help."""

    kind = "request_rejected"


class RetriesExhausted(ItemError):
    """A retryable failure persisted through every allowed attempt."""

    kind = "retries_exhausted"


class InvalidReply(ItemError):
    """The teacher's reply did not parse or validate against the stage's schema.

    ``check`` names what the reply failed, as a stable short code for counting and grouping
    (``no_json``, ``schema``, ``cut_off``, ``no_choices``, ``duplicate``, ...); the message
    says the details.
    """

    kind = "invalid_reply"

    def __init__(
        self, message: str, *, check: str = "schema", body: str = "", attempts: int = 1
    ) -> None:
        self.check = check
        super().__init__(message, body=body, attempts=attempts)


class EndpointDown(FatalRunError):
    """The teacher stayed unreachable longer than ``retry.outage_max_s``."""

    def __init__(self, endpoint: str, seconds: float) -> None:
        self.endpoint = endpoint
        self.seconds = seconds
        super().__init__(
            f"the teacher at {endpoint} has been unreachable for {seconds:.0f} s "
            "(retry.outage_max_s): stopping; run the same command again to resume"
        )
