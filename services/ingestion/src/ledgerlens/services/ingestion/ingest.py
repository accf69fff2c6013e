"""The ingestion rules: identity, versions, idempotency, chunking and embedding.

A document's identity is its source URL (its id is derived from it); its content
hash is the sha256 of the normalised text. The same content again is a no-op that
returns the stored version; changed content makes the next version, whose chunks
replace the previous version's. Nothing is written unless everything succeeded, and
then rows and events are written in one transaction (see ``store``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from urllib.parse import urlsplit

from ledgerlens.embedding import Embedder, EmbeddingError, Tokenizer
from ledgerlens.embedding.batching import EmbeddingQueue
from ledgerlens.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ledgerlens.services.ingestion.chunking import Chunk, chunk
from ledgerlens.services.ingestion.convert import metadata_to_json
from ledgerlens.services.ingestion.documents import ParsedDocument, parse
from ledgerlens.services.ingestion.events import deleted_event, same_subject, version_events
from ledgerlens.services.ingestion.metadata import Metadata, guess_doc_type, merge, validate
from ledgerlens.services.ingestion.model import (
    DocumentFilter,
    DocumentVersion,
    IngestRequest,
    IngestResult,
    IngestStatus,
    StoredChunk,
)
from ledgerlens.services.ingestion.store import (
    Idempotency,
    NewVersion,
    Store,
    VersionConflict,
)

__all__ = ["IngestLimits", "Ingestor", "chunk_id_for", "document_id_for"]

MAX_SOURCE_URL_CHARS = 2048
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_REASON_CHARS = 256
_SCHEMES = frozenset({"http", "https", "file", "ipfs"})
#: a concurrent writer of the same source can make us re-read this many times
_MAX_CONFLICT_RETRIES = 3


def document_id_for(source_url: str) -> str:
    """The id of a source's document: stable across versions, deletes and services."""
    return "doc_" + hashlib.sha256(source_url.encode()).hexdigest()[:32]


def chunk_id_for(document_id: str, version: int, index: int) -> str:
    return f"{document_id}:{version}:{index}"


@dataclass(frozen=True, slots=True)
class IngestLimits:
    max_document_bytes: int = 20 * 1024 * 1024
    chunk_max_tokens: int = 200
    chunk_overlap_tokens: int = 32
    event_max_chunks: int = 64
    event_max_bytes: int = 900 * 1024


@dataclass(frozen=True, slots=True)
class Prepared:
    parsed: ParsedDocument
    metadata: Metadata


class Ingestor:
    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        queue: EmbeddingQueue,
        limits: IngestLimits = IngestLimits(),
        *,
        subject: Callable[[str], str] = same_subject,
    ) -> None:
        self._subject = subject
        self.store = store
        self.embedder = embedder
        self._queue = queue
        self.limits = limits
        # the chunk must fit the model's window, context line included
        self._max_tokens = min(limits.chunk_max_tokens, embedder.max_tokens)

    # -- ingest ---------------------------------------------------------------------------

    async def ingest(self, request: IngestRequest) -> IngestResult:
        """Ingest one document. Raises InvalidArgument (bad input), FailedPrecondition
        (an idempotency key reused for another request) or Unavailable."""
        self._check_request(request)
        idempotency = None
        if request.idempotency_key:
            idempotency = Idempotency(
                request.tenant, request.idempotency_key, _fingerprint(request)
            )
            remembered = await self.store.idempotent_result(request.tenant, request.idempotency_key)
            if remembered is not None:
                return self._replay(idempotency, *remembered)
        prepared = await asyncio.to_thread(prepare, request)  # CPU work, off the loop
        for _ in range(_MAX_CONFLICT_RETRIES):
            try:
                return await self._store_version(request, prepared, idempotency)
            except VersionConflict:
                continue  # someone stored a version of this source meanwhile: re-read
        raise Unavailable(
            f"too many concurrent writes to {request.source_url}; retry", retry_after=1.0
        )

    def _check_request(self, request: IngestRequest) -> None:
        url = request.source_url
        if not url:
            raise InvalidArgument("source_url is required", [("source_url", "empty")])
        if len(url) > MAX_SOURCE_URL_CHARS:
            raise InvalidArgument(
                "source_url is too long",
                [("source_url", f"{len(url)} characters, at most {MAX_SOURCE_URL_CHARS}")],
            )
        parts = urlsplit(url)
        if parts.scheme.lower() not in _SCHEMES or not (parts.netloc or parts.path):
            raise InvalidArgument(
                "source_url must be an absolute http(s), file or ipfs URL",
                [("source_url", f"not an absolute http(s), file or ipfs URL: {url[:200]!r}")],
            )
        key = request.idempotency_key
        if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
            raise InvalidArgument(
                "idempotency_key is too long",
                [
                    (
                        "idempotency_key",
                        f"{len(key)} characters, at most {MAX_IDEMPOTENCY_KEY_CHARS}",
                    )
                ],
            )
        size = len(request.content)
        if size == 0:
            raise InvalidArgument("document is empty", [("content", "no content")])
        if size > self.limits.max_document_bytes:
            raise InvalidArgument(
                "document is over the size limit",
                [
                    (
                        "content",
                        f"{size} bytes, over the limit of {self.limits.max_document_bytes}",
                    )
                ],
            )

    def _replay(
        self, idempotency: Idempotency, request_sha256: str, result: IngestResult
    ) -> IngestResult:
        if request_sha256 != idempotency.request_sha256:
            raise FailedPrecondition(
                "idempotency_key was already used for a different request",
                [("IDEMPOTENCY_KEY", "idempotency_key", "reused with different content")],
                reason="IDEMPOTENCY_KEY_REUSED",
            )
        return result

    def _chunk(self, prepared: Prepared) -> list[Chunk]:
        return chunk_prepared(
            prepared,
            self.embedder.tokenizer,
            max_tokens=self._max_tokens,
            overlap_tokens=self.limits.chunk_overlap_tokens,
        )

    async def _store_version(
        self, request: IngestRequest, prepared: Prepared, idempotency: Idempotency | None
    ) -> IngestResult:
        parsed = prepared.parsed
        latest = await self.store.latest(request.source_url)
        if latest is not None and latest.sha256 == parsed.sha256:
            result = IngestResult(
                document_id=latest.document_id,
                version=latest.latest_version,
                sha256=parsed.sha256,
                status=IngestStatus.UNCHANGED,
                chunk_count=latest.chunk_count,
            )
            if idempotency is not None:
                await self.store.remember(idempotency, result)
            return result
        document_id = latest.document_id if latest else document_id_for(request.source_url)
        version = latest.latest_version + 1 if latest else 1
        chunks = await asyncio.to_thread(self._chunk, prepared)
        try:
            vectors = await self._queue.embed([c.embedding_text for c in chunks])
        except EmbeddingError as exc:
            raise Unavailable(f"embedding failed: {exc}", retry_after=5.0) from exc
        # a source deleted and ingested again starts afresh, with the next version number
        replaces = latest is not None and latest.sha256 is not None
        status = IngestStatus.NEW_VERSION if replaces else IngestStatus.INGESTED
        now = datetime.now(UTC)
        new = NewVersion(
            document_id=document_id,
            version=version,
            source_url=request.source_url,
            sha256=parsed.sha256,
            content_type=parsed.content_type,
            size_bytes=len(request.content),
            fetched_at=request.fetched_at,
            ingested_at=now,
            metadata=prepared.metadata,
            previous_version=version - 1 if replaces else 0,
            chunks=[
                StoredChunk(
                    chunk_id=chunk_id_for(document_id, version, c.index),
                    document_id=document_id,
                    version=version,
                    index=c.index,
                    text=c.text,
                    heading_path=c.heading_path,
                    char_start=c.char_start,
                    char_end=c.char_end,
                    token_count=c.token_count,
                )
                for c in chunks
            ],
        )
        result = IngestResult(document_id, version, parsed.sha256, status, len(chunks))
        events = version_events(
            new,
            vectors,
            model=self.embedder.model,
            dimensions=self.embedder.dimensions,
            max_chunks=self.limits.event_max_chunks,
            max_bytes=self.limits.event_max_bytes,
            subject=self._subject,
        )
        await self.store.write_version(new, events, idempotency, result)
        return result

    # -- reading and deleting -------------------------------------------------------------

    async def get(self, document_id: str, version: int = 0) -> DocumentVersion:
        found = await self.store.get(document_id, version)
        if found is None:
            what = f"{document_id} version {version}" if version else document_id
            raise NotFound(
                f"no document {what}", resource_type="document", resource_name=document_id
            )
        return found

    async def find(
        self, flt: DocumentFilter, limit: int, after: tuple[datetime, str] | None
    ) -> list[DocumentVersion]:
        if (
            flt.published_after is not None
            and flt.published_before is not None
            and flt.published_before < flt.published_after
        ):
            raise InvalidArgument(
                "published_before is before published_after",
                [("filter.published_before", "before filter.published_after")],
            )
        return await self.store.find(flt, limit, after)

    async def delete(self, document_id: str, reason: str) -> tuple[list[int], datetime]:
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidArgument(
                "reason is too long", [("reason", f"{len(reason)} characters, at most 256")]
            )
        at = datetime.now(UTC)
        versions = await self.store.delete(
            document_id,
            at,
            reason,
            lambda latest, versions, source_url: deleted_event(
                document_id, latest, versions, source_url, reason, at, self._subject
            ),
        )
        if versions is None:
            raise NotFound(
                f"no document {document_id}", resource_type="document", resource_name=document_id
            )
        return versions, at


def prepare(request: IngestRequest) -> Prepared:
    """Parse and settle the metadata (CPU work: the service runs it in a worker thread)."""
    parsed = parse(request.content, request.content_type, request.source_url)
    metadata = validate(merge(parsed.front_matter or Metadata(), request.metadata))
    if metadata.doc_type is None:
        metadata = replace(
            metadata, doc_type=guess_doc_type(request.source_url, parsed.content_type)
        )
    return Prepared(parsed, metadata)


def chunk_prepared(
    prepared: Prepared, tokenizer: Tokenizer, *, max_tokens: int, overlap_tokens: int
) -> list[Chunk]:
    """The chunks ingest embeds (``embedding_text``) and stores (``text`` and offsets)."""
    return chunk(
        prepared.parsed,
        tokenizer,
        max_tokens=max_tokens,
        overlap_tokens=min(overlap_tokens, max_tokens // 4),
        title=prepared.metadata.title,
    )


def _fingerprint(request: IngestRequest) -> str:
    """What makes two requests "the same" for an idempotency key."""
    digest = hashlib.sha256()
    digest.update(request.source_url.encode())
    digest.update(b"\0" + request.content_type.encode() + b"\0")
    digest.update(hashlib.sha256(request.content).digest())
    digest.update(json.dumps(metadata_to_json(request.metadata), sort_keys=True).encode())
    return digest.hexdigest()
