"""Fixtures of the ingestion tests: the service on SQLite and PostgreSQL, real NATS, the
real model (each text embedded once per session), and the EIP corpus."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import pytest_asyncio
from _ingestion_support import CORPUS_ENV, Harness, find_corpus, run_ingestion_in

from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.ingestion.v1 import ingestion_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.ingestion.settings import Settings


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    found = find_corpus()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"the EIP corpus is missing (set {CORPUS_ENV})")
        pytest.skip(f"the EIP corpus is missing (set {CORPUS_ENV})")
    return found


@pytest.fixture(scope="session")
def eip_files(corpus_dir: Path) -> list[Path]:
    return sorted(p for p in corpus_dir.glob("eip-*.md"))


@pytest.fixture(scope="session")
def token_issuer() -> DevTokenIssuer:
    return DevTokenIssuer()


@pytest.fixture
def make_settings(
    database_url: str, nats_url: str, token_issuer: DevTokenIssuer, tmp_path: Path
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_path / "data"),
            "shutdown_grace_seconds": 5.0,
            "auth": {
                "static_jwks": __import__("json").dumps(token_issuer.jwks()),
                "issuer": token_issuer.issuer,
            },
        }
        values.update(overrides)
        return Settings.model_validate(values)

    return make


@pytest_asyncio.fixture
async def start_ingestion(
    make_settings: Callable[..., Settings],
    event_names: EventNames,
    cached_embedder: CachingEmbedder,
    token_issuer: DevTokenIssuer,
) -> AsyncIterator[Callable[..., Any]]:
    """``async with start_ingestion(**settings) as harness``: the service in this test's
    event namespace (it may be started again on the same database)."""
    from contextlib import asynccontextmanager

    # outlives the longest test (the corpus test embeds for minutes before its last call)
    token = token_issuer.issue(
        "tester",
        ["ingest:write", "ingest:read"],
        tenant="acme",
        audience="ledgerlens",
        ttl=4 * 3600,
    )

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Harness]:
        settings = make_settings(**overrides)
        async with (
            run_ingestion_in(event_names, settings, cached_embedder) as running,
            grpc.aio.insecure_channel(
                running.grpc_address,
                options=[("grpc.max_send_message_length", settings.max_message_bytes)],
            ) as channel,
        ):
            yield Harness(
                running,
                ingestion_pb2_grpc.IngestionServiceStub(channel),
                (("authorization", f"Bearer {token}"),),
                event_names,
                settings,
            )

    yield start


@pytest_asyncio.fixture
async def ingestion(start_ingestion: Callable[..., Any]) -> AsyncIterator[Harness]:
    async with start_ingestion() as harness:
        yield harness
