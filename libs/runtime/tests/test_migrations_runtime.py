"""upgrade_to_head on SQLite and on a PostgreSQL schema of the test's own."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.migrations import upgrade_to_head
from ledgerlens.runtime.testing import PgDatabase

pytestmark = pytest.mark.integration

ENV = """
from sqlalchemy import Column, Integer, MetaData, String, Table

from ledgerlens.runtime.migrations import run_env

metadata = MetaData()
Table("widgets", metadata, Column("id", Integer, primary_key=True), Column("name", String(50)))
run_env(metadata)
"""

REVISION = '''
"""widgets"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "widgets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50)),
    )


def downgrade():
    op.drop_table("widgets")
'''


@pytest.fixture
def script_location(tmp_path: Path) -> Path:
    location = tmp_path / "migrations"
    (location / "versions").mkdir(parents=True)
    (location / "env.py").write_text(textwrap.dedent(ENV))
    (location / "versions" / "0001_widgets.py").write_text(textwrap.dedent(REVISION))
    return location


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    finally:
        await engine.dispose()
    assert version == "0001"
    return names


async def test_upgrade_creates_the_tables_once_on_sqlite(
    script_location: Path, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/nested/dir/app.db"  # the directory is created
    await upgrade_to_head(url, script_location)
    await upgrade_to_head(url, script_location)  # already at head: nothing to do
    assert {"widgets", "alembic_version"} <= await _tables(url)


async def test_upgrade_stays_in_the_schema_of_the_url_on_postgres(
    script_location: Path, pg_database: PgDatabase
) -> None:
    await upgrade_to_head(pg_database.url, script_location)
    assert {"widgets", "alembic_version"} <= await _tables(pg_database.url)
    engine = create_engine(pg_database.url)
    try:
        async with engine.connect() as conn:
            schema = (
                await conn.execute(
                    text(
                        "SELECT table_schema FROM information_schema.tables "
                        "WHERE table_name = 'widgets' AND table_schema = :s"
                    ),
                    {"s": pg_database.schema},
                )
            ).scalar()
    finally:
        await engine.dispose()
    assert schema == pg_database.schema
