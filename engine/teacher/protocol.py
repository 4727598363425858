"""What the flows see of the teacher: plain request/reply types and a ``Teacher`` protocol.

The HTTP client (``engine.teacher.client``) implements the protocol; tests use scripted fakes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

# Tokenizers differ by model and the engine has none: about 4 characters of English text per
# token, plus the chat template's few tokens per message, errs slightly high, as a budget should.
CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate of the tokens in ``text`` (rounded up).

    ASCII text: one token per ``CHARS_PER_TOKEN`` characters. Other scripts are far denser
    (CJK is about a token per character), so each non-ASCII character counts as a token:
    high for accented or Cyrillic text, which is the safe side for a budget.
    """
    if text.isascii():
        return -(-len(text) // CHARS_PER_TOKEN)
    ascii_chars = len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // CHARS_PER_TOKEN) + len(text) - ascii_chars


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message: ``role`` ("system", "user" or "assistant") and its text."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Wire:
    """How requests are written for one server, where servers differ (the preflight finds
    out): OpenAI's reasoning models refuse ``max_tokens`` and ask for
    ``max_completion_tokens``, and refuse any ``temperature`` but their default."""

    max_tokens_field: str = "max_tokens"
    temperature: bool = True  # False: leave it out, the server uses its default

    @property
    def changes(self) -> list[str]:
        """What differs from the usual request, in words (for logs and the run report)."""
        found = []
        if self.max_tokens_field != "max_tokens":
            found.append(f"max_tokens sent as {self.max_tokens_field}")
        if not self.temperature:
            found.append("temperature left out (the server allows only its default)")
        return found


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat-completions request, minus the model name (the client adds it)."""

    messages: tuple[Message, ...]
    temperature: float = 0.7
    max_tokens: int = 1024
    n: int = 1
    response_format: dict[str, Any] | None = None
    # Which stage of which flow sent it: for logs, stats and the failure log.
    stage: str = ""

    def prompt_tokens(self) -> int:
        """Estimated prompt tokens: the messages plus the chat template's per-message cost."""
        return sum(estimate_tokens(m.content) + _TOKENS_PER_MESSAGE for m in self.messages)

    def token_budget(self) -> int:
        """The most tokens this request can use: its prompt plus ``max_tokens`` per choice."""
        return self.prompt_tokens() + self.max_tokens * self.n

    def payload(self, model: str, wire: Wire | None = None) -> dict[str, Any]:
        """The JSON body for ``POST /chat/completions``, written as ``wire`` says."""
        wire = wire or _USUAL
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
        }
        if wire.temperature:
            body["temperature"] = self.temperature
        body[wire.max_tokens_field] = self.max_tokens
        if self.n != 1:
            body["n"] = self.n
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


_USUAL = Wire()


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice as the server sent it: ``content`` ("" for null) and the reasoning the
    server set apart, if any; inline reasoning is still in ``content`` (see
    ``engine.flows.reasoning``)."""

    content: str
    reasoning: str | None = None
    finish_reason: str | None = None
    # Where the server put ``reasoning``, for messages: "reasoning_content", "reasoning"...
    reasoning_field: str = "reasoning"


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens the server reported using for one reply (0 when it did not say)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ChatReply:
    """One chat completion: its choices (at least one, in the server's order), the model
    that answered ("" if unnamed) and its usage."""

    choices: tuple[Choice, ...]
    model: str = ""
    usage: Usage = field(default_factory=Usage)


class Teacher(Protocol):
    """Anything that can answer a chat request (the HTTP client, a scripted fake)."""

    model: str

    async def complete(self, request: ChatRequest) -> ChatReply:
        """Send ``request`` and return its reply.

        Retries transient failures itself. Raises ``ItemError`` when this request is lost
        and ``FatalRunError`` when the whole run must stop.
        """
        ...

    def forget(self, request: ChatRequest) -> None:
        """The reply to ``request`` did not validate: do not serve it again from a cache."""
        ...
