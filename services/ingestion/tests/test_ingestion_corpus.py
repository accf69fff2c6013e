"""The whole EIP corpus through IngestStream, on SQLite and PostgreSQL, real NATS.

The model embeds each chunk once per test session (``cached_embedder``): the first
database pays for the corpus (minutes on two CPUs), the second reuses the vectors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _ingestion_support import Harness, stream_events, wait_published

from ledgerlens.events.v1 import events_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2
from ledgerlens.runtime.events import Subjects
from ledgerlens.services.ingestion.ingest import document_id_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _url(token: str, path: Path) -> str:
    # a namespace per test: document ids (and so event ids) never repeat across tests
    return f"file:///corpus/{token}/{path.name}"


async def _ingest_all(
    h: Harness, files: list[Path], contents: dict[Path, bytes] | None = None
) -> dict[str, Any]:
    async def feed() -> AsyncIterator[ingestion_pb2.IngestStreamRequest]:
        for path in files:
            content = contents[path] if contents and path in contents else path.read_bytes()
            yield ingestion_pb2.IngestStreamRequest(
                correlation_id=path.name,
                document=ingestion_pb2.IngestDocumentRequest(
                    source_url=_url(h.names.token, path), content=content
                ),
            )

    results: dict[str, Any] = {}
    async for response in h.stub.IngestStream(feed(), metadata=h.metadata, timeout=3600):
        assert response.correlation_id not in results
        results[response.correlation_id] = response
    return results


@pytest.mark.timeout(3600)  # the first database embeds the corpus: ~15 min on 2 CPUs
async def test_the_whole_corpus(ingestion: Harness, eip_files: list[Path]) -> None:
    assert len(eip_files) == 949
    h = ingestion
    stream = h.stream("INGESTION")

    # 1. every EIP ingests
    results = await _ingest_all(h, eip_files)
    failed = {cid: r.error for cid, r in results.items() if r.HasField("error")}
    assert failed == {}
    assert len(results) == 949
    assert {r.result.status for r in results.values()} == {ingestion_pb2.INGEST_STATUS_INGESTED}
    total_chunks = sum(r.result.chunk_count for r in results.values())

    # 2. front matter lands in the right fields
    eip1559 = results["eip-1559.md"].result
    got = await h.stub.GetDocument(
        ingestion_pb2.GetDocumentRequest(document_id=eip1559.document_id), metadata=h.metadata
    )
    md = got.document.metadata
    assert md.title == "Fee market change for ETH 1.0 chain"
    assert "Vitalik Buterin (@vbuterin)" in md.authors
    assert len(md.authors) == 6
    assert md.published_at.ToDatetime(tzinfo=UTC) == datetime(2019, 4, 13, tzinfo=UTC)
    assert md.chain == "ethereum"
    assert md.attributes["eip"] == "1559"
    assert md.attributes["requires"] == "2718, 2930"
    assert {"core", "final", "standards-track"} <= set(md.tags)
    assert got.document.provenance.document_id == document_id_for(
        _url(h.names.token, eip_files[0].parent / "eip-1559.md")
    )

    # 3. chunk offsets slice the source back to the chunk text, for every chunk
    ingestor = h.running.ingestor
    by_name = {p.name: p for p in eip_files}
    stored_ids: set[str] = set()
    for name, response in results.items():
        source = by_name[name].read_text(encoding="utf-8")
        chunks = await ingestor.store.chunks(response.result.document_id, 1)
        assert len(chunks) == response.result.chunk_count
        for c in chunks:
            assert source[c.char_start : c.char_end] == c.text, (name, c.index)
            stored_ids.add(c.chunk_id)
    assert len(stored_ids) == total_chunks

    # every chunk was published exactly once
    published = await wait_published(h.settings.database_url, seconds=120)
    events = await stream_events(h.settings.nats_url, stream)
    assert len(events) == published
    chunk_subject = h.subject(Subjects.INGESTION_CHUNKS_EMBEDDED)
    chunk_ids = [
        c.chunk_id
        for m in events
        if m.subject == chunk_subject
        for c in events_pb2.ChunksEmbedded.FromString(m.data).chunks
    ]
    assert len(chunk_ids) == len(set(chunk_ids)) == total_chunks
    assert set(chunk_ids) == stored_ids

    # 4. re-ingesting the corpus changes nothing and publishes nothing
    again = await _ingest_all(h, eip_files)
    assert {r.result.status for r in again.values()} == {ingestion_pb2.INGEST_STATUS_UNCHANGED}
    assert {cid: r.result.version for cid, r in again.items()} == dict.fromkeys(results, 1)
    assert await wait_published(h.settings.database_url) == published
    assert len(await stream_events(h.settings.nats_url, stream)) == len(events)

    # 5. editing one file makes exactly one new version
    edited = by_name["eip-20.md"]
    changed = {edited: edited.read_bytes() + b"\n## Errata\n\nA test edit.\n"}
    third = await _ingest_all(h, eip_files, changed)
    statuses = [r.result.status for r in third.values()]
    assert statuses.count(ingestion_pb2.INGEST_STATUS_NEW_VERSION) == 1
    assert statuses.count(ingestion_pb2.INGEST_STATUS_UNCHANGED) == 948
    assert third["eip-20.md"].result.version == 2
    retired = await stream_events(
        h.settings.nats_url, stream, h.subject(Subjects.INGESTION_VERSION_RETIRED)
    )
    assert [
        events_pb2.DocumentVersionRetired.FromString(m.data).retired_version for m in retired
    ] == [1]
