"""Test support of the retrieval tests (imported by name: tests are not a package)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from ledgerlens.common.v1 import common_pb2
from ledgerlens.embedding import Embedder
from ledgerlens.events.v1 import events_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from ledgerlens.runtime.events import EventBus, Subjects
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.retrieval.app import RunningRetrieval
from ledgerlens.services.retrieval.settings import Settings


def ts(year: int, month: int = 1, day: int = 1) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime(year, month, day, tzinfo=UTC))
    return stamp


@dataclass
class Doc:
    """A document version the tests publish as ``ingestion.chunks.embedded`` events."""

    document_id: str
    version: int
    texts: list[str]
    chain: str = "ethereum"
    authors: list[str] = field(default_factory=lambda: ["Ada Lovelace (@ada)"])
    tags: list[str] = field(default_factory=list)
    contracts: list[str] = field(default_factory=list)
    doc_type: int = common_pb2.DOC_TYPE_EIP
    published: timestamp_pb2.Timestamp | None = None
    source_url: str = ""
    title: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        self.source_url = self.source_url or f"https://docs.example.org/{self.document_id}"
        self.sha256 = self.sha256 or uuid.uuid5(uuid.NAMESPACE_URL, repr(self.texts)).hex * 2

    def chunk_id(self, index: int) -> str:
        return f"{self.document_id}:{self.version}:{index}"

    def metadata(self) -> common_pb2.DocumentMetadata:
        meta = common_pb2.DocumentMetadata(
            doc_type=self.doc_type,  # type: ignore[arg-type]
            chain=self.chain,
            contract_addresses=self.contracts,
            authors=self.authors,
            tags=self.tags,
            title=self.title or self.document_id,
        )
        if self.published is not None:
            meta.published_at.CopyFrom(self.published)
        return meta

    async def event(self, embedder: Embedder) -> events_pb2.ChunksEmbedded:
        vectors = await embedder.embed(self.texts)
        provenance = common_pb2.Provenance(
            document_id=self.document_id,
            version=self.version,
            source_url=self.source_url,
            sha256=self.sha256,
        )
        offset = 0
        chunks = []
        for i, (text, vector) in enumerate(zip(self.texts, vectors, strict=True)):
            chunks.append(
                events_pb2.EmbeddedChunk(
                    chunk_id=self.chunk_id(i),
                    provenance=provenance,
                    metadata=self.metadata(),
                    chunk_index=i,
                    text=text,
                    vector=vector,
                    heading_path=[self.title or self.document_id, f"Part {i}"],
                    char_start=offset,
                    char_end=offset + len(text),
                    token_count=len(text.split()),
                )
            )
            offset += len(text) + 1
        return events_pb2.ChunksEmbedded(
            document_id=self.document_id,
            version=self.version,
            embedding_model=embedder.model,
            dimensions=embedder.dimensions,
            chunks=chunks,
            batch_index=0,
            batch_count=1,
        )


@dataclass
class Harness:
    """A running retrieval service, a stub to it, and a bus to feed it events."""

    running: RunningRetrieval
    stub: retrieval_pb2_grpc.RetrievalServiceStub
    metadata: tuple[tuple[str, str], ...]
    names: EventNames
    settings: Settings
    bus: EventBus
    embedder: Embedder

    async def publish(self, subject: str, message: Message, msg_id: str = "") -> None:
        await self.bus.publish(self.names.subject(subject), message, msg_id or uuid.uuid4().hex)

    async def publish_doc(self, doc: Doc, msg_id: str = "") -> None:
        await self.publish(
            Subjects.INGESTION_CHUNKS_EMBEDDED, await doc.event(self.embedder), msg_id
        )

    async def retire(self, document_id: str, version: int) -> None:
        await self.publish(
            Subjects.INGESTION_VERSION_RETIRED,
            events_pb2.DocumentVersionRetired(document_id=document_id, retired_version=version),
        )

    async def delete(self, document_id: str, versions: Sequence[int]) -> None:
        await self.publish(
            Subjects.INGESTION_DOCUMENT_DELETED,
            events_pb2.DocumentDeleted(document_id=document_id, versions=versions),
        )

    async def search(self, query: str, **fields: object) -> retrieval_pb2.SearchResponse:
        request = retrieval_pb2.SearchRequest(query=query, **fields)  # type: ignore[arg-type]
        response: retrieval_pb2.SearchResponse = await self.stub.Search(
            request, metadata=self.metadata
        )
        return response

    async def indexed(self) -> int:
        return await self.running.indexer.backend.count()

    async def wait_for(self, check: object, seconds: float = 20.0) -> None:
        """Poll the async ``check()`` until it returns true."""
        deadline = time.monotonic() + seconds
        while True:
            if await check():  # type: ignore[operator]
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {seconds}s")
            await asyncio.sleep(0.05)

    async def wait_count(self, expected: int, seconds: float = 20.0) -> None:
        async def done() -> bool:
            return await self.indexed() == expected

        await self.wait_for(done, seconds)
