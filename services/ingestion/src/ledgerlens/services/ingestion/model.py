"""The ingestion domain's values (no gRPC, SQL or NATS types)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from ledgerlens.services.ingestion.metadata import DocType, Metadata

__all__ = [
    "Anchor",
    "DocumentFilter",
    "DocumentVersion",
    "IngestRequest",
    "IngestResult",
    "IngestStatus",
    "StoredChunk",
]


class IngestStatus(enum.StrEnum):
    INGESTED = "ingested"
    UNCHANGED = "unchanged"
    NEW_VERSION = "new_version"


@dataclass(frozen=True, slots=True)
class IngestRequest:
    source_url: str
    content: bytes
    content_type: str = ""
    metadata: Metadata = field(default_factory=Metadata)
    idempotency_key: str = ""
    fetched_at: datetime | None = None
    #: whose idempotency keys these are (the caller's tenant)
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class IngestResult:
    document_id: str
    version: int
    sha256: str
    status: IngestStatus
    chunk_count: int


@dataclass(frozen=True, slots=True)
class Anchor:
    """Where a version's checksum was committed on the ledger."""

    tx_id: str
    block_number: int
    committed_at: datetime
    channel: str


@dataclass(frozen=True, slots=True)
class DocumentVersion:
    document_id: str
    version: int
    latest_version: int
    source_url: str
    sha256: str
    content_type: str
    size_bytes: int
    chunk_count: int
    active: bool
    fetched_at: datetime | None
    ingested_at: datetime
    metadata: Metadata
    anchor: Anchor | None


@dataclass(frozen=True, slots=True)
class StoredChunk:
    chunk_id: str
    document_id: str
    version: int
    index: int
    text: str
    heading_path: tuple[str, ...]
    char_start: int
    char_end: int
    token_count: int


@dataclass(frozen=True, slots=True)
class DocumentFilter:
    """ListDocuments' filter: fields AND, values of one field OR; empty = no filter."""

    doc_types: tuple[DocType, ...] = ()
    chains: tuple[str, ...] = ()
    authors: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    source_url_prefix: str = ""
    published_after: datetime | None = None
    published_before: datetime | None = None
