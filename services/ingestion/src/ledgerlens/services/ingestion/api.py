"""The ingestion gRPC servicer: proto <-> domain, nothing else."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
import grpc.aio

from ledgerlens.common.v1 import common_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.runtime.auth import current_principal
from ledgerlens.runtime.errors import DomainError, InvalidArgument, timestamp_field
from ledgerlens.services.ingestion.convert import (
    DOC_TYPE_FROM_PROTO,
    metadata_from_proto,
    metadata_to_proto,
    timestamp,
    to_datetime,
)
from ledgerlens.services.ingestion.ingest import Ingestor
from ledgerlens.services.ingestion.model import (
    DocumentFilter,
    DocumentVersion,
    IngestRequest,
    IngestResult,
    IngestStatus,
)

__all__ = ["IngestionApi"]

Context = grpc.aio.ServicerContext[Any, Any]

_log = logging.getLogger(__name__)

_STATUS = {
    IngestStatus.INGESTED: ingestion_pb2.INGEST_STATUS_INGESTED,
    IngestStatus.UNCHANGED: ingestion_pb2.INGEST_STATUS_UNCHANGED,
    IngestStatus.NEW_VERSION: ingestion_pb2.INGEST_STATUS_NEW_VERSION,
}
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_CORRELATION_ID_CHARS = 128


def _check_timestamps(message: ingestion_pb2.IngestDocumentRequest) -> None:
    timestamp_field(message, "fetched_at")
    timestamp_field(message.metadata, "published_at", "metadata.published_at")


def _request(message: ingestion_pb2.IngestDocumentRequest) -> IngestRequest:
    _check_timestamps(message)
    principal = current_principal()
    return IngestRequest(
        source_url=message.source_url,
        content=message.content,
        content_type=message.content_type,
        metadata=metadata_from_proto(message.metadata),
        idempotency_key=message.idempotency_key,
        fetched_at=to_datetime(message.fetched_at) if message.HasField("fetched_at") else None,
        tenant=principal.tenant if principal is not None else "",
    )


def _response(result: IngestResult) -> ingestion_pb2.IngestDocumentResponse:
    return ingestion_pb2.IngestDocumentResponse(
        document_id=result.document_id,
        version=result.version,
        sha256=result.sha256,
        status=_STATUS[result.status],
        chunk_count=result.chunk_count,
    )


def _document(doc: DocumentVersion) -> ingestion_pb2.Document:
    anchor = None
    if doc.anchor is not None:
        anchor = common_pb2.LedgerAnchor(
            tx_id=doc.anchor.tx_id,
            block_number=doc.anchor.block_number,
            committed_at=timestamp(doc.anchor.committed_at),
            channel=doc.anchor.channel,
        )
    return ingestion_pb2.Document(
        provenance=common_pb2.Provenance(
            document_id=doc.document_id,
            version=doc.version,
            source_url=doc.source_url,
            sha256=doc.sha256,
            fetched_at=timestamp(doc.fetched_at),
            ingested_at=timestamp(doc.ingested_at),
            anchor=anchor,
        ),
        metadata=metadata_to_proto(doc.metadata),
        content_type=doc.content_type,
        size_bytes=doc.size_bytes,
        chunk_count=doc.chunk_count,
        state=(
            ingestion_pb2.DOCUMENT_STATE_ACTIVE
            if doc.active
            else ingestion_pb2.DOCUMENT_STATE_RETIRED
        ),
        latest_version=doc.latest_version,
    )


def _item_error(error: DomainError) -> common_pb2.ItemError:
    field = ""
    if isinstance(error, InvalidArgument) and error.violations:
        field = error.violations[0][0]
    return common_pb2.ItemError(code=error.code.value[0], message=error.message, field=field)


class IngestionApi(ingestion_pb2_grpc.IngestionServiceServicer):
    def __init__(self, ingestor: Ingestor, *, stream_concurrency: int = 8) -> None:
        self._ingestor = ingestor
        self._stream_concurrency = stream_concurrency

    async def IngestDocument(
        self, request: ingestion_pb2.IngestDocumentRequest, context: Context
    ) -> ingestion_pb2.IngestDocumentResponse:
        return _response(await self._ingestor.ingest(_request(request)))

    async def IngestStream(
        self,
        request_iterator: AsyncIterator[ingestion_pb2.IngestStreamRequest],
        context: Context,
    ) -> AsyncIterator[ingestion_pb2.IngestStreamResponse]:
        # Documents are read, ingested (several at once, so their chunks share embedding
        # batches) and answered as each is stored: results may come out of order.
        results: asyncio.Queue[ingestion_pb2.IngestStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._stream_concurrency)
        tasks: set[asyncio.Task[None]] = set()
        seen: set[str] = set()

        async def one(correlation_id: str, document: ingestion_pb2.IngestDocumentRequest) -> None:
            try:
                result = await self._ingestor.ingest(_request(document))
                await results.put(
                    ingestion_pb2.IngestStreamResponse(
                        correlation_id=correlation_id, result=_response(result)
                    )
                )
            except DomainError as exc:
                await results.put(
                    ingestion_pb2.IngestStreamResponse(
                        correlation_id=correlation_id, error=_item_error(exc)
                    )
                )
            except Exception:  # noqa: BLE001  (one document's failure never ends the stream)
                _log.exception("ingesting %s failed", correlation_id)
                await results.put(
                    ingestion_pb2.IngestStreamResponse(
                        correlation_id=correlation_id,
                        error=common_pb2.ItemError(
                            code=grpc.StatusCode.INTERNAL.value[0], message="internal error"
                        ),
                    )
                )
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for item in request_iterator:
                    cid = item.correlation_id
                    problem = _correlation_problem(cid, seen)
                    if problem:
                        await results.put(
                            ingestion_pb2.IngestStreamResponse(
                                correlation_id=cid,
                                error=common_pb2.ItemError(
                                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                    message=problem,
                                    field="correlation_id",
                                ),
                            )
                        )
                        continue
                    seen.add(cid)
                    await slots.acquire()
                    task = asyncio.create_task(one(cid, item.document))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                await results.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await results.get()) is not None:
                yield response
            await reader  # re-raises a failure to read the request stream
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def GetDocument(
        self, request: ingestion_pb2.GetDocumentRequest, context: Context
    ) -> ingestion_pb2.GetDocumentResponse:
        if not request.document_id:
            raise InvalidArgument("document_id is required", [("document_id", "empty")])
        found = await self._ingestor.get(request.document_id, request.version)
        return ingestion_pb2.GetDocumentResponse(document=_document(found))

    async def ListDocuments(
        self, request: ingestion_pb2.ListDocumentsRequest, context: Context
    ) -> ingestion_pb2.ListDocumentsResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgument(
                "page_size out of range", [("page_size", f"{request.page_size}: must be 1-500")]
            )
        flt = _filter(request.filter)
        fingerprint = hashlib.sha256(request.filter.SerializeToString(deterministic=True))
        token_key = fingerprint.hexdigest()[:16]
        after = _decode_page_token(request.page_token, token_key) if request.page_token else None
        found = await self._ingestor.find(flt, size + 1, after)
        page, more = found[:size], len(found) > size
        next_token = ""
        if more:
            last = page[-1]
            next_token = _encode_page_token(last.ingested_at, last.document_id, token_key)
        return ingestion_pb2.ListDocumentsResponse(
            documents=[_document(d) for d in page], next_page_token=next_token
        )

    async def DeleteDocument(
        self, request: ingestion_pb2.DeleteDocumentRequest, context: Context
    ) -> ingestion_pb2.DeleteDocumentResponse:
        if not request.document_id:
            raise InvalidArgument("document_id is required", [("document_id", "empty")])
        versions, at = await self._ingestor.delete(request.document_id, request.reason)
        return ingestion_pb2.DeleteDocumentResponse(
            document_id=request.document_id, versions=versions, deleted_at=timestamp(at)
        )


def _correlation_problem(cid: str, seen: set[str]) -> str:
    if not cid:
        return "correlation_id is required"
    if len(cid) > MAX_CORRELATION_ID_CHARS:
        return f"correlation_id is {len(cid)} characters, at most 128"
    if cid in seen:
        return f"correlation_id {cid!r} is used twice in this stream"
    return ""


def _filter(message: ingestion_pb2.DocumentFilter) -> DocumentFilter:
    doc_types = []
    for i, value in enumerate(message.doc_types):
        doc_type = DOC_TYPE_FROM_PROTO.get(value)
        if doc_type is None:
            raise InvalidArgument(
                "unknown doc type", [(f"filter.doc_types[{i}]", f"{value} is not a doc type")]
            )
        doc_types.append(doc_type)
    return DocumentFilter(
        doc_types=tuple(doc_types),
        chains=tuple(c.strip().lower() for c in message.chains),
        authors=tuple(message.authors),
        tags=tuple(t.strip().lower() for t in message.tags),
        source_url_prefix=message.source_url_prefix,
        published_after=timestamp_field(message, "published_after", "filter.published_after"),
        published_before=timestamp_field(message, "published_before", "filter.published_before"),
    )


def _encode_page_token(at: datetime, document_id: str, key: str) -> str:
    raw = json.dumps({"at": at.isoformat(), "id": document_id, "f": key}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, key: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        at, document_id, token_key = datetime.fromisoformat(data["at"]), data["id"], data["f"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            "page_token is not a token this service issued", [("page_token", "malformed")]
        ) from exc
    if token_key != key or not isinstance(document_id, str):
        raise InvalidArgument(
            "page_token belongs to a different filter",
            [("page_token", "issued for a different filter")],
        )
    return at, document_id
