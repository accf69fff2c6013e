"""The one embedding interface ingestion (documents) and retrieval (queries) share.

Both sides must embed the same way, or query and chunk vectors do not compare: so the
model, its tokenizer, normalisation and the query/passage convention live here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Embedder", "EmbeddingError", "Tokenizer"]


class EmbeddingError(RuntimeError):
    """The embedding backend failed (after its retries); nothing was embedded."""


@runtime_checkable
class Tokenizer(Protocol):
    """The embedding model's own tokenizer, as chunking needs it."""

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character ``(start, end)`` of each token of ``text``, in order, without the
        model's special tokens (``[CLS]``, ``[SEP]``); ``text[start:end]`` is the
        token's source text."""
        ...

    def count(self, text: str) -> int:
        """Number of tokens of ``text`` without special tokens (``len(spans(text))``)."""
        ...


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised vectors (so cosine similarity is a dot product)."""

    #: the model's name as recorded in events and indexes (e.g. "all-MiniLM-L6-v2")
    model: str
    #: vector length
    dimensions: int
    #: the most tokens the model reads of one text (without special tokens); more is cut
    max_tokens: int
    tokenizer: Tokenizer

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order; batched internally. Raises
        :class:`EmbeddingError`. Never blocks the event loop."""
        ...

    async def aclose(self) -> None:
        """Release connections / threads."""
        ...
