"""Run statistics: plain counters shared by the client, the scheduler and the writer."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    """What the run has done so far. Single-threaded (one event loop): no locks needed."""

    started: float = field(default_factory=time.monotonic)
    requests_sent: int = 0
    # Replies taken from the response cache: no request sent, no tokens spent.
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    units_done: Counter[str] = field(default_factory=Counter)
    units_skipped: Counter[str] = field(default_factory=Counter)
    records: Counter[str] = field(default_factory=Counter)
    judged_out: Counter[str] = field(default_factory=Counter)
    rejects: int = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        """One human line: what was written, failed and sent."""
        return (
            f"units done {sum(self.units_done.values())} "
            f"(skipped as already done {sum(self.units_skipped.values())}), "
            f"records {sum(self.records.values())}, failed items {sum(self.failures.values())}, "
            f"judged out {sum(self.judged_out.values())}, rejected rows {self.rejects}, "
            f"requests {self.requests_sent} (retries {sum(self.retries.values())}), "
            f"from cache {self.cached}, "
            f"tokens in/out {self.prompt_tokens}/{self.completion_tokens}, "
            f"{self.elapsed():.1f}s"
        )

    def __repr__(self) -> str:
        return f"<Stats {self.summary()}>"
