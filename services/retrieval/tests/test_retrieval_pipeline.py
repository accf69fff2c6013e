"""Ingestion and retrieval together over real NATS and gRPC: what is ingested becomes
searchable, a new version replaces the old one in results, a deletion removes it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from _ingestion_support import find_corpus, run_ingestion_in

from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.ingestion.settings import Settings as IngestionSettings

pytestmark = pytest.mark.integration

EIPS = (1559, 20, 4844)


@pytest.fixture
def eip_paths() -> list[Path]:
    corpus = find_corpus()
    if corpus is None:
        pytest.skip("the EIP corpus is missing (set LEDGERLENS_CORPUS_DIR)")
    return [corpus / f"eip-{n}.md" for n in EIPS]


@pytest.mark.parametrize("backend", ["local"], indirect=True)
async def test_ingested_documents_become_searchable_and_versions_replace_each_other(
    start_retrieval: Callable[..., Any],
    event_names: EventNames,
    cached_embedder: CachingEmbedder,
    token_issuer: DevTokenIssuer,
    nats_url: str,
    tmp_path: Path,
    eip_paths: list[Path],
) -> None:
    ingestion_settings = IngestionSettings.model_validate(
        {
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/ingestion.db",
            "nats_url": nats_url,
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_path / "ingestion"),
            "auth": {"enabled": False},
        }
    )
    async with (
        start_retrieval() as retrieval,
        run_ingestion_in(event_names, ingestion_settings, cached_embedder) as ingestion,
        grpc.aio.insecure_channel(ingestion.grpc_address) as channel,
    ):
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        results = {}
        started = time.monotonic()
        for path in eip_paths:
            url = f"https://eips.ethereum.org/EIPS/{path.stem}"
            results[path.stem] = await stub.IngestDocument(
                ingestion_pb2.IngestDocumentRequest(
                    source_url=url, content=path.read_bytes(), content_type="text/markdown"
                )
            )
        total = sum(r.chunk_count for r in results.values())
        await retrieval.wait_count(total, seconds=60)
        assert time.monotonic() - started < 60

        fee = results["eip-1559"]
        response = await retrieval.search("burn the base fee per gas", top_k=5)
        top = response.results[0].chunk
        assert top.provenance.document_id == fee.document_id
        assert top.provenance.sha256 == fee.sha256
        assert top.provenance.source_url == "https://eips.ethereum.org/EIPS/eip-1559"
        assert top.metadata.attributes["eip"] == "1559"
        assert any("Vitalik Buterin" in a for a in top.metadata.authors)
        blob = await retrieval.search(
            "blob carrying transactions",
            filter=retrieval_pb2.SearchFilter(authors=["@vbuterin"], tags=[]),
            top_k=50,
        )
        assert blob.results
        assert all(
            any("vbuterin" in a.lower() for a in r.chunk.metadata.authors) for r in blob.results
        )

        # a changed EIP-1559 makes version 2; version 1 never comes back
        changed = eip_paths[0].read_bytes() + b"\n\n## Addendum\n\nA zeppelin-shaped fee oracle.\n"
        second = await stub.IngestDocument(
            ingestion_pb2.IngestDocumentRequest(
                source_url="https://eips.ethereum.org/EIPS/eip-1559",
                content=changed,
                content_type="text/markdown",
            )
        )
        assert second.version == 2
        others = total - fee.chunk_count
        await retrieval.wait_count(others + second.chunk_count, seconds=60)

        async def only_v2() -> bool:
            found = await retrieval.search(
                "base fee",
                filter=retrieval_pb2.SearchFilter(document_ids=[fee.document_id]),
                top_k=100,
            )
            return {r.chunk.provenance.version for r in found.results} == {2}

        await retrieval.wait_for(only_v2)
        addendum = await retrieval.search("zeppelin-shaped fee oracle", top_k=1)
        assert addendum.results[0].chunk.provenance.version == 2

        await stub.DeleteDocument(
            ingestion_pb2.DeleteDocumentRequest(document_id=fee.document_id, reason="test")
        )
        await retrieval.wait_count(others, seconds=60)
        gone = await retrieval.search(
            "base fee",
            filter=retrieval_pb2.SearchFilter(document_ids=[fee.document_id]),
            top_k=100,
        )
        assert list(gone.results) == []
