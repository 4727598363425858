"""Run statistics: plain counters shared by the client, the scheduler and the writer."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.output.records import Record
from engine.teacher.stats import RequestStats
from engine.text import normalise, size


@dataclass
class Kept:
    """Sums over the records one type kept, for the report's means (lengths in characters)."""

    units: int = 0  # units that kept at least one record
    questions: int = 0
    distinct_questions: int = 0  # distinct within their unit, summed over units
    question_chars: int = 0
    answer_chars: int = 0
    summaries: int = 0  # distinct summaries (summary types' documents)
    summary_chars: int = 0

    def add(self, records: Sequence[Record], summaries: bool) -> None:
        """Count one unit's records; ``summaries``: their documents are summaries."""
        if not records:
            return
        self.units += 1
        self.questions += len(records)
        self.distinct_questions += len({normalise(r.question) for r in records})
        self.question_chars += sum(size(r.question) for r in records)
        self.answer_chars += sum(size(r.response) for r in records)
        if summaries:
            documents = {r.document for r in records}
            self.summaries += len(documents)
            self.summary_chars += sum(size(d) for d in documents)

    def means(self) -> dict[str, float | None]:
        """Distinct questions per unit and mean lengths; None where nothing was kept."""
        return {
            "distinct_questions_per_unit": _mean(self.distinct_questions, self.units),
            "mean_question_chars": _mean(self.question_chars, self.questions),
            "mean_answer_chars": _mean(self.answer_chars, self.questions),
            "mean_summary_chars": _mean(self.summary_chars, self.summaries),
        }


def _mean(total: int, count: int) -> float | None:
    return round(total / count, 1) if count else None


@dataclass(frozen=True, slots=True)
class TeacherSnapshot:
    """What the run report shows of the teacher's endpoints and limiter, taken once, when the
    run's client closes (``engine.teacher.endpoints``, ``engine.teacher.limits``)."""

    # Per endpoint URL: "requests" routed there, "outages" (times it was found down) and
    # "down" (1 if it was down at the end, else 0).
    endpoints: Mapping[str, Mapping[str, int]]
    concurrency: int  # requests allowed in flight at the end
    concurrency_cuts: int  # times a 429 cut that allowance
    # The run's own limits.max_concurrency (the embedded demo lowers it to 1); 0: unknown.
    concurrency_max: int = 0


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    """The response cache as the run left it (``engine.teacher.cache``): its file, the bytes
    in use, its bound (bytes; 0: none), and the entries stored and evicted by this run."""

    path: str
    size_bytes: int
    max_bytes: int
    stored: int
    evicted: int


@dataclass
class Stats:
    """What the run has done so far. Single-threaded (one event loop): no locks needed."""

    started: float = field(default_factory=time.monotonic)
    # Wall-clock start, for the run report (``started`` is monotonic and means nothing outside).
    started_at: float = field(default_factory=time.time)
    # What the run's teacher client sent and got (engine.teacher.stats): requests, retries,
    # cache hits, tokens; the preflight's requests apart.
    teacher: RequestStats = field(default_factory=RequestStats)
    preflight_ran: bool = False
    # What the preflight changed in the requests for this server, in words.
    adapted: list[str] = field(default_factory=list)
    # Failed items by kind (request_rejected, retries_exhausted, ...).
    failures: Counter[str] = field(default_factory=Counter)
    # Items lost by earlier runs in the units this run runs again, by reason ("kind: check"
    # or "kind: HTTP status"); how many of them this run won; and the items failures.jsonl
    # lists for the run's types at the end, by reason (engine.output.writer).
    lost_before: Counter[str] = field(default_factory=Counter)
    recovered: int = 0
    still_lost: Counter[str] = field(default_factory=Counter)
    units_done: Counter[str] = field(default_factory=Counter)
    units_skipped: Counter[str] = field(default_factory=Counter)
    # By type: units that lost at least one item, and the items they lost.
    units_failed: Counter[str] = field(default_factory=Counter)
    items_failed: Counter[str] = field(default_factory=Counter)
    records: Counter[str] = field(default_factory=Counter)
    judged_out: Counter[str] = field(default_factory=Counter)
    rejects: int = 0
    # Valid rows in the seed file, once counted (engine.progress.display); None until then.
    seed_rows: int | None = None
    # The teacher as the run used it (the embedded one, when no endpoint was configured).
    teacher_model: str = ""
    # Its endpoints and limiter as the run left them; None until the run's client closes.
    teacher_at_end: TeacherSnapshot | None = None
    # The response cache as the run left it; None without one (--no-cache) or until closed.
    cache_at_end: CacheSnapshot | None = None
    # Reply choices by stage ("type/stage"): all of them, and the rejected ones by check
    # (schema checks such as no_json and the content checks of engine.flows.quality alike).
    replies: Counter[str] = field(default_factory=Counter)
    rejected: dict[str, Counter[str]] = field(default_factory=dict)
    # By type: what the records that were kept look like.
    kept: dict[str, Kept] = field(default_factory=dict)
    # A run on several workers (engine.distributed): JSON-ready, for the report's "ray"
    # section (workers, their units and requests, units run again, the shared limiter).
    distributed: dict[str, Any] | None = None

    def count_reply(self, stage: str, check: str = "") -> None:
        """Count one reply choice of ``stage``: accepted (``check`` "") or rejected by it."""
        self.replies[stage] += 1
        if check:
            self.rejected.setdefault(stage, Counter())[check] += 1

    @property
    def replies_rejected(self) -> int:
        """Reply choices rejected by any check, over all stages."""
        return sum(c.total() for c in self.rejected.values())

    def kept_records(self, gen_type: str, records: Sequence[Record]) -> None:
        """Count one written unit's records into the type's kept-data measures."""
        kept = self.kept.setdefault(gen_type, Kept())
        kept.add(records, summaries=gen_type.endswith("_summary"))

    def unit_written(
        self, gen_type: str, records: int, judged_out: int, failure_kinds: Iterable[str]
    ) -> None:
        """Count one finished unit, as the writer committed it."""
        kinds = Counter(failure_kinds)
        self.units_done[gen_type] += 1
        self.records[gen_type] += records
        self.judged_out[gen_type] += judged_out
        self.failures.update(kinds)
        if kinds:
            self.units_failed[gen_type] += 1
            self.items_failed[gen_type] += kinds.total()

    def elapsed(self) -> float:
        """Seconds since the run started (monotonic clock)."""
        return time.monotonic() - self.started

    def summary(self) -> str:
        """One human line: what was written, failed and sent."""
        requests = self.teacher
        return (
            f"units done {sum(self.units_done.values())} "
            f"(skipped as already done {sum(self.units_skipped.values())}), "
            f"records {sum(self.records.values())}, failed items {sum(self.failures.values())}, "
            f"judged out {sum(self.judged_out.values())}, rejected rows {self.rejects}, "
            f"replies rejected {self.replies_rejected}/{self.replies.total()}, "
            f"requests {requests.requests_sent} (retries {requests.retries.total()}), "
            f"from cache {requests.cache_hits}, "
            f"tokens in/out {requests.prompt_tokens}/{requests.completion_tokens}, "
            f"{self.elapsed():.1f}s"
        )

    def __repr__(self) -> str:
        return f"<Stats {self.summary()}>"
