"""``RequestStats``: what the teacher client sent and what came back, as plain counters.

Owned by ``HTTPTeacher`` (or passed to it), written only by it; the run's statistics
(``engine.pipeline.stats.Stats.teacher``) hold the one the run's client writes, and the
report and the progress display read it there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RequestStats:
    """Counters of one client's traffic. Single event loop: no locks.

    - ``requests_sent``: chat-completion requests sent, every attempt counted (those the
      preflight's ``probe`` sends are not: they are ``preflight_requests``).
    - ``cache_hits``: requests answered from the response cache: nothing sent, no tokens.
    - ``retries``: failed attempts sent again, by reason: the HTTP status (``"429"``,
      ``"503"``) or the failure's kind (``"timeout"``, ``"connection"``, ``"dns"``,
      ``"malformed_response"``), as ``engine.teacher.retry.retry_reason`` names it.
    - ``prompt_tokens`` / ``completion_tokens``: the tokens the server's ``usage`` reported
      for the replies received (0 for a reply without usage; cache hits add nothing).
    """

    requests_sent: int = 0
    preflight_requests: int = 0
    cache_hits: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __repr__(self) -> str:
        return (
            f"<RequestStats sent={self.requests_sent} retries={self.retries.total()} "
            f"cache_hits={self.cache_hits} preflight={self.preflight_requests} "
            f"tokens={self.prompt_tokens}/{self.completion_tokens}>"
        )
