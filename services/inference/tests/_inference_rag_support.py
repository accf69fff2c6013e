"""A real retrieval service fed by real ingestion over gRPC with a few EIPs, for the
tests of grounded answers (``test_inference_rag.py`` uses it directly,
``test_inference_answers.py`` puts the inference service in front of it).

    async with corpus_services(nats_url, names, embedder, tmp_dir, issuer) as corpus:
        corpus.retrieval_address       # retrieval's gRPC address
        corpus.service_token           # inference's own token for it (search:read)
        corpus.chunks                  # chunks indexed

It skips the test when the EIP corpus is missing (``LEDGERLENS_CORPUS_DIR``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from _ingestion_support import find_corpus, run_ingestion_in

from ledgerlens.embedding import Embedder
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.ingestion.settings import Settings as IngestionSettings
from ledgerlens.services.retrieval.app import (
    RETRIEVAL_CONSUMERS,
    RunningRetrieval,
    run_retrieval,
)
from ledgerlens.services.retrieval.settings import Settings as RetrievalSettings

__all__ = ["EIPS", "Corpus", "corpus_services", "wait_indexed"]

#: the EIPs ingested (their markdown files in the corpus)
EIPS = (1559, 155, 2718, 3675)


@dataclass(frozen=True)
class Corpus:
    retrieval: RunningRetrieval
    retrieval_address: str
    #: the inference service's own token for retrieval (scope search:read)
    service_token: str
    issuer: DevTokenIssuer
    chunks: int


async def wait_indexed(retrieval: RunningRetrieval, expected: int, seconds: float = 90.0) -> None:
    backend = retrieval.indexer.backend
    deadline = time.monotonic() + seconds
    while await backend.count() < expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{expected} chunks not indexed within {seconds}s")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def corpus_services(
    nats_url: str,
    names: EventNames,
    embedder: Embedder,
    tmp_dir: Path,
    issuer: DevTokenIssuer,
) -> AsyncIterator[Corpus]:
    corpus = find_corpus()
    if corpus is None:
        pytest.skip("the EIP corpus is missing (set LEDGERLENS_CORPUS_DIR)")
    retrieval_settings = RetrievalSettings.model_validate(
        {
            "database_url": f"sqlite+aiosqlite:///{tmp_dir}/retrieval.db",
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_dir / "retrieval"),
            "backend": "local",
            "shutdown_grace_seconds": 2.0,
            "auth": {"static_jwks": json.dumps(issuer.jwks()), "issuer": issuer.issuer},
        }
    )
    ingestion_settings = IngestionSettings.model_validate(
        {
            "database_url": f"sqlite+aiosqlite:///{tmp_dir}/ingestion.db",
            "nats_url": nats_url,
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_dir / "ingestion"),
            "shutdown_grace_seconds": 2.0,
            "auth": {"enabled": False},
        }
    )
    async with (
        run_retrieval(
            retrieval_settings,
            embedder=embedder,
            streams=names.platform_streams(),
            consumers=[names.consumer(c) for c in RETRIEVAL_CONSUMERS],
        ) as retrieval,
        run_ingestion_in(names, ingestion_settings, embedder) as ingestion,
        grpc.aio.insecure_channel(ingestion.grpc_address) as channel,
    ):
        ingest = ingestion_pb2_grpc.IngestionServiceStub(channel)
        total = 0
        for number in EIPS:
            path = corpus / f"eip-{number}.md"
            response = await ingest.IngestDocument(
                ingestion_pb2.IngestDocumentRequest(
                    source_url=f"https://eips.ethereum.org/EIPS/{path.stem}",
                    content=path.read_bytes(),
                    content_type="text/markdown",
                )
            )
            total += response.chunk_count
        await wait_indexed(retrieval, total)
        yield Corpus(
            retrieval,
            retrieval.grpc_address,
            issuer.issue("inference", ["search:read"], ttl=3600),
            issuer,
            total,
        )
