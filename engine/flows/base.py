"""What every flow shares: the unit result, the failure entry and the output record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.errors import ItemError
from engine.seeds import SeedRow

BODY_EXCERPT_CHARS = 300


@dataclass(frozen=True, slots=True)
class Failure:
    """One lost item of a unit, as written to ``failures.jsonl``."""

    stage: str
    item: str  # where in the unit, e.g. "summary 3 / question 2"
    kind: str
    message: str
    status: int | None = None
    attempts: int = 1
    body_excerpt: str = ""
    at: float = field(default_factory=time.time)

    @classmethod
    def from_error(cls, stage: str, item: str, err: ItemError) -> Failure:
        return cls(
            stage=stage,
            item=item,
            kind=err.kind,
            message=str(err),
            status=err.status,
            attempts=err.attempts,
            body_excerpt=err.body[:BODY_EXCERPT_CHARS],
        )


@dataclass(slots=True)
class UnitResult:
    """Everything one (document, type) unit produced; written by the writer in one piece."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    judged_out: int = 0


class Flow(Protocol):
    """A generation type: turns one seed row into records through its stages."""

    gen_type: str

    async def run(self, seed: SeedRow) -> UnitResult: ...


def make_record(
    seed: SeedRow,
    gen_type: str,
    path: tuple[str, ...],
    *,
    document: str,
    question: str,
    response: str,
    model: str,
    reasoning: str | None = None,
    key_fact: str | None = None,
) -> dict[str, Any]:
    """One output line. ``path`` locates the pair in the unit (e.g. ("s003", "q01")); with the
    document id and type it makes an id that is the same in every run."""
    record: dict[str, Any] = {
        "id": "-".join((seed.doc_id, gen_type, *path)),
        "doc_id": seed.doc_id,
        "gen_type": gen_type,
        "document": document,
        "raw_document": seed.document,
        "document_outline": seed.document_outline,
        "domain": seed.domain,
        "question": question,
        "response": response,
        "model": model,
    }
    if key_fact is not None:
        record["key_fact"] = key_fact
    if reasoning:
        record["reasoning"] = reasoning
    return record
