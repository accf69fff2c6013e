"""The ingestion service's tables (one MetaData, so one alembic history).

A document is its source: ``documents`` holds one row per ``source_url`` that survives
deletion as a tombstone, so a source ingested again after a delete continues its
version numbers (event ids, which JetStream de-duplicates on, never repeat).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ledgerlens.runtime.db import new_metadata
from ledgerlens.runtime.outbox import outbox_table

__all__ = [
    "OUTBOX",
    "Base",
    "ChunkRow",
    "DocumentRow",
    "IdempotencyRow",
    "VersionAuthorRow",
    "VersionRow",
    "VersionTagRow",
]

_TS = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = new_metadata()


#: events written in the same transaction as the data they announce.
OUTBOX = outbox_table(Base.metadata)


class DocumentRow(Base):
    __tablename__ = "documents"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    source_url: Mapped[str] = mapped_column(String(2048), unique=True)
    latest_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(_TS)
    #: set when deleted: the versions and chunks are gone, this row stays (see module doc)
    deleted_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    deleted_reason: Mapped[str | None] = mapped_column(String(256), default=None)


class VersionRow(Base):
    __tablename__ = "document_versions"
    __table_args__ = (Index("ix_document_versions_listing", "state", "ingested_at"),)

    document_id: Mapped[str] = mapped_column(
        ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    chunk_count: Mapped[int] = mapped_column(Integer)
    #: "active" (the latest, searchable) or "retired"
    state: Mapped[str] = mapped_column(String(16))
    fetched_at: Mapped[datetime | None] = mapped_column(_TS)
    ingested_at: Mapped[datetime] = mapped_column(_TS)
    #: the whole metadata (common.v1.DocumentMetadata as JSON-able values)
    metadata_json: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    # filterable copies of metadata fields (ListDocuments)
    doc_type: Mapped[str] = mapped_column(String(32))
    chain: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[datetime | None] = mapped_column(_TS)
    # the ledger anchor of (document_id, version, sha256), once committed
    anchor_tx_id: Mapped[str | None] = mapped_column(String(64), default=None)
    anchor_block: Mapped[int | None] = mapped_column(BigInteger, default=None)
    anchor_committed_at: Mapped[datetime | None] = mapped_column(_TS, default=None)
    anchor_channel: Mapped[str | None] = mapped_column(String(255), default=None)


class VersionTagRow(Base):
    __tablename__ = "document_version_tags"
    __table_args__ = (
        ForeignKeyConstraint(
            ["document_id", "version"],
            ["document_versions.document_id", "document_versions.version"],
            ondelete="CASCADE",
        ),
        Index("ix_document_version_tags_tag", "tag"),
    )

    document_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)


class VersionAuthorRow(Base):
    __tablename__ = "document_version_authors"
    __table_args__ = (
        ForeignKeyConstraint(
            ["document_id", "version"],
            ["document_versions.document_id", "document_versions.version"],
            ondelete="CASCADE",
        ),
        Index("ix_document_version_authors_author", "author"),
    )

    document_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: lower case: the filter is case-insensitive
    author: Mapped[str] = mapped_column(String(256), primary_key=True)


class ChunkRow(Base):
    __tablename__ = "chunks"
    __table_args__ = (
        ForeignKeyConstraint(
            ["document_id", "version"],
            ["document_versions.document_id", "document_versions.version"],
            ondelete="CASCADE",
        ),
        Index("ix_chunks_document_version", "document_id", "version", "chunk_index"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    document_id: Mapped[str] = mapped_column(String(40))
    version: Mapped[int] = mapped_column(Integer)
    chunk_index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    heading_path: Mapped[list[str]] = mapped_column(JSON)
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)
    token_count: Mapped[int] = mapped_column(Integer)


class IdempotencyRow(Base):
    """A client's idempotency key and the result it got (per tenant)."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: sha256 of the request (source, content, type, metadata): a reuse with another
    #: request is FAILED_PRECONDITION
    request_sha256: Mapped[str] = mapped_column(String(64))
    document_id: Mapped[str] = mapped_column(String(40))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    chunk_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(_TS)
