"""Fixtures of the ledger tests: the dev ledger on each database engine (a SQLite
file, a PostgreSQL schema of its own), migrated exactly as the service does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.runtime.db import create_engine
from ledgerlens.services.ledger.contract import AnchoringContract
from ledgerlens.services.ledger.devledger import DevLedger, migrate


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
