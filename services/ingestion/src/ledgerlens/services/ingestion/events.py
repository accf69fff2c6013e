"""What ingestion publishes (as outbox events) and its handler of ledger anchors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from ledgerlens.common.v1 import common_pb2
from ledgerlens.events.v1 import events_pb2
from ledgerlens.runtime.events import EventContext, Subjects
from ledgerlens.services.ingestion.convert import metadata_to_proto, timestamp, to_datetime
from ledgerlens.services.ingestion.model import Anchor
from ledgerlens.services.ingestion.store import NewVersion, OutboxEvent, Store

__all__ = ["AnchorHandler", "deleted_event", "same_subject", "version_events"]

_log = logging.getLogger(__name__)


def same_subject(subject: str) -> str:
    """The platform's subject as it is (tests map subjects into a namespace of their own)."""
    return subject


def _provenance(new: NewVersion) -> common_pb2.Provenance:
    return common_pb2.Provenance(
        document_id=new.document_id,
        version=new.version,
        source_url=new.source_url,
        sha256=new.sha256,
        fetched_at=timestamp(new.fetched_at),
        ingested_at=timestamp(new.ingested_at),
    )


def version_events(
    new: NewVersion,
    vectors: Sequence[Sequence[float]],
    *,
    model: str,
    dimensions: int,
    max_chunks: int,
    max_bytes: int,
    subject: Callable[[str], str] = same_subject,
) -> list[OutboxEvent]:
    """The events of a stored version, in the order consumers should see them: its
    chunks (batched under ``max_chunks`` and ``max_bytes`` each), then the previous
    version's retirement (new chunks are searchable before old ones go), then the
    document itself."""
    provenance = _provenance(new)
    metadata = metadata_to_proto(new.metadata)
    occurred = timestamp(new.ingested_at)
    chunks = [
        events_pb2.EmbeddedChunk(
            chunk_id=c.chunk_id,
            provenance=provenance,
            metadata=metadata,
            chunk_index=c.index,
            text=c.text,
            vector=list(vector),
            heading_path=list(c.heading_path),
            char_start=c.char_start,
            char_end=c.char_end,
            token_count=c.token_count,
        )
        for c, vector in zip(new.chunks, vectors, strict=True)
    ]
    batches: list[list[events_pb2.EmbeddedChunk]] = []
    size = 0
    for item in chunks:
        item_size = item.ByteSize() + 8  # field tag and length prefix
        if not batches or len(batches[-1]) >= max_chunks or size + item_size > max_bytes:
            batches.append([])
            size = 256  # the batch's own fields
        batches[-1].append(item)
        size += item_size
    key = f"{new.document_id}:{new.version}"
    events = [
        OutboxEvent(
            subject(Subjects.INGESTION_CHUNKS_EMBEDDED),
            events_pb2.ChunksEmbedded(
                document_id=new.document_id,
                version=new.version,
                embedding_model=model,
                dimensions=dimensions,
                chunks=batch,
                batch_index=i,
                batch_count=len(batches),
                occurred_at=occurred,
            ),
            f"chunks-embedded:{key}:{i}",
        )
        for i, batch in enumerate(batches)
    ]
    previous = new.previous_version
    if previous:
        events.append(
            OutboxEvent(
                subject(Subjects.INGESTION_VERSION_RETIRED),
                events_pb2.DocumentVersionRetired(
                    document_id=new.document_id,
                    retired_version=previous,
                    superseded_by_version=new.version,
                    occurred_at=occurred,
                ),
                f"version-retired:{new.document_id}:{previous}",
            )
        )
    events.append(
        OutboxEvent(
            subject(Subjects.INGESTION_DOCUMENT_INGESTED),
            events_pb2.DocumentIngested(
                provenance=provenance,
                metadata=metadata,
                content_type=new.content_type,
                chunk_count=len(new.chunks),
                previous_version=previous,
                occurred_at=occurred,
            ),
            f"document-ingested:{key}",
        )
    )
    return events


def deleted_event(
    document_id: str,
    latest_version: int,
    versions: Sequence[int],
    source_url: str,
    reason: str,
    at: datetime,
    subject: Callable[[str], str] = same_subject,
) -> OutboxEvent:
    return OutboxEvent(
        subject(Subjects.INGESTION_DOCUMENT_DELETED),
        events_pb2.DocumentDeleted(
            document_id=document_id,
            versions=list(versions),
            source_url=source_url,
            reason=reason,
            occurred_at=timestamp(at),
        ),
        # a source deleted, ingested again and deleted again has a newer latest version
        f"document-deleted:{document_id}:{latest_version}",
    )


class AnchorHandler:
    """Records ``ledger.anchor.committed`` on the version it anchors (idempotent)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def __call__(self, event: events_pb2.AnchorCommitted, _context: EventContext) -> None:
        a = event.anchor
        anchor = Anchor(
            tx_id=a.tx_id,
            block_number=a.block_number,
            committed_at=to_datetime(a.committed_at),
            channel=a.channel,
        )
        found = await self._store.record_anchor(
            event.document_id, event.version, event.sha256, anchor
        )
        if not found:
            # deleted since, or a checksum this service never stored: nothing to record
            _log.info(
                "anchor %s for unknown version %s v%s", a.tx_id, event.document_id, event.version
            )
