"""Fixtures of the identity tests: every store-backed test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.runtime.db import create_engine
from ledgerlens.services.identity.migrate import migrate
from ledgerlens.services.identity.service import IdentityCore
from ledgerlens.services.identity.settings import Settings


class MutableClock:
    """A wall clock the test moves by hand (``advance``), for expiry and rotation."""

    def __init__(self, start: datetime | None = None) -> None:
        # Whole seconds: JWT times are integers, so tests can compare exactly.
        self.now = (start or datetime.now(UTC)).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeSleep:
    """Records requested delays instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest_asyncio.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a migrated identity database: SQLite, or a PostgreSQL schema of its own."""
    await migrate(database_url)  # the alembic history, exactly as the service upgrades
    eng = create_engine(database_url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def clock() -> MutableClock:
    return MutableClock()


@pytest.fixture
def fake_sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), redis_url=None)


@pytest.fixture
def kek() -> bytes:
    """The key-encryption key of this test's service (as if read from its file)."""
    return secrets.token_bytes(32)


@pytest_asyncio.fixture
async def core(
    engine: AsyncEngine,
    settings: Settings,
    clock: MutableClock,
    fake_sleep: FakeSleep,
    kek: bytes,
) -> AsyncIterator[IdentityCore]:
    core = IdentityCore(settings, engine, clock=clock, sleep=fake_sleep, kek=kek)
    await core.start()
    try:
        yield core
    finally:
        await core.close()


# The CA fixtures live beside this file (shared helpers too, imported by the tests).
from _ca_fixtures import ca, ca_db_url, ca_dir, ca_engine, ca_store  # noqa: E402, F401
