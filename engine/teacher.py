"""What the flows see of the teacher: plain request/reply types and a ``Teacher`` protocol.

The HTTP client (``engine.client``) implements the protocol; tests use scripted fakes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


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

    def payload(self, model: str) -> dict[str, Any]:
        """The JSON body for ``POST /chat/completions``."""
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.n != 1:
            body["n"] = self.n
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


@dataclass(frozen=True, slots=True)
class Choice:
    content: str
    reasoning: str | None = None
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ChatReply:
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
