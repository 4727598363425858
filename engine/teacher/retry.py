"""Retry policy as pure functions: what a status means, how long the server asks us to wait,
and how long to back off. No I/O; the client (``engine.teacher.client``) applies them.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import Literal

from engine.errors import RetryableError, TeacherHTTPError

Decision = Literal["ok", "retry", "reject", "auth", "redirect"]

# Statuses worth sending again as they are (the same set the OpenAI SDK retries, plus 5xx).
# llama.cpp reports a malformed request as 500, so a bad request may be retried in vain; the
# attempt bound is what limits that.
_RETRYABLE = frozenset({408, 409, 429})
_AUTH = frozenset({401, 403})

# A server-given wait is stretched by up to this share (at most _JITTER_MAX_S), so requests
# refused together do not all come back in the same instant.
_JITTER_SHARE = 0.1
_JITTER_MAX_S = 1.0


def classify(status: int) -> Decision:
    """What to do with an HTTP status: use the reply, retry, give up on the item, stop the run
    (``auth``: the credentials; ``redirect``: the URL, as a POST is never followed)."""
    if 200 <= status < 300:
        return "ok"
    if status in _AUTH:
        return "auth"
    if 300 <= status < 400:
        return "redirect"
    if status in _RETRYABLE or 500 <= status < 600:
        return "retry"
    return "reject"


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, or None if it did not say (or said nonsense).

    ``retry-after-ms`` wins over ``retry-after``; the latter may be seconds or an HTTP date,
    read against ``now`` (epoch seconds, default the wall clock). A date in the past counts
    as not said, so our own back-off applies.
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    millis = _seconds(lowered.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = lowered.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    return _until_date(value, time.time() if now is None else now)


def backoff(
    attempt: int,
    retry_after: float | None,
    *,
    base: float,
    cap: float,
    retry_after_cap: float,
    rng: random.Random | Callable[[], float],
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    The server's ``retry_after`` (capped at ``retry_after_cap``) plus a little jitter, never
    less; otherwise full jitter: uniform over ``[0, min(cap, base * 2**(attempt-1))]``.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    uniform = rng.random if isinstance(rng, random.Random) else rng
    if retry_after is not None:
        wait = min(retry_after, retry_after_cap)
        return wait + uniform() * min(_JITTER_MAX_S, wait * _JITTER_SHARE)
    # The exponent is bounded so a large attempt number cannot overflow the float.
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 64))
    return uniform() * ceiling


def retry_reason(err: RetryableError) -> str:
    """The reason a failed attempt is counted under: its HTTP status (``"503"``) for an
    HTTP error, else its kind (``"timeout"``, ``"connection"``, ``"dns"``,
    ``"malformed_response"``)."""
    return str(err.status) if isinstance(err, TeacherHTTPError) else err.kind


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _until_date(value: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with no claim about local time
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp() - now
    return seconds if seconds >= 0 else None
