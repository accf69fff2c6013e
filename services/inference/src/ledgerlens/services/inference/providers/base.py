"""The one interface every provider implements (OpenAI-compatible APIs, the local
extractive answerer); the router only ever sees this.

Contract:

- ``chat`` returns one :class:`Completion`; ``stream`` yields :class:`Delta` s whose
  texts concatenate to the same text, and whose **last** delta carries the finish reason
  and the provider's usage (``None`` when it reported none).
- Every failure is a :class:`ProviderError` with ``retryable`` set: 429, 5xx, timeouts,
  connection errors and malformed bodies/streams are retryable; 400/401/403/404/422 are
  not (``reason`` is the provider's own message). ``retry_after`` is the provider's
  ``Retry-After`` in seconds.
- ``deadline`` bounds the call (the provider never waits past it, semaphore included);
  running out of it is a retryable ``ProviderError`` (the router turns it into
  DEADLINE_EXCEEDED).
- ``params.model`` / ``model`` is the provider's own model name (one of ``models``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from ledgerlens.services.inference.model import ChatParams, Completion, Deadline, Delta, EmbedResult

__all__ = ["Provider"]


@runtime_checkable
class Provider(Protocol):
    #: the configured provider name
    name: str
    #: the provider's model names this gateway may call
    models: Sequence[str]

    async def chat(self, params: ChatParams, deadline: Deadline) -> Completion: ...

    def stream(self, params: ChatParams, deadline: Deadline) -> AsyncIterator[Delta]: ...

    async def embed(self, texts: Sequence[str], model: str, deadline: Deadline) -> EmbedResult: ...

    async def aclose(self) -> None: ...
