"""The run report: what a run did, as ``<output.dir>/run_report.json`` and a terminal summary.

Written at the end of every run that got as far as sending (done, failed items, interrupted,
fatal error, crash); not when the configuration was refused, so a refused re-run never
replaces the report of the run that produced the output. Counters are this run's own: units
done before are reported as skipped, and rejected seed rows belong to the seed file, not to a
type.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from engine import __version__
from engine.config import Config
from engine.config.secrets import redact
from engine.output import files
from engine.output.checkpoint import FAILURES_FILE, PROGRESS_FILE, REJECTS_FILE, gen_name
from engine.pipeline.stats import Kept, Stats
from engine.progress.view import duration

log = logging.getLogger(__name__)

REPORT_FILE = "run_report.json"
MIN_RATE_SPAN_S = 60.0
_CRASH_CHARS = 300
_ROW = "  {:<20} {:>6} {:>6} {:>8} {:>16} {:>8}"
_QUALITY_ROW = "  {:<20} {:>8} {:>15} {:>14} {:>10} {:>10} {:>10}"


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How the run ended: the process exit code, a status word and a human reason."""

    exit_code: int
    status: str  # done | failed_items | interrupted | fatal | crashed
    reason: str


def build(
    config: Config,
    stats: Stats,
    outcome: RunOutcome,
    options: Mapping[str, bool],
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict; every path in it is absolute.

    Nothing in it holds the API key: the endpoints lose any user info, and the one free-text
    value, the reason (an error message, perhaps quoting a server), goes through
    ``engine.config.secrets``. Field names and paths are never rewritten.
    """
    out = config.output.dir.resolve()
    key = config.teacher.api_key
    secret = key.get_secret_value() if key is not None else None
    wall = stats.elapsed()
    # Over less than a minute a per-minute figure is mostly the limiter's start-up burst
    # scaled up, and reads like a broken cap: not given.
    minutes = wall / 60 if wall >= MIN_RATE_SPAN_S else None
    ended = time.time() if now is None else now
    teacher = stats.teacher  # what the teacher client sent and got
    used = stats.teacher_at_end
    endpoints = used.endpoints if used is not None else {}
    report: dict[str, Any] = {
        "engine_version": __version__,
        "exit": {
            "code": outcome.exit_code,
            "status": outcome.status,
            "reason": redact(outcome.reason, secret),
        },
        "started_at": _iso(stats.started_at),
        "ended_at": _iso(ended),
        "wall_time_s": round(wall, 3),
        "options": dict(options),
        "teacher": {
            "model": stats.teacher_model or config.teacher.model,
            "endpoints": [public_url(url) for url in endpoints or config.teacher.urls],
            # Per endpoint: requests routed there, outages, whether it was down at the end.
            "by_endpoint": {public_url(url): dict(e) for url, e in endpoints.items()},
            "concurrency": {
                # The run's cap, which the embedded demo lowers from the configured one.
                "max": (used.concurrency_max if used is not None else 0)
                or config.limits.max_concurrency,
                # None: the run never opened the teacher.
                "at_end": used.concurrency if used is not None else None,
                "cuts_on_429": used.concurrency_cuts if used is not None else 0,
            },
        },
        "types": {t: _type_entry(stats, t, out) for t in config.generation.types},
        "quality": _quality_totals(config, stats),
        "seed_file": {
            "path": str(config.input.seeds.resolve()),
            # None when the count did not run (stopped first, or nothing to do).
            "valid_rows": stats.seed_rows,
            "rejected_rows": stats.rejects,
            "rejects_file": str(out / REJECTS_FILE),
        },
        "requests": {
            "sent": teacher.requests_sent,
            "retried": teacher.retries.total(),
            "retries_by_reason": dict(sorted(teacher.retries.items())),
            "from_cache": teacher.cache_hits,
        },
        "cache": _cache_entry(stats),
        "failed_items_by_kind": dict(sorted(stats.failures.items())),
        "lost_items": _lost_items(stats),
        "preflight": {
            # None: skipped (--no-preflight).
            "requests": teacher.preflight_requests if stats.preflight_ran else None,
            "adapted": list(stats.adapted),
        },
        "tokens": {
            "prompt": teacher.prompt_tokens,
            "completion": teacher.completion_tokens,
            "total": teacher.total_tokens,
        },
        "rates_per_minute": {
            # Over the whole run (wall_time_s); None when it lasted less than a minute.
            "requests": None if minutes is None else round(teacher.requests_sent / minutes, 1),
            "tokens": None if minutes is None else round(teacher.total_tokens / minutes, 1),
            # None: no cap.
            "requests_cap": config.limits.requests_per_minute or None,
            "tokens_cap": config.limits.tokens_per_minute or None,
        },
        "files": {
            "output_dir": str(out),
            "failures": str(out / FAILURES_FILE),
            "rejects": str(out / REJECTS_FILE),
            "progress": str(out / PROGRESS_FILE),
            "report": str(out / REPORT_FILE),
        },
    }
    if stats.distributed is not None:  # run.backend = "ray"
        report["ray"] = stats.distributed
    return report


def describe_crash(err: BaseException) -> str:
    """A short reason for an unexpected error: its distinct leaf errors, with counts (a task
    group can hold hundreds of the same one)."""
    leaves: Counter[str] = Counter()
    pending = [err]
    while pending:
        item = pending.pop()
        if isinstance(item, BaseExceptionGroup):
            pending.extend(reversed(item.exceptions))
        else:
            leaves[f"{type(item).__name__}: {item}"[:_CRASH_CHARS]] += 1
    parts = [text if n == 1 else f"{text} (x{n})" for text, n in leaves.most_common(3)]
    more = len(leaves) - len(parts)
    return "; ".join(parts) + (f"; and {more} other errors" if more > 0 else "")


def _type_entry(stats: Stats, gen_type: str, out: Path) -> dict[str, Any]:
    return {
        # One unit per valid seed row; None when the rows were not counted.
        "units_total": stats.seed_rows,
        # Finished by this run, including units that lost some items.
        "units_done": stats.units_done[gen_type],
        # Not run: done before (or, with --retry-failed, nothing to retry).
        "units_skipped": stats.units_skipped[gen_type],
        "units_with_failed_items": stats.units_failed[gen_type],
        "items_failed": stats.items_failed[gen_type],
        "judged_out": stats.judged_out[gen_type],
        "records_written": stats.records[gen_type],
        "output_file": str(out / gen_name(gen_type)),
        "quality": _quality_entry(stats, gen_type),
    }


def _quality_entry(stats: Stats, gen_type: str) -> dict[str, Any]:
    """Reply choices checked and rejected, per stage and check, and what the kept records
    look like (means over this run's units)."""
    prefix = f"{gen_type}/"
    stages: dict[str, Any] = {}
    for stage, replies in sorted(stats.replies.items()):
        if stage.startswith(prefix):
            rejected = stats.rejected.get(stage, Counter())
            stages[stage.removeprefix(prefix)] = {
                "replies": replies,
                "rejected": rejected.total(),
                "rejected_by_check": dict(sorted(rejected.items())),
            }
    replies = sum(s["replies"] for s in stages.values())
    rejected = sum(s["rejected"] for s in stages.values())
    return {
        "replies": replies,
        "rejected": rejected,
        "rejection_rate": _rate(rejected, replies),
        "by_stage": stages,
        "kept": stats.kept.get(gen_type, Kept()).means(),
    }


def _quality_totals(config: Config, stats: Stats) -> dict[str, Any]:
    by_check: Counter[str] = Counter()
    for counts in stats.rejected.values():
        by_check.update(counts)
    replies = stats.replies.total()
    return {
        "checks_enabled": config.quality.enabled,
        "replies": replies,
        "rejected": by_check.total(),
        "rejection_rate": _rate(by_check.total(), replies),
        "rejected_by_check": dict(sorted(by_check.items())),
    }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _cache_entry(stats: Stats) -> dict[str, Any] | None:
    """The response cache's file, size and bound; None when the run used none."""
    cache = stats.cache_at_end
    if cache is None:
        return None
    return {
        "path": str(Path(cache.path).resolve()),
        "size_bytes": cache.size_bytes,
        "max_bytes": cache.max_bytes or None,
        "stored": cache.stored,
        "evicted": cache.evicted,
    }


def _lost_items(stats: Stats) -> dict[str, Any]:
    """Items lost by earlier runs that this run ran again, how many it won back, and what
    failures.jsonl lists at the end (for the run's types), by reason."""
    return {
        "before": stats.lost_before.total(),
        "before_by_reason": dict(sorted(stats.lost_before.items())),
        "recovered": stats.recovered,
        "still_failing": stats.still_lost.total(),
        "still_failing_by_reason": dict(sorted(stats.still_lost.items())),
    }


def write(out_dir: Path, report: Mapping[str, Any]) -> Path:
    """Write ``report`` to ``out_dir/run_report.json`` atomically (temp file, fsync, rename,
    directory fsync). A full disk or read-only file system: ``OutputWriteError``."""
    path = out_dir / REPORT_FILE
    files.write_atomically(path, orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    return path


def summary(report: Mapping[str, Any]) -> str:
    """The report as a few aligned lines for the terminal."""
    end, seeds, req, tok = report["exit"], report["seed_file"], report["requests"], report["tokens"]
    rates, files = report["rates_per_minute"], report["files"]
    rows = [_ROW.format("units:", "total", "done", "skipped", "with lost items", "records")]
    for gen_type, t in report["types"].items():
        total = "?" if t["units_total"] is None else t["units_total"]
        lost = f"{t['units_with_failed_items']} ({t['items_failed']} items)"
        rows.append(
            _ROW.format(
                gen_type, total, t["units_done"], t["units_skipped"], lost, t["records_written"]
            )
        )
    valid = "?" if seeds["valid_rows"] is None else seeds["valid_rows"]
    lines = [
        f"run {end['status']} (exit {end['code']}): {end['reason']}",
        *rows,
        *_quality_rows(report),
        f"  seed rows: {valid} valid, {seeds['rejected_rows']} rejected ({seeds['rejects_file']})",
        f"  requests: {req['sent']} sent, {req['retried']} retried{_reasons(req)}, "
        f"{req['from_cache']} answered from cache{_preflight(report)}",
        *_cache_line(report),
        f"  failed items: {sum(report['failed_items_by_kind'].values())}"
        f"{_by_kind(report['failed_items_by_kind'])} ({files['failures']})",
        *_lost_line(report),
        f"  tokens: {tok['prompt']} in, {tok['completion']} out",
        _teacher_line(report["teacher"]),
        _rates_line(rates, req["sent"], tok["total"], report["wall_time_s"]),
        f"  wall time {duration(report['wall_time_s'])}; output in {files['output_dir']}",
        f"  report: {files['report']}",
    ]
    return "\n".join(lines)


def _cache_line(report: Mapping[str, Any]) -> list[str]:
    cache = report.get("cache")
    if not cache:
        return []
    bound = f" of {cache['max_bytes'] / 1e9:g} GB" if cache["max_bytes"] else ""
    evicted = f", {cache['evicted']} oldest entries evicted" if cache["evicted"] else ""
    return [f"  response cache: {cache['size_bytes'] / 1e6:.1f} MB{bound}{evicted}"]


def _quality_rows(report: Mapping[str, Any]) -> list[str]:
    """Per type: replies checked, rejected (and by which checks), and the kept records' means."""
    total = report["quality"]
    head = "quality:" if total["checks_enabled"] else "quality (checks off):"
    rows = [
        _QUALITY_ROW.format(
            head, "replies", "rejected", "distinct q/unit", "question", "answer", "summary"
        )
    ]
    details = []
    for gen_type, t in report["types"].items():
        q, kept = t["quality"], t["quality"]["kept"]
        rejected = f"{q['rejected']} ({_percent(q['rejection_rate'])})"
        rows.append(
            _QUALITY_ROW.format(
                gen_type,
                q["replies"],
                rejected,
                *(
                    _figure(kept[key])
                    for key in (
                        "distinct_questions_per_unit",
                        "mean_question_chars",
                        "mean_answer_chars",
                        "mean_summary_chars",
                    )
                ),
            )
        )
        by_stage = [
            f"{stage}: " + ", ".join(f"{check} {n}" for check, n in s["rejected_by_check"].items())
            for stage, s in q["by_stage"].items()
            if s["rejected"]
        ]
        if by_stage:
            details.append(f"    {gen_type} rejected: " + "; ".join(by_stage))
    return [*rows, *details, "  (question, answer, summary: mean characters of kept records)"]


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _rates_line(rates: Mapping[str, Any], sent: int, tokens: int, wall_s: float) -> str:
    caps = "; ".join(
        f"{what}: no cap" if cap is None else f"cap {cap} {what}"
        for what, cap in (("requests", rates["requests_cap"]), ("tokens", rates["tokens_cap"]))
    )
    if rates["requests"] is None:
        return (
            f"  rates: {sent} requests and {tokens} tokens in {wall_s:.1f} s "
            f"(under a minute: no per-minute figures; per minute: {caps})"
        )
    return (
        f"  per minute, over the whole run: {rates['requests']:.0f} requests, "
        f"{rates['tokens']:.0f} tokens ({caps})"
    )


def _preflight(report: Mapping[str, Any]) -> str:
    preflight = report.get("preflight") or {}
    if preflight.get("requests") is None:
        return ""
    adapted = "; ".join(preflight.get("adapted") or [])
    return f"; preflight: {preflight['requests']} requests" + (f" ({adapted})" if adapted else "")


def _lost_line(report: Mapping[str, Any]) -> list[str]:
    lost = report.get("lost_items") or {}
    if not lost.get("before") and not lost.get("still_failing"):
        return []
    still = f"{lost['still_failing']} still failing{_by_kind(lost['still_failing_by_reason'])}"
    if not lost["before"]:
        return [f"  lost items: {still}: fix the cause and run the same command to retry them"]
    again = ": run the same command to retry them" if lost["still_failing"] else ""
    return [
        f"  lost items: {lost['before']} lost by earlier runs"
        f"{_by_kind(lost['before_by_reason'])}, {lost['recovered']} recovered by this run; "
        f"{still}{again}"
    ]


def _teacher_line(teacher: Mapping[str, Any]) -> str:
    outages = sum(e["outages"] for e in teacher["by_endpoint"].values())
    limit = teacher["concurrency"]
    return (
        f"  teacher: {teacher['model'] or '?'} at {len(teacher['endpoints'])} endpoint(s), "
        f"{outages} outage(s); in flight at most {limit['max']}, "
        f"cut {limit['cuts_on_429']} time(s) on 429"
    )


def _reasons(requests: Mapping[str, Any]) -> str:
    return _by_kind(requests["retries_by_reason"])


def _by_kind(counts: Mapping[str, int]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{key}: {n}" for key, n in counts.items()) + ")"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment: where credentials could hide."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: keep the host alone
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
