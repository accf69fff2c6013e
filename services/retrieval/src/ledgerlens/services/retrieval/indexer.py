"""Keeping the index in step with ingestion's events (and the ledger's anchors).

Each handler returns only once its change is durable, so the bus acks it after that
and a crash before redelivers it; every change is idempotent, so a redelivery does
nothing new. One lock serialises all changes: a version's retirement can never
interleave with a late batch of its chunks.

Retired and deleted versions leave tombstones. A tombstoned version is never indexed
again (its chunks may arrive after its retirement: the consumers of the two subjects
run independently) and never returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

from prometheus_client import Counter, Gauge, Histogram

from ledgerlens.common.v1 import common_pb2
from ledgerlens.events.v1 import events_pb2
from ledgerlens.runtime.events import EventContext
from ledgerlens.services.retrieval.index import VectorBackend
from ledgerlens.services.retrieval.keyword import KeywordIndex
from ledgerlens.services.retrieval.model import ChunkRecord, VersionKey
from ledgerlens.services.retrieval.store import Store

__all__ = ["IndexState", "Indexer", "PermanentEventError"]

log = logging.getLogger(__name__)

INDEX_LAG = Histogram(
    "ledgerlens_retrieval_index_lag_seconds",
    "From an ingestion.chunks.embedded event's publication to its chunks being searchable.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
CHUNKS_INDEXED = Counter(
    "ledgerlens_retrieval_chunks_indexed_total", "Chunks upserted into the index."
)
CHUNKS_REMOVED = Counter(
    "ledgerlens_retrieval_chunks_removed_total", "Chunks removed (versions retired or deleted)."
)
CHUNKS_SKIPPED = Counter(
    "ledgerlens_retrieval_chunks_skipped_total",
    "Chunks not indexed because their version was already retired or deleted.",
)
INDEX_SIZE = Gauge("ledgerlens_retrieval_index_chunks", "Chunks in the index.")


class PermanentEventError(Exception):
    """An event that can never be indexed (wrong model or dimensions): dead-lettered."""


class IndexState:
    """Tombstones and anchors, in memory for the read path, durable in the database."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.tombstones: set[VersionKey] = set()
        self.anchors: dict[VersionKey, tuple[str, common_pb2.LedgerAnchor]] = {}

    async def load(self) -> None:
        self.tombstones = await self._store.tombstones()
        self.anchors = await self._store.anchors()

    def is_dead(self, key: VersionKey) -> bool:
        return key in self.tombstones

    def anchor(self, key: VersionKey, sha256: str) -> common_pb2.LedgerAnchor | None:
        found = self.anchors.get(key)
        if found is None or found[0] != sha256:
            return None
        return found[1]

    async def bury(self, keys: Iterable[VersionKey], reason: str) -> list[VersionKey]:
        wanted = sorted(set(keys))
        await self._store.add_tombstones(wanted, reason)
        self.tombstones.update(wanted)
        return wanted

    async def put_anchor(
        self, key: VersionKey, sha256: str, anchor: common_pb2.LedgerAnchor
    ) -> None:
        await self._store.put_anchor(key, sha256, anchor)
        self.anchors[key] = (sha256, anchor)


class Indexer:
    def __init__(
        self,
        backend: VectorBackend,
        keyword: KeywordIndex,
        state: IndexState,
        *,
        model: str,
        dimensions: int,
    ) -> None:
        self.backend = backend
        self.keyword = keyword
        self.state = state
        self.model = model
        self.dimensions = dimensions
        self._lock = asyncio.Lock()

    async def reconcile(self) -> None:
        """At start: rebuild the keyword index if it lost step with the backend."""
        backend_count = await self.backend.count()
        keyword_count = self.keyword.count()
        if backend_count != keyword_count:
            log.warning(
                "keyword index has %d chunks, vector backend %d: rebuilding keyword index",
                keyword_count,
                backend_count,
            )
            await self.keyword.rebuild(self.backend.records())
        INDEX_SIZE.set(backend_count)

    # -- changes -----------------------------------------------------------------------

    async def index(self, records: Sequence[ChunkRecord]) -> int:
        """Upsert ``records`` except those of tombstoned versions; returns how many."""
        async with self._lock:
            live = [r for r in records if not self.state.is_dead(r.key)]
            if len(live) < len(records):
                CHUNKS_SKIPPED.inc(len(records) - len(live))
            if live:
                await self.backend.upsert(live)
                await self.keyword.upsert(live)
                CHUNKS_INDEXED.inc(len(live))
                INDEX_SIZE.set(await self.backend.count())
            return len(live)

    async def remove(self, keys: Iterable[VersionKey], reason: str) -> int:
        async with self._lock:
            buried = await self.state.bury(keys, reason)
            removed = await self.backend.remove_versions(buried)
            await self.keyword.remove_versions(buried)
            CHUNKS_REMOVED.inc(removed)
            INDEX_SIZE.set(await self.backend.count())
            return removed

    # -- event handlers ----------------------------------------------------------------

    def records_of(self, event: events_pb2.ChunksEmbedded) -> list[ChunkRecord]:
        if event.embedding_model and event.embedding_model != self.model:
            raise PermanentEventError(
                f"chunks of {event.document_id} v{event.version} were embedded with "
                f"{event.embedding_model}; this index holds {self.model} vectors"
            )
        records = []
        for chunk in event.chunks:
            if len(chunk.vector) != self.dimensions:
                raise PermanentEventError(
                    f"chunk {chunk.chunk_id} has {len(chunk.vector)} dimensions; "
                    f"the index has {self.dimensions}"
                )
            records.append(ChunkRecord.from_event(chunk))
        return records

    async def on_chunks(self, event: events_pb2.ChunksEmbedded, context: EventContext) -> None:
        await self.index(self.records_of(event))
        lag = time.time() - context.published_at.timestamp()
        INDEX_LAG.observe(max(lag, 0.0))

    async def on_retired(
        self, event: events_pb2.DocumentVersionRetired, _context: EventContext
    ) -> None:
        await self.remove([(event.document_id, event.retired_version)], "retired")

    async def on_deleted(self, event: events_pb2.DocumentDeleted, _context: EventContext) -> None:
        await self.remove([(event.document_id, v) for v in event.versions], "deleted")

    async def on_anchor(self, event: events_pb2.AnchorCommitted, _context: EventContext) -> None:
        await self.state.put_anchor((event.document_id, event.version), event.sha256, event.anchor)
