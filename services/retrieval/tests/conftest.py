"""Fixtures of the retrieval tests: the service on each backend, real NATS, the real
model (each text embedded once per session), and a bus to publish ingestion's events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import pytest_asyncio
from _retrieval_support import Harness

from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.retrieval.v1 import retrieval_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.events import EventBus
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.retrieval.app import RETRIEVAL_CONSUMERS, run_retrieval
from ledgerlens.services.retrieval.settings import Settings


@pytest.fixture(scope="session")
def token_issuer() -> DevTokenIssuer:
    return DevTokenIssuer()


@pytest.fixture(params=["local", "qdrant"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_settings(
    nats_url: str, token_issuer: DevTokenIssuer, tmp_path: Path, backend: str
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/retrieval.db",
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_path / "data"),
            "backend": backend,
            "shutdown_grace_seconds": 5.0,
            "auth": {"static_jwks": json.dumps(token_issuer.jwks()), "issuer": token_issuer.issuer},
        }
        values.update(overrides)
        return Settings.model_validate(values)

    return make


@pytest_asyncio.fixture
async def start_retrieval(
    make_settings: Callable[..., Settings],
    event_names: EventNames,
    event_bus: EventBus,
    cached_embedder: CachingEmbedder,
    token_issuer: DevTokenIssuer,
) -> AsyncIterator[Callable[..., Any]]:
    """``async with start_retrieval(**settings) as harness``: the service in this test's
    event namespace (it may be started again on the same database and data_dir)."""
    token = token_issuer.issue("tester", ["search:read"], tenant="acme", ttl=3600)

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Harness]:
        settings = make_settings(**overrides)
        async with (
            run_retrieval(
                settings,
                embedder=cached_embedder,
                streams=event_names.platform_streams(),
                consumers=[event_names.consumer(c) for c in RETRIEVAL_CONSUMERS],
            ) as running,
            grpc.aio.insecure_channel(running.grpc_address) as channel,
        ):
            yield Harness(
                running,
                retrieval_pb2_grpc.RetrievalServiceStub(channel),
                (("authorization", f"Bearer {token}"),),
                event_names,
                settings,
                event_bus,
                cached_embedder,
            )

    yield start


@pytest_asyncio.fixture
async def retrieval(start_retrieval: Callable[..., Any]) -> AsyncIterator[Harness]:
    async with start_retrieval() as harness:
        yield harness
