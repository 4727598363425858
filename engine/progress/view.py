"""Progress as text: the figures of a moment (``Snapshot``) as one plain log line (``line``)
or as a rich renderable (``render``). Pure formatting: no clock, no I/O, no state;
``engine.progress.display`` samples the figures and decides when and where they are shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 30


@dataclass(frozen=True, slots=True)
class TypeFigures:
    """One type's unit counts: done by this run, done before, and the total (rows)."""

    gen_type: str
    done: int  # finished by this run
    skipped: int  # done before this run
    total: int | None  # None: not counted

    @property
    def finished(self) -> int:
        """Units done, by this run or before it."""
        return self.done + self.skipped

    @property
    def remaining(self) -> int | None:
        """Units still to do; None while the total is unknown."""
        return None if self.total is None else max(0, self.total - self.finished)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every figure the display shows, at one moment."""

    elapsed: float
    types: tuple[TypeFigures, ...]
    in_flight: int | None
    concurrency: int | None
    requests_per_minute: float | None  # over the last minute; None before a sample
    tokens_per_minute: float | None
    rpm_cap: int  # 0: no cap
    tpm_cap: int
    retries: dict[str, int]
    failures: dict[str, int]
    cached: int
    eta: float | None  # seconds; None while unknown
    # Reply choices checked so far, and those rejected (schema or content checks).
    replies: int = 0
    rejected: int = 0

    @property
    def done(self) -> int:
        """Units done by this run, all types."""
        return sum(t.done for t in self.types)

    @property
    def skipped(self) -> int:
        """Units done before this run, all types."""
        return sum(t.skipped for t in self.types)

    @property
    def total(self) -> int | None:
        """Units in all, all types; None while any type's total is unknown."""
        totals = [t.total for t in self.types]
        return None if None in totals else sum(t or 0 for t in totals)


def line(snap: Snapshot) -> str:
    """The snapshot as one log line."""
    per_type = ", ".join(f"{t.gen_type} {t.finished}/{_opt(t.total)}" for t in snap.types)
    return (
        f"progress: units {snap.done + snap.skipped}/{_opt(snap.total)}{_percent(snap)} "
        f"(this run {snap.done}, done before {snap.skipped}): {per_type} | "
        f"in flight {_opt(snap.in_flight)}/{_opt(snap.concurrency)} | "
        f"requests/min {_rate(snap.requests_per_minute)}/{_cap(snap.rpm_cap)} | "
        f"tokens/min {_rate(snap.tokens_per_minute)}/{_cap(snap.tpm_cap)} | "
        f"retries {_by_key(snap.retries)} | failed items {_by_key(snap.failures)} | "
        f"rejected replies {_rejected(snap)} | "
        f"cached {snap.cached} | elapsed {duration(snap.elapsed)} | ETA {_eta_text(snap)}"
    )


def render(snap: Snapshot) -> RenderableType:
    """The snapshot as a rich renderable: a table per type, then the request figures."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("type")
    for name in ("done", "this run", "before"):
        table.add_column(name, justify="right")
    table.add_column("")
    for t in snap.types:
        table.add_row(
            t.gen_type,
            f"{t.finished}/{_opt(t.total)}",
            str(t.done),
            str(t.skipped),
            _bar(t.finished, t.total),
        )
    lines = [
        f"in flight {_opt(snap.in_flight)}/{_opt(snap.concurrency)}   "
        f"requests/min {_rate(snap.requests_per_minute)} of {_cap(snap.rpm_cap)}   "
        f"tokens/min {_rate(snap.tokens_per_minute)} of {_cap(snap.tpm_cap)}",
        f"retries {_by_key(snap.retries)}   failed items {_by_key(snap.failures)}   "
        f"rejected replies {_rejected(snap)}   cached replies {snap.cached}",
        f"elapsed {duration(snap.elapsed)}   ETA {_eta_text(snap)}",
    ]
    return Group(table, *(Text(text) for text in lines))


def _bar(finished: int, total: int | None) -> RenderableType:
    if not total:
        return Text("")
    grid = Table.grid(padding=(0, 1))
    grid.add_row(
        ProgressBar(total=total, completed=finished, width=BAR_WIDTH),
        f"{100 * finished / total:3.0f}%",
    )
    return grid


def duration(seconds: float) -> str:
    """H:MM:SS."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _opt(value: int | None) -> str:
    return "?" if value is None else str(value)


def _percent(snap: Snapshot) -> str:
    total = snap.total
    return f" {100 * (snap.done + snap.skipped) / total:.0f}%" if total else ""


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _cap(cap: int) -> str:
    return str(cap) if cap else "no cap"


def _by_key(counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    parts = " ".join(f"{key}={n}" for key, n in sorted(counts.items()) if n)
    return f"{total} ({parts})"


def _rejected(snap: Snapshot) -> str:
    """Rejected reply choices of those checked, and the rate: a bad teacher shows at once."""
    if not snap.replies:
        return "0"
    return f"{snap.rejected}/{snap.replies} ({100 * snap.rejected / snap.replies:.1f}%)"


def _eta_text(snap: Snapshot) -> str:
    return "-" if snap.eta is None else duration(snap.eta)
