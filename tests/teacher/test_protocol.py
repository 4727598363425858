"""Request estimates: tokens of a text, of a request's prompt and of its whole budget."""

from __future__ import annotations

import pytest

from engine.teacher.protocol import ChatRequest, Message, estimate_tokens


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("abcd", 1),
        ("abcde", 2),
        ("x" * 400, 100),
        ("知识蒸馏", 4),  # CJK: about a token per character
        ("ab知识", 3),  # 2 ASCII characters round up to 1, plus 2
        ("café", 2),  # "caf" rounds up to 1, "é" counts 1: high, the safe side
    ],
)
def test_token_estimate(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens


def test_a_request_budget_is_its_prompt_plus_max_tokens_per_choice() -> None:
    request = ChatRequest(
        messages=(Message("system", "x" * 40), Message("user", "y" * 400)), max_tokens=100, n=3
    )
    assert request.prompt_tokens() == (10 + 4) + (100 + 4)  # 4 per message: the template
    assert request.token_budget() == request.prompt_tokens() + 300
