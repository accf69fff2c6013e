"""The interface every vector backend implements (and the behaviour suite checks)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ledgerlens.services.retrieval.model import ChunkRecord, Filter, Hit, VersionKey

__all__ = ["VectorBackend"]


class VectorBackend(Protocol):
    """Chunks with their vectors and filter fields; dense search under a filter.

    Writes are idempotent (an upsert of a chunk id replaces it) and durable when they
    return: the caller acks the event that caused them right after. The caller
    serialises writes; searches run concurrently with them.
    """

    #: ``local`` or ``qdrant`` (metrics label, logs).
    name: str

    async def start(self) -> None:
        """Open or create the index (load a snapshot, rebuild what is stale)."""

    async def stop(self) -> None:
        """Persist what is only in memory and release resources."""

    async def upsert(self, records: Sequence[ChunkRecord]) -> None: ...

    async def remove_versions(self, keys: Sequence[VersionKey]) -> int:
        """Remove every chunk of these document versions; returns how many went."""
        ...

    async def search(
        self,
        vector: npt.NDArray[np.float32],
        flt: Filter,
        k: int,
        *,
        at_least: int | None = None,
    ) -> list[Hit]:
        """The ``k`` chunks most similar (cosine) to ``vector`` that pass ``flt``, best first.

        With ``at_least`` (fusion candidates), a backend may return fewer than ``k`` when
        more would cost much more, but never fewer than ``at_least`` that pass.
        """
        ...

    async def get(self, chunk_ids: Sequence[str]) -> dict[str, ChunkRecord]:
        """The records of those ids that are indexed (unknown ids are left out)."""
        ...

    async def count(self) -> int: ...

    def records(self) -> AsyncIterator[ChunkRecord]:
        """Every indexed record (to rebuild the keyword index from)."""
        ...

    def memory_bytes(self) -> int | None:
        """Bytes the index itself holds in this process (None when it lives elsewhere)."""
        ...
