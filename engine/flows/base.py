"""What every flow shares: the unit result, the failure entry, the stage plan."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.errors import InvalidReply, ItemError
from engine.seeds import SeedRow
from engine.teacher.protocol import CHARS_PER_TOKEN, ChatRequest

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
    # For an invalid reply, what it failed (``InvalidReply.check``); "" otherwise.
    check: str = ""
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
            check=err.check if isinstance(err, InvalidReply) else "",
        )


@dataclass(slots=True)
class UnitResult:
    """Everything one (document, type) unit produced; written by the writer in one piece."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    judged_out: int = 0


@dataclass(frozen=True, slots=True)
class StagePlan:
    """What one stage of a unit sends before any retry or re-ask (see ``Flow.plan``)."""

    stage: str
    requests: int
    choices: int  # samples asked for: requests x n
    prompt_tokens: int  # estimated
    completion_tokens: int  # at most: max_tokens for every choice
    # Why the count is what it is when it depends on earlier replies; "" when fixed by config.
    assumes: str = ""

    @classmethod
    def of(cls, requests: Sequence[ChatRequest], times: int = 1, assumes: str = "") -> StagePlan:
        """``requests`` (all of one stage), each sent ``times`` times."""
        prompt = sum(r.prompt_tokens() for r in requests)
        return cls(
            stage=requests[0].stage,
            requests=len(requests) * times,
            choices=sum(r.n for r in requests) * times,
            prompt_tokens=prompt * times,
            completion_tokens=(sum(r.token_budget() for r in requests) - prompt) * times,
            assumes=assumes,
        )

    def __add__(self, other: StagePlan) -> StagePlan:
        return StagePlan(
            stage=self.stage,
            requests=self.requests + other.requests,
            choices=self.choices + other.choices,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            assumes=self.assumes or other.assumes,
        )


def assumed_reply(max_tokens: int, items: int, chunk: str) -> str:
    """Stand-in for reply text that a later prompt quotes, for ``Flow.plan``.

    The reply is assumed to fill ``max_tokens``, shared evenly by its ``items``, with no item
    longer than the chunk it was made from: an upper bound for the quoting prompt's size.
    """
    chars = min(max_tokens * CHARS_PER_TOKEN // items, len(chunk))
    return "x" * max(1, chars)


class Flow(Protocol):
    """A generation type: turns one seed row into records through its stages."""

    gen_type: str

    async def run(self, seed: SeedRow) -> UnitResult: ...

    def plan(self, seed: SeedRow) -> list[StagePlan]:
        """The requests ``run(seed)`` sends per stage, before retries and re-asks, assuming
        the teacher returns as many items (facts, questions, pairs) as it is asked for."""
        ...
