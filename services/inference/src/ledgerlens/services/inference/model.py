"""The gateway's domain types, shared by providers, the router, limits, accounting and
the API (free of gRPC, SQL and HTTP).

A provider turns a :class:`ChatParams` into a :class:`Completion` (or a stream of
:class:`Delta`) and reports failures as :class:`ProviderError`, saying whether a retry
or the next provider of the fallback chain may help.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ChatParams",
    "Completion",
    "Deadline",
    "Delta",
    "EmbedResult",
    "FinishReason",
    "Message",
    "ProviderError",
    "Role",
    "TokenUsage",
]

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "content_filter"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ChatParams:
    """One completion request as a provider sees it (``model`` is the provider's own
    model name, after alias resolution)."""

    model: str
    messages: tuple[Message, ...]
    temperature: float | None = None
    #: None: the model's default
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def deterministic(self) -> bool:
        """Temperature 0: the same request gives the same answer (cacheable)."""
        return self.temperature == 0


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    #: True when the provider reported none and the tokens were counted locally
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: FinishReason
    #: the provider's usage; None when it reported none (accounting counts locally)
    usage: TokenUsage | None
    model: str
    provider: str


@dataclass(frozen=True, slots=True)
class Delta:
    """One event of a streamed completion: text, and on the last one(s) the finish
    reason and the provider's usage (OpenAI sends usage in a final chunk)."""

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: TokenUsage | None = None


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: list[list[float]]
    dimensions: int
    usage: TokenUsage | None
    model: str
    provider: str


class ProviderError(Exception):
    """A provider call failed.

    ``retryable``: a retry or the next provider may succeed (429, 5xx, timeouts,
    connection errors, a malformed body); otherwise (400, 401/403, 404, content refused)
    it is surfaced at once with the provider's ``reason``. ``retry_after`` is the
    provider's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(
        self,
        provider: str,
        reason: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Deadline:
    """The caller's deadline as a monotonic instant; it bounds every retry and fallback."""

    at: float = field(default=float("inf"))

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(float("inf") if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0
