"""The inference schema: alembic history equals the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

import pytest
from _inference_support import migrated_engine
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect

from ledgerlens.services.inference.schema import Base
from ledgerlens.services.inference.store import UsageRecord, UsageStore, period_end


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": False})
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_create_exactly_the_models(database_url: str) -> None:
    async with migrated_engine(database_url) as engine, engine.connect() as conn:
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        diff = await conn.run_sync(_diff)
    assert {"inference_usage", "inference_outbox"} <= tables
    assert all(t.startswith("inference_") or t == "alembic_version" for t in tables)
    assert diff == []


async def test_naive_datetimes_are_refused(sqlite_url: str) -> None:
    async with migrated_engine(sqlite_url) as engine:
        store = UsageStore(engine)
        record = UsageRecord(
            completion_id="c",
            kind="chat",
            tenant_id="t",
            api_key_id="k",
            model="m",
            provider="p",
            prompt_tokens=1,
            completion_tokens=1,
            cost_micro_usd=0,
            cached=False,
            estimated=False,
            created_at=datetime(2026, 1, 1),
        )
        with pytest.raises(Exception, match="naive"):
            await store.insert(record)


def test_period_end_of_months() -> None:
    from datetime import UTC

    assert period_end(datetime(2024, 2, 1, tzinfo=UTC), "month") == datetime(2024, 3, 1, tzinfo=UTC)
    assert period_end(datetime(2026, 12, 1, tzinfo=UTC), "month") == datetime(
        2027, 1, 1, tzinfo=UTC
    )
