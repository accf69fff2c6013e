"""Ingestion and the ledger together over real NATS and gRPC: an ingested document ends
up anchored (``VerifyDocument`` true) and announced by exactly one
``ledger.anchor.committed`` — also when the ledger was down during the ingest and
started later, and across a restart after an unchanged re-ingest."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from _ingestion_support import CORPUS_ENV, find_corpus, run_ingestion_in, wait_published
from _service_support import ANCHOR_SUBJECT, Harness, published
from nats.aio.msg import Msg

from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.events.v1 import events_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.runtime.events import EventBus
from ledgerlens.runtime.testing import EventNames, eventually
from ledgerlens.services.ingestion.settings import Settings as IngestionSettings

pytestmark = pytest.mark.integration

#: small, final EIPs with real text (many corpus files are "moved" stubs)
EIPS = (140, 1052, 2681)
#: how long to keep listening after the last expected anchor, to catch a duplicate
SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class Eip:
    url: str
    content: bytes


@pytest.fixture
def eips() -> list[Eip]:
    corpus = find_corpus()
    if corpus is None:
        if os.environ.get("CI"):
            pytest.fail(f"the EIP corpus is missing (set {CORPUS_ENV})")
        pytest.skip(f"the EIP corpus is missing (set {CORPUS_ENV})")
    return [
        Eip(f"https://eips.ethereum.org/EIPS/eip-{n}", (corpus / f"eip-{n}.md").read_bytes())
        for n in EIPS
    ]


@dataclass
class AnchorListener:
    """Every ``AnchorCommitted`` published on the test's subject, as it goes by (a core
    NATS subscription: it sees each publish, even one JetStream would drop as a
    duplicate of the same message id)."""

    seen: list[events_pb2.AnchorCommitted] = field(default_factory=list)

    async def on_message(self, msg: Msg) -> None:
        self.seen.append(events_pb2.AnchorCommitted.FromString(msg.data))

    def counts(self) -> Counter[tuple[str, int]]:
        return Counter((a.document_id, a.version) for a in self.seen)


@asynccontextmanager
async def listen_for_anchors(bus: EventBus, names: EventNames) -> AsyncIterator[AnchorListener]:
    listener = AnchorListener()
    sub = await bus.connection.subscribe(names.subject(ANCHOR_SUBJECT), cb=listener.on_message)
    await bus.connection.flush()
    try:
        yield listener
    finally:
        await sub.unsubscribe()


@dataclass
class Ingestion:
    stub: ingestion_pb2_grpc.IngestionServiceAsyncStub
    database_url: str

    async def ingest(self, eip: Eip) -> ingestion_pb2.IngestDocumentResponse:
        return await self.stub.IngestDocument(
            ingestion_pb2.IngestDocumentRequest(
                source_url=eip.url, content=eip.content, content_type="text/markdown"
            )
        )

    async def anchor_of(self, document_id: str, version: int) -> Any:
        response = await self.stub.GetDocument(
            ingestion_pb2.GetDocumentRequest(document_id=document_id, version=version)
        )
        provenance = response.document.provenance
        return provenance.anchor if provenance.HasField("anchor") else None


@pytest.fixture
def start_ingestion(
    event_names: EventNames, cached_embedder: CachingEmbedder, nats_url: str, tmp_path: Path
) -> Callable[[], Any]:
    """``async with start_ingestion() as ingestion``: the real service in this test's
    event namespace, auth disabled (ingestion's own scopes are not under test here)."""
    settings = IngestionSettings.model_validate(
        {
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/ingestion.db",
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_path / "ingestion"),
            "shutdown_grace_seconds": 5.0,
            "auth": {"enabled": False},
        }
    )

    @asynccontextmanager
    async def start() -> AsyncIterator[Ingestion]:
        async with (
            run_ingestion_in(event_names, settings, cached_embedder) as running,
            grpc.aio.insecure_channel(running.grpc_address) as channel,
        ):
            yield Ingestion(ingestion_pb2_grpc.IngestionServiceStub(channel), settings.database_url)

    return start


async def verify(ledger: Harness, sha256: str) -> ledger_pb2.VerifyDocumentResponse:
    response: ledger_pb2.VerifyDocumentResponse = await ledger.call(
        "VerifyDocument", ledger_pb2.VerifyDocumentRequest(sha256=sha256)
    )
    return response


async def expect_anchored_once(
    ledger: Harness,
    ingestion: Ingestion,
    listener: AnchorListener,
    bus: EventBus,
    names: EventNames,
    ingested: list[ingestion_pb2.IngestDocumentResponse],
) -> None:
    """Each ingested version is anchored on the ledger, announced exactly once (live and
    in the stream), and ingestion recorded the anchor it was told about."""
    expected = Counter((r.document_id, r.version) for r in ingested)

    for r in ingested:

        async def anchored(sha256: str = r.sha256) -> bool:
            return (await verify(ledger, sha256)).anchored

        await eventually(anchored, within=30, interval=0.1, message=f"{r.document_id} anchored")

    async def all_announced() -> bool:
        return set(listener.counts()) >= set(expected)

    await eventually(all_announced, within=30, interval=0.1, message="every anchor announced")
    await asyncio.sleep(SETTLE_SECONDS)  # a duplicate would arrive by now
    assert listener.counts() == expected

    stored = await published(bus, names, ANCHOR_SUBJECT, events_pb2.AnchorCommitted)
    assert Counter((a.document_id, a.version) for a in stored) == expected

    announced = {(a.document_id, a.version): a for a in listener.seen}
    for r in ingested:
        response = await verify(ledger, r.sha256)
        assert response.anchored
        [record] = response.records
        assert (record.document_id, record.version, record.sha256) == (
            r.document_id,
            r.version,
            r.sha256,
        )
        assert record.source_url.startswith("https://eips.ethereum.org/EIPS/eip-")
        assert record.anchor.tx_id
        assert record.anchor.block_number >= 1
        event = announced[(r.document_id, r.version)]
        assert event.sha256 == r.sha256
        assert event.anchor == record.anchor

        async def recorded(doc: str = r.document_id, version: int = r.version) -> bool:
            return await ingestion.anchor_of(doc, version) is not None

        await eventually(recorded, within=15, interval=0.1, message="ingestion got the anchor")
        anchor = await ingestion.anchor_of(r.document_id, r.version)
        assert (anchor.tx_id, anchor.block_number, anchor.channel) == (
            record.anchor.tx_id,
            record.anchor.block_number,
            record.anchor.channel,
        )


async def test_ingested_documents_are_anchored_and_announced_once(
    start_ledger: Callable[..., Any],
    start_ingestion: Callable[[], Any],
    event_bus: EventBus,
    event_names: EventNames,
    eips: list[Eip],
) -> None:
    async with (
        start_ledger() as ledger,
        start_ingestion() as ingestion,
        listen_for_anchors(event_bus, event_names) as listener,
    ):
        ingested = [await ingestion.ingest(eip) for eip in eips]
        assert [r.status for r in ingested] == [ingestion_pb2.INGEST_STATUS_INGESTED] * len(eips)
        assert len({r.document_id for r in ingested}) == len(eips)
        await expect_anchored_once(ledger, ingestion, listener, event_bus, event_names, ingested)


async def test_documents_ingested_while_the_ledger_was_down_are_anchored_once(
    start_ledger: Callable[..., Any],
    start_ingestion: Callable[[], Any],
    event_bus: EventBus,
    event_names: EventNames,
    eips: list[Eip],
) -> None:
    async with start_ledger():
        pass  # declares its durable consumers, then the ledger is down
    async with (
        start_ingestion() as ingestion,
        listen_for_anchors(event_bus, event_names) as listener,
    ):
        ingested = [await ingestion.ingest(eip) for eip in eips]
        assert [r.status for r in ingested] == [ingestion_pb2.INGEST_STATUS_INGESTED] * len(eips)
        await wait_published(ingestion.database_url)  # DocumentIngested is on the bus
        for r in ingested:
            assert await ingestion.anchor_of(r.document_id, r.version) is None
        assert listener.seen == []

        async with start_ledger() as ledger:  # the same database: it catches up
            await expect_anchored_once(
                ledger, ingestion, listener, event_bus, event_names, ingested
            )
            before = {
                r.sha256: (await verify(ledger, r.sha256)).records[0].anchor for r in ingested
            }

        # the ledger down again; an unchanged document ingested again publishes nothing
        again = await ingestion.ingest(eips[0])
        assert again.status == ingestion_pb2.INGEST_STATUS_UNCHANGED
        assert (again.document_id, again.version, again.sha256) == (
            ingested[0].document_id,
            ingested[0].version,
            ingested[0].sha256,
        )
        await wait_published(ingestion.database_url)

        async with start_ledger() as ledger:
            await expect_anchored_once(
                ledger, ingestion, listener, event_bus, event_names, ingested
            )
            for r in ingested:
                assert (await verify(ledger, r.sha256)).records[0].anchor == before[r.sha256]
