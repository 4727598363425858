"""What a flow's ``plan`` returns: the requests one stage of a unit would send, counted before
anything is sent (``python -m engine plan``, ``engine.plan``; the preflight's prompt sizes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.teacher.protocol import CHARS_PER_TOKEN, ChatRequest


@dataclass(frozen=True, slots=True)
class StagePlan:
    """What one stage of a unit sends before any retry or re-ask (see ``Flow.plan``).

    Plans of one stage add up with ``+`` (counts summed; the first ``assumes`` kept).
    """

    stage: str  # the full stage name, e.g. "key_facts_to_qa/qa"
    requests: int
    choices: int  # samples asked for: requests x n
    prompt_tokens: int  # estimated
    completion_tokens: int  # at most: max_tokens for every choice
    # Why the count is what it is when it depends on earlier replies; "" when fixed by config.
    assumes: str = ""

    @classmethod
    def of(cls, requests: Sequence[ChatRequest], times: int = 1, assumes: str = "") -> StagePlan:
        """``requests`` (all of one stage, at least one), each sent ``times`` times."""
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
    longer than the chunk it was made from: an upper bound for the quoting prompt's size. At
    least one character.
    """
    chars = min(max_tokens * CHARS_PER_TOKEN // items, len(chunk))
    return "x" * max(1, chars)
