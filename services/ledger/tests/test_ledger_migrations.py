"""The dev ledger's alembic history: up, down and up again on each engine, beside
another history in the same database (its own version table)."""

from __future__ import annotations

import asyncio

from alembic import command
from sqlalchemy import inspect, text

from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.migrations import alembic_config
from ledgerlens.services.ledger.devledger import migrate
from ledgerlens.services.ledger.devledger.migrate import MIGRATIONS_DIR

TABLES = {"devledger_blocks", "devledger_transactions", "devledger_state", "devledger_pending"}


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


async def test_migrations_round_trip_beside_another_history(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:  # the service's own history, say
            await conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
            await conn.execute(text("INSERT INTO alembic_version VALUES ('abc123')"))
    finally:
        await engine.dispose()

    await migrate(database_url)
    assert TABLES | {"devledger_alembic_version", "alembic_version"} <= await _tables(database_url)
    config = alembic_config(database_url, MIGRATIONS_DIR)
    await asyncio.to_thread(command.downgrade, config, "base")
    assert not TABLES & await _tables(database_url)
    await migrate(database_url)
    await migrate(database_url)  # idempotent
    assert await _tables(database_url) >= TABLES
