"""The ingestion service over real gRPC, real NATS, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import grpc.aio
import pytest
from _ingestion_support import Harness, stream_events, wait_published
from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.common.v1 import common_pb2
from ledgerlens.events.v1 import events_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2
from ledgerlens.runtime.errors import FailedPrecondition, InvalidArgument, from_rpc_error
from ledgerlens.runtime.events import Subjects

pytestmark = pytest.mark.integration

DOC = b"""---
title: Widget protocol
author: Ada (@ada), Bob <bob@example.org>
created: 2021-03-04
status: Draft
---

# Widget protocol

Widgets are minted by the registry.

## Security

Nobody may burn another's widget.
"""


def _req(
    url: str = "https://example.org/widget.md", content: bytes = DOC, **kw: Any
) -> ingestion_pb2.IngestDocumentRequest:
    return ingestion_pb2.IngestDocumentRequest(source_url=url, content=content, **kw)


async def _ingest(h: Harness, request: ingestion_pb2.IngestDocumentRequest) -> Any:
    return await h.stub.IngestDocument(request, metadata=h.metadata, timeout=60)


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_ingest_then_get_list_and_unchanged(ingestion: Harness) -> None:
    first = await _ingest(ingestion, _req())
    assert first.status == ingestion_pb2.INGEST_STATUS_INGESTED
    assert first.version == 1
    assert first.chunk_count >= 2
    assert len(first.sha256) == 64

    again = await _ingest(ingestion, _req())
    assert again.status == ingestion_pb2.INGEST_STATUS_UNCHANGED
    assert (again.document_id, again.version, again.sha256) == (
        first.document_id,
        1,
        first.sha256,
    )

    got = await ingestion.stub.GetDocument(
        ingestion_pb2.GetDocumentRequest(document_id=first.document_id), metadata=ingestion.metadata
    )
    doc = got.document
    assert doc.provenance.source_url == "https://example.org/widget.md"
    assert doc.metadata.title == "Widget protocol"
    assert list(doc.metadata.authors) == ["Ada (@ada)", "Bob <bob@example.org>"]
    assert doc.metadata.published_at.ToDatetime(tzinfo=UTC) == datetime(2021, 3, 4, tzinfo=UTC)
    assert doc.state == ingestion_pb2.DOCUMENT_STATE_ACTIVE
    assert doc.content_type == "text/markdown"

    listed = await ingestion.stub.ListDocuments(
        ingestion_pb2.ListDocumentsRequest(), metadata=ingestion.metadata
    )
    assert [d.provenance.document_id for d in listed.documents] == [first.document_id]

    # the unchanged ingest published nothing more
    published = await wait_published(ingestion.settings.database_url)
    stored = await stream_events(ingestion.settings.nats_url, ingestion.stream("INGESTION"))
    assert len(stored) == published
    ingested = [m for m in stored if m.subject.endswith("document.ingested.v1")]
    assert len(ingested) == 1


async def test_changed_content_makes_one_new_version_and_retires_the_old(
    ingestion: Harness,
) -> None:
    v1 = await _ingest(ingestion, _req())
    v2 = await _ingest(ingestion, _req(content=DOC.replace(b"registry", b"minting registry")))
    assert v2.status == ingestion_pb2.INGEST_STATUS_NEW_VERSION
    assert (v2.document_id, v2.version) == (v1.document_id, 2)
    assert v2.sha256 != v1.sha256

    old = await ingestion.stub.GetDocument(
        ingestion_pb2.GetDocumentRequest(document_id=v1.document_id, version=1),
        metadata=ingestion.metadata,
    )
    assert old.document.state == ingestion_pb2.DOCUMENT_STATE_RETIRED
    assert old.document.latest_version == 2

    await wait_published(ingestion.settings.database_url)
    stored = await stream_events(
        ingestion.settings.nats_url,
        ingestion.stream("INGESTION"),
        ingestion.subject(Subjects.INGESTION_VERSION_RETIRED),
    )
    retired = [events_pb2.DocumentVersionRetired.FromString(m.data) for m in stored]
    assert [(r.retired_version, r.superseded_by_version) for r in retired] == [(1, 2)]


async def test_chunk_events_carry_vectors_and_provenance(ingestion: Harness) -> None:
    result = await _ingest(ingestion, _req())
    await wait_published(ingestion.settings.database_url)
    stored = await stream_events(
        ingestion.settings.nats_url,
        ingestion.stream("INGESTION"),
        ingestion.subject(Subjects.INGESTION_CHUNKS_EMBEDDED),
    )
    chunks = [c for m in stored for c in events_pb2.ChunksEmbedded.FromString(m.data).chunks]
    assert len(chunks) == result.chunk_count
    text = DOC.decode()
    for c in chunks:
        assert text[c.char_start : c.char_end] == c.text
        assert len(c.vector) == 384
        assert abs(sum(v * v for v in c.vector) - 1.0) < 1e-3
        assert c.provenance.sha256 == result.sha256
        assert c.metadata.title == "Widget protocol"
    assert any(list(c.heading_path) == ["Widget protocol", "Security"] for c in chunks)


def _pdf_bytes() -> bytes:
    return b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"  # no pages, no xref: malformed


BAD = {
    "empty": (_req(content=b""), "content"),
    "over the size limit": (_req(content=b"# big\n\n" + b"word " * 2000), "content"),
    "unsupported content type": (_req(content_type="application/msword"), "content_type"),
    "malformed PDF": (
        _req(url="https://example.org/paper.pdf", content=_pdf_bytes()),
        "content",
    ),
    "bad contract address checksum": (
        _req(
            metadata=common_pb2.DocumentMetadata(
                contract_addresses=["0xde0B295669a9FD93d5F28D9Ec85E40f4cb697BAe".replace("B", "b")]
            )
        ),
        "metadata.contract_addresses[0]",
    ),
    "unparseable date": (
        _req(content=DOC.replace(b"2021-03-04", b"the day after")),
        "metadata.published_at",
    ),
    "relative source URL": (_req(url="widget.md"), "source_url"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_input_is_invalid_argument_and_leaves_nothing(
    start_ingestion: Callable[..., Any], case: str
) -> None:
    request, field = BAD[case]
    async with start_ingestion(max_document_bytes=8192) as h:
        error = await _error(_ingest(h, request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        domain = from_rpc_error(error)
        assert isinstance(domain, InvalidArgument)
        assert [f for f, _ in domain.violations] == [field], domain.violations

        listed = await h.stub.ListDocuments(
            ingestion_pb2.ListDocumentsRequest(), metadata=h.metadata
        )
        assert list(listed.documents) == []
        assert await wait_published(h.settings.database_url) == 0  # no outbox rows
        assert await stream_events(h.settings.nats_url, h.stream("INGESTION")) == []


async def test_idempotency_key_replays_and_refuses_other_content(ingestion: Harness) -> None:
    first = await _ingest(ingestion, _req(idempotency_key="k-1"))
    replay = await _ingest(ingestion, _req(idempotency_key="k-1"))
    assert replay == first  # the first result, status included
    error = await _error(
        _ingest(ingestion, _req(content=DOC + b"\nMore.\n", idempotency_key="k-1"))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(from_rpc_error(error), FailedPrecondition)


async def test_stream_reports_each_document_and_a_bad_one_aborts_nothing(
    ingestion: Harness,
) -> None:
    requests = [
        ingestion_pb2.IngestStreamRequest(
            correlation_id=f"d{i}",
            document=_req(
                url=f"https://example.org/w{i}.md", content=DOC + f"\nPart {i}.\n".encode()
            ),
        )
        for i in range(6)
    ]
    requests.insert(
        3,
        ingestion_pb2.IngestStreamRequest(
            correlation_id="bad", document=_req(url="https://example.org/bad.md", content=b"   \n")
        ),
    )
    requests.append(ingestion_pb2.IngestStreamRequest(correlation_id="d0", document=_req()))

    async def feed() -> AsyncIterator[ingestion_pb2.IngestStreamRequest]:
        for r in requests:
            yield r

    results = {}
    async for response in ingestion.stub.IngestStream(feed(), metadata=ingestion.metadata):
        results.setdefault(response.correlation_id, []).append(response)
    assert sorted(results) == ["bad", "d0", "d1", "d2", "d3", "d4", "d5"]
    assert results["bad"][0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results["bad"][0].error.field == "content"
    ok = [r for cid, rs in results.items() for r in rs if r.HasField("result")]
    assert len(ok) == 6
    duplicate = [r for r in results["d0"] if r.HasField("error")]
    assert duplicate
    assert duplicate[0].error.field == "correlation_id"


async def test_delete_publishes_and_hides_the_document(ingestion: Harness) -> None:
    result = await _ingest(ingestion, _req())
    deleted = await ingestion.stub.DeleteDocument(
        ingestion_pb2.DeleteDocumentRequest(document_id=result.document_id, reason="spam"),
        metadata=ingestion.metadata,
    )
    assert list(deleted.versions) == [1]
    error = await _error(
        ingestion.stub.GetDocument(
            ingestion_pb2.GetDocumentRequest(document_id=result.document_id),
            metadata=ingestion.metadata,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    again = await _error(
        ingestion.stub.DeleteDocument(
            ingestion_pb2.DeleteDocumentRequest(document_id=result.document_id),
            metadata=ingestion.metadata,
        )
    )
    assert again.code() == grpc.StatusCode.NOT_FOUND
    # ingesting the source again continues its version numbers
    back = await _ingest(ingestion, _req())
    assert (back.status, back.version) == (ingestion_pb2.INGEST_STATUS_INGESTED, 2)

    await wait_published(ingestion.settings.database_url)
    stored = await stream_events(
        ingestion.settings.nats_url,
        ingestion.stream("INGESTION"),
        ingestion.subject(Subjects.INGESTION_DOCUMENT_DELETED),
    )
    events = [events_pb2.DocumentDeleted.FromString(m.data) for m in stored]
    assert [(e.document_id, list(e.versions), e.reason) for e in events] == [
        (result.document_id, [1], "spam")
    ]


async def test_ledger_anchor_is_recorded(ingestion: Harness) -> None:
    import nats

    result = await _ingest(ingestion, _req())
    committed = Timestamp()
    committed.FromDatetime(datetime(2026, 11, 29, 12, 0, tzinfo=UTC))
    event = events_pb2.AnchorCommitted(
        document_id=result.document_id,
        version=1,
        sha256=result.sha256,
        anchor=common_pb2.LedgerAnchor(
            tx_id="ab" * 32, block_number=7, committed_at=committed, channel="ledgerlens"
        ),
    )
    nc = await nats.connect(ingestion.settings.nats_url)
    try:
        await nc.jetstream().publish(
            ingestion.subject(Subjects.LEDGER_ANCHOR_COMMITTED), event.SerializeToString()
        )
    finally:
        await nc.close()
    deadline = time.monotonic() + 10
    anchor = None
    while time.monotonic() < deadline:
        got = await ingestion.stub.GetDocument(
            ingestion_pb2.GetDocumentRequest(document_id=result.document_id),
            metadata=ingestion.metadata,
        )
        if got.document.provenance.HasField("anchor"):
            anchor = got.document.provenance.anchor
            break
        await asyncio.sleep(0.1)
    assert anchor is not None, "the anchor was not recorded"
    assert (anchor.tx_id, anchor.block_number, anchor.channel) == ("ab" * 32, 7, "ledgerlens")


async def test_list_filters_and_pages(ingestion: Harness) -> None:
    for i in range(5):
        tags = ["defi"] if i % 2 else ["nft"]
        await _ingest(
            ingestion,
            _req(
                url=f"https://forum.example.org/t/{i}.md",
                content=DOC + f"\nPost {i}.\n".encode(),
                metadata=common_pb2.DocumentMetadata(tags=tags, chain="polygon" if i < 2 else ""),
            ),
        )
    seen: list[str] = []
    token = ""
    while True:
        page = await ingestion.stub.ListDocuments(
            ingestion_pb2.ListDocumentsRequest(page_size=2, page_token=token),
            metadata=ingestion.metadata,
        )
        seen += [d.provenance.source_url for d in page.documents]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5
    assert seen[0].endswith("/4.md")  # newest ingest first

    defi = await ingestion.stub.ListDocuments(
        ingestion_pb2.ListDocumentsRequest(filter=ingestion_pb2.DocumentFilter(tags=["defi"])),
        metadata=ingestion.metadata,
    )
    assert sorted(d.provenance.source_url[-4:] for d in defi.documents) == ["1.md", "3.md"]
    polygon = await ingestion.stub.ListDocuments(
        ingestion_pb2.ListDocumentsRequest(
            filter=ingestion_pb2.DocumentFilter(chains=["polygon"], tags=["nft"])
        ),
        metadata=ingestion.metadata,
    )
    assert [d.provenance.source_url[-4:] for d in polygon.documents] == ["0.md"]

    wrong = await _error(
        ingestion.stub.ListDocuments(
            ingestion_pb2.ListDocumentsRequest(
                filter=ingestion_pb2.DocumentFilter(tags=["defi"]), page_token=token or "abc"
            ),
            metadata=ingestion.metadata,
        )
    )
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT
