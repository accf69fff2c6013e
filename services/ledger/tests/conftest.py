"""Fixtures of the ledger tests: the dev ledger on each database engine (a SQLite
file, a PostgreSQL schema of its own), migrated exactly as the service does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import pytest_asyncio
from _service_support import Harness
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.fabric.testing import TestPeer, new_test_identity
from ledgerlens.ledger.v1 import ledger_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.ledger.app import LEDGER_CONSUMERS, run_ledger
from ledgerlens.services.ledger.contract import AnchoringContract
from ledgerlens.services.ledger.devledger import DevLedger, migrate
from ledgerlens.services.ledger.settings import Settings


@pytest_asyncio.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await migrate(database_url)
    eng = create_engine(database_url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest_asyncio.fixture
async def open_ledger(engine: AsyncEngine) -> AsyncIterator[Callable[[], Awaitable[DevLedger]]]:
    """``await open_ledger()``: a DevLedger on this test's database (again and again)."""
    opened: list[DevLedger] = []

    async def open_() -> DevLedger:
        ledger = await DevLedger.open(engine, [AnchoringContract()], poll_interval=0.2)
        opened.append(ledger)
        return ledger

    yield open_
    for ledger in opened:
        await ledger.close()


@pytest_asyncio.fixture
async def ledger(open_ledger: Callable[[], Awaitable[DevLedger]]) -> DevLedger:
    return await open_ledger()


# -- the service (real gRPC, real NATS in the test's own event namespace) -------------------


@pytest.fixture(scope="session")
def token_issuer() -> DevTokenIssuer:
    return DevTokenIssuer()


@pytest.fixture
def make_settings(
    sqlite_url: str, nats_url: str, token_issuer: DevTokenIssuer, tmp_path: Path
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": sqlite_url,
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_path / "data"),
            "shutdown_grace_seconds": 5.0,
            "dev": {"poll_interval_seconds": 0.2},
            "auth": {"static_jwks": json.dumps(token_issuer.jwks()), "issuer": token_issuer.issuer},
        }
        values.update(overrides)
        return Settings.model_validate(values)

    return make


@pytest_asyncio.fixture
async def start_ledger(
    make_settings: Callable[..., Settings], event_names: EventNames, token_issuer: DevTokenIssuer
) -> AsyncIterator[Callable[..., Any]]:
    """``async with start_ledger(**settings) as harness``: the service in this test's event
    namespace (it may be started again on the same database)."""
    token = token_issuer.issue("tester", ["ledger:submit", "ledger:read"], ttl=3600)

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Harness]:
        settings = make_settings(**overrides)
        async with (
            run_ledger(
                settings,
                streams=event_names.platform_streams(),
                consumers=[event_names.consumer(c) for c in LEDGER_CONSUMERS],
            ) as running,
            grpc.aio.insecure_channel(running.grpc_address) as channel,
        ):
            yield Harness(
                running,
                ledger_pb2_grpc.LedgerServiceStub(channel),
                (("authorization", f"Bearer {token}"),),
                event_names,
                settings,
            )

    yield start


@pytest_asyncio.fixture
async def service(start_ledger: Callable[..., Any]) -> AsyncIterator[Harness]:
    async with start_ledger() as harness:
        yield harness


@pytest.fixture
def fabric_service(start_ledger: Callable[..., Any], tmp_path: Path) -> Callable[..., Any]:
    """``async with fabric_service(**fabric_settings) as (peer, harness)``: the service on
    the Fabric backend, against a TestPeer (Org1MSP, Org2MSP) hosting the contract."""

    @asynccontextmanager
    async def start(**fabric: Any) -> AsyncIterator[tuple[TestPeer, Harness]]:
        identity, _, key_pem = new_test_identity("Org1MSP")
        (tmp_path / "cert.pem").write_bytes(identity.certificate_pem)
        (tmp_path / "key.pem").write_bytes(key_pem)
        async with TestPeer(
            channel="ledgerlens",
            organizations=["Org1MSP", "Org2MSP"],
            chaincodes=[AnchoringContract()],
        ) as peer:
            settings = {
                "peer_address": peer.address,
                "msp_id": "Org1MSP",
                "certificate_path": str(tmp_path / "cert.pem"),
                "private_key_path": str(tmp_path / "key.pem"),
                **fabric,
            }
            async with start_ledger(backend="fabric", fabric=settings) as harness:
                yield peer, harness

    return start


@pytest_asyncio.fixture(params=["dev", "fabric"])
async def any_service(
    request: pytest.FixtureRequest,
    start_ledger: Callable[..., Any],
    fabric_service: Callable[..., Any],
) -> AsyncIterator[Harness]:
    """The service on each backend that runs here: the same behaviour suite for both."""
    if request.param == "dev":
        async with start_ledger() as harness:
            yield harness
    else:
        async with fabric_service() as (_peer, harness):
            yield harness
