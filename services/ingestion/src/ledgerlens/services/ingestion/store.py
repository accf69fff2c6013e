"""Documents, versions and chunks in SQL (SQLite by default, PostgreSQL at scale).

Every write that announces something writes its events to the outbox in the same
transaction (``ledgerlens.runtime.outbox``), so a row exists exactly when its events
will be published, whatever crashes in between.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import Message
from sqlalchemy import and_, delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ledgerlens.runtime.db import session_factory
from ledgerlens.runtime.errors import Unavailable
from ledgerlens.runtime.outbox import OutboxRelay, add_to_outbox
from ledgerlens.services.ingestion.convert import metadata_from_json, metadata_to_json
from ledgerlens.services.ingestion.metadata import Metadata
from ledgerlens.services.ingestion.model import (
    Anchor,
    DocumentFilter,
    DocumentVersion,
    IngestResult,
    IngestStatus,
    StoredChunk,
)
from ledgerlens.services.ingestion.schema import (
    OUTBOX,
    ChunkRow,
    DocumentRow,
    IdempotencyRow,
    VersionAuthorRow,
    VersionRow,
    VersionTagRow,
)

__all__ = ["Latest", "NewVersion", "OutboxEvent", "Store", "VersionConflict"]

ACTIVE = "active"
RETIRED = "retired"


class VersionConflict(Exception):
    """Another writer stored a version of the same source first; re-read and retry."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    subject: str
    message: Message
    msg_id: str


@dataclass(frozen=True, slots=True)
class Latest:
    """What is stored for a source now."""

    document_id: str
    latest_version: int
    #: the active version's checksum; None when the document is deleted
    sha256: str | None
    chunk_count: int


@dataclass(frozen=True, slots=True)
class NewVersion:
    document_id: str
    version: int
    source_url: str
    sha256: str
    content_type: str
    size_bytes: int
    fetched_at: datetime | None
    ingested_at: datetime
    metadata: Metadata
    #: the active version this one replaces (retired with it); 0 for none
    previous_version: int
    chunks: Sequence[StoredChunk]


@dataclass(frozen=True, slots=True)
class Idempotency:
    tenant: str
    key: str
    request_sha256: str


class Store:
    def __init__(self, engine: AsyncEngine, relay: OutboxRelay | None = None) -> None:
        self._engine = engine
        self._sessions = session_factory(engine)
        self._relay = relay
        # SQLite has one writer at a time: concurrent ingests queue here, in order,
        # instead of polling SQLite's lock (whose busy timeout a long queue outlasts).
        self._write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        """A write transaction; storage that stays unavailable is UNAVAILABLE (retryable)."""
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
            try:
                async with self._sessions.begin() as session:
                    yield session
            except OperationalError as exc:
                raise Unavailable(
                    "the document store is unavailable; retry", retry_after=1.0
                ) from exc

    # -- ingest ---------------------------------------------------------------------------

    async def latest(self, source_url: str) -> Latest | None:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(DocumentRow, VersionRow)
                    .outerjoin(
                        VersionRow,
                        and_(
                            VersionRow.document_id == DocumentRow.id,
                            VersionRow.version == DocumentRow.latest_version,
                        ),
                    )
                    .where(DocumentRow.source_url == source_url)
                )
            ).first()
        if row is None:
            return None
        document, version = row
        active = document.deleted_at is None and version is not None
        return Latest(
            document_id=document.id,
            latest_version=document.latest_version,
            sha256=version.sha256 if active and version is not None else None,
            chunk_count=version.chunk_count if active and version is not None else 0,
        )

    async def idempotent_result(self, tenant: str, key: str) -> tuple[str, IngestResult] | None:
        """``(request_sha256, result)`` remembered for the key, if any."""
        async with self._sessions() as session:
            row = await session.get(IdempotencyRow, (tenant, key))
        if row is None:
            return None
        return row.request_sha256, IngestResult(
            document_id=row.document_id,
            version=row.version,
            sha256=row.sha256,
            status=IngestStatus(row.status),
            chunk_count=row.chunk_count,
        )

    async def remember(self, idempotency: Idempotency, result: IngestResult) -> None:
        """Remember the result of an ingest that wrote nothing else (unchanged)."""
        try:
            async with self._writing() as session:
                self._add_idempotency(session, idempotency, result)
        except IntegrityError:
            pass  # a concurrent retry with the same key remembered it first

    async def write_version(
        self,
        new: NewVersion,
        events: Sequence[OutboxEvent],
        idempotency: Idempotency | None,
        result: IngestResult,
    ) -> None:
        """Store ``new`` as the latest version (retiring the previous one), its chunks
        and ``events``, in one transaction. Raises :class:`VersionConflict` if the
        source's latest version is no longer ``new.version - 1``."""
        try:
            async with self._writing() as session:
                await self._write_version(session, new)
                for event in events:
                    await add_to_outbox(
                        session,
                        event.subject,
                        event.message,
                        event.msg_id,
                        relay=self._relay,
                        table=OUTBOX,
                    )
                if idempotency is not None:
                    self._add_idempotency(session, idempotency, result)
        except IntegrityError as exc:
            raise VersionConflict(str(exc.orig)) from exc

    async def _write_version(self, session: AsyncSession, new: NewVersion) -> None:
        if new.version == 1:
            session.add(
                DocumentRow(
                    id=new.document_id,
                    source_url=new.source_url,
                    latest_version=1,
                    created_at=new.ingested_at,
                )
            )
            await session.flush()  # a concurrent first ingest fails here
        else:
            moved = await session.execute(
                update(DocumentRow)
                .where(
                    DocumentRow.id == new.document_id,
                    DocumentRow.latest_version == new.version - 1,
                )
                .values(latest_version=new.version, deleted_at=None, deleted_reason=None)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise VersionConflict(f"{new.document_id} moved past version {new.version - 1}")
            await session.execute(
                update(VersionRow)
                .where(VersionRow.document_id == new.document_id, VersionRow.state == ACTIVE)
                .values(state=RETIRED)
            )
        md = new.metadata
        session.add(
            VersionRow(
                document_id=new.document_id,
                version=new.version,
                sha256=new.sha256,
                content_type=new.content_type,
                size_bytes=new.size_bytes,
                chunk_count=len(new.chunks),
                state=ACTIVE,
                fetched_at=new.fetched_at,
                ingested_at=new.ingested_at,
                metadata_json=metadata_to_json(md),
                doc_type=md.doc_type.value if md.doc_type else "other",
                chain=md.chain,
                published_at=md.published_at,
            )
        )
        await session.flush()
        session.add_all(
            VersionTagRow(document_id=new.document_id, version=new.version, tag=tag)
            for tag in md.tags
        )
        session.add_all(
            VersionAuthorRow(document_id=new.document_id, version=new.version, author=author)
            for author in sorted({a.lower() for a in md.authors})
        )
        session.add_all(
            ChunkRow(
                id=c.chunk_id,
                document_id=c.document_id,
                version=c.version,
                chunk_index=c.index,
                text=c.text,
                heading_path=list(c.heading_path),
                char_start=c.char_start,
                char_end=c.char_end,
                token_count=c.token_count,
            )
            for c in new.chunks
        )
        await session.flush()

    @staticmethod
    def _add_idempotency(
        session: AsyncSession, idempotency: Idempotency, result: IngestResult
    ) -> None:
        session.add(
            IdempotencyRow(
                tenant=idempotency.tenant,
                key=idempotency.key,
                request_sha256=idempotency.request_sha256,
                document_id=result.document_id,
                version=result.version,
                sha256=result.sha256,
                status=result.status.value,
                chunk_count=result.chunk_count,
                created_at=datetime.now(UTC),
            )
        )

    # -- reading --------------------------------------------------------------------------

    async def get(self, document_id: str, version: int = 0) -> DocumentVersion | None:
        """A version (0: the latest) of a document that is not deleted."""
        async with self._sessions() as session:
            query = (
                select(DocumentRow, VersionRow)
                .join(VersionRow, VersionRow.document_id == DocumentRow.id)
                .where(DocumentRow.id == document_id, DocumentRow.deleted_at.is_(None))
            )
            query = query.where(VersionRow.version == (version or DocumentRow.latest_version))
            row = (await session.execute(query)).first()
        return None if row is None else _view(*row)

    async def find(
        self,
        flt: DocumentFilter,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> list[DocumentVersion]:
        """Active versions matching ``flt``, newest ingest first, ``limit`` of them after
        the ``(ingested_at, document_id)`` cursor."""
        query = (
            select(DocumentRow, VersionRow)
            .join(VersionRow, VersionRow.document_id == DocumentRow.id)
            .where(VersionRow.state == ACTIVE, DocumentRow.deleted_at.is_(None))
        )
        if flt.doc_types:
            query = query.where(VersionRow.doc_type.in_([t.value for t in flt.doc_types]))
        if flt.chains:
            query = query.where(VersionRow.chain.in_(list(flt.chains)))
        if flt.source_url_prefix:
            query = query.where(
                DocumentRow.source_url.startswith(flt.source_url_prefix, autoescape=True)
            )
        if flt.published_after is not None:
            query = query.where(VersionRow.published_at >= flt.published_after)
        if flt.published_before is not None:
            query = query.where(VersionRow.published_at < flt.published_before)
        if flt.tags:
            query = query.where(
                exists().where(
                    VersionTagRow.document_id == VersionRow.document_id,
                    VersionTagRow.version == VersionRow.version,
                    VersionTagRow.tag.in_(list(flt.tags)),
                )
            )
        if flt.authors:
            query = query.where(
                exists().where(
                    VersionAuthorRow.document_id == VersionRow.document_id,
                    VersionAuthorRow.version == VersionRow.version,
                    VersionAuthorRow.author.in_([a.lower() for a in flt.authors]),
                )
            )
        if after is not None:
            at, doc_id = after
            query = query.where(
                or_(
                    VersionRow.ingested_at < at,
                    and_(VersionRow.ingested_at == at, VersionRow.document_id < doc_id),
                )
            )
        query = query.order_by(VersionRow.ingested_at.desc(), VersionRow.document_id.desc())
        async with self._sessions() as session:
            rows = (await session.execute(query.limit(limit))).all()
        return [_view(d, v) for d, v in rows]

    async def chunks(self, document_id: str, version: int) -> list[StoredChunk]:
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(ChunkRow)
                    .where(ChunkRow.document_id == document_id, ChunkRow.version == version)
                    .order_by(ChunkRow.chunk_index)
                )
            ).all()
        return [
            StoredChunk(
                chunk_id=r.id,
                document_id=r.document_id,
                version=r.version,
                index=r.chunk_index,
                text=r.text,
                heading_path=tuple(r.heading_path),
                char_start=r.char_start,
                char_end=r.char_end,
                token_count=r.token_count,
            )
            for r in rows
        ]

    # -- deletion and anchors -------------------------------------------------------------

    async def delete(
        self,
        document_id: str,
        at: datetime,
        reason: str,
        event: Callable[[int, list[int], str], OutboxEvent],
    ) -> list[int] | None:
        """Delete every version and chunk (the document row stays as a tombstone) and
        write ``event(latest_version, versions, source_url)``; the deleted versions, or
        None for an unknown or already deleted document."""
        async with self._writing() as session:
            document = await session.get(DocumentRow, document_id, with_for_update=True)
            if document is None or document.deleted_at is not None:
                return None
            versions = list(
                (
                    await session.scalars(
                        select(VersionRow.version)
                        .where(VersionRow.document_id == document_id)
                        .order_by(VersionRow.version)
                    )
                ).all()
            )
            # children first: SQLite enforces the foreign keys, without ON DELETE help
            for table in (ChunkRow, VersionTagRow, VersionAuthorRow):
                await session.execute(delete(table).where(table.document_id == document_id))
            await session.execute(delete(VersionRow).where(VersionRow.document_id == document_id))
            document.deleted_at = at
            document.deleted_reason = reason or None
            announce = event(document.latest_version, versions, document.source_url)
            await add_to_outbox(
                session,
                announce.subject,
                announce.message,
                announce.msg_id,
                relay=self._relay,
                table=OUTBOX,
            )
            return versions

    async def record_anchor(
        self, document_id: str, version: int, sha256: str, anchor: Anchor
    ) -> bool:
        """Record the anchor of a stored version with this checksum; False if none."""
        async with self._writing() as session:
            result = await session.execute(
                update(VersionRow)
                .where(
                    VersionRow.document_id == document_id,
                    VersionRow.version == version,
                    VersionRow.sha256 == sha256,
                )
                .values(
                    anchor_tx_id=anchor.tx_id,
                    anchor_block=anchor.block_number,
                    anchor_committed_at=anchor.committed_at,
                    anchor_channel=anchor.channel,
                )
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def _view(document: DocumentRow, version: VersionRow) -> DocumentVersion:
    anchor = None
    if version.anchor_tx_id is not None:
        anchor = Anchor(
            tx_id=version.anchor_tx_id,
            block_number=int(version.anchor_block or 0),
            committed_at=_utc(version.anchor_committed_at),
            channel=version.anchor_channel or "",
        )
    return DocumentVersion(
        document_id=document.id,
        version=version.version,
        latest_version=document.latest_version,
        source_url=document.source_url,
        sha256=version.sha256,
        content_type=version.content_type,
        size_bytes=version.size_bytes,
        chunk_count=version.chunk_count,
        active=version.state == ACTIVE,
        fetched_at=_utc(version.fetched_at) if version.fetched_at else None,
        ingested_at=_utc(version.ingested_at),
        metadata=metadata_from_json(version.metadata_json),
        anchor=anchor,
    )


def _utc(value: datetime | None) -> datetime:
    assert value is not None
    # SQLite hands back naive datetimes for timezone-aware columns: they were UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
