"""Alembic migrations for every service, the same way.

A service keeps its history in ``src/ledgerlens/services/<svc>/migrations/`` with an
``env.py`` of two lines::

    from ledgerlens.runtime.migrations import run_env
    from ledgerlens.services.identity.schema import Base

    run_env(Base.metadata)

and upgrades at start (or from a Kubernetes Job) with
``await upgrade_to_head(settings.database_url, MIGRATIONS_DIR)``. The same URL forms as
:func:`ledgerlens.runtime.db.create_engine` work (SQLite, PostgreSQL with
``?search_path=``), so tests migrate their own schema exactly as production does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import Connection, MetaData

from ledgerlens.runtime.db import create_engine, is_sqlite

__all__ = ["alembic_config", "run_env", "upgrade_to_head"]


def alembic_config(database_url: str, script_location: str | Path) -> Config:
    """An alembic ``Config`` built in code (no ``alembic.ini`` to keep in step)."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    # alembic reads options through ConfigParser: a literal % must be doubled
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


async def upgrade_to_head(database_url: str, script_location: str | Path) -> None:
    """Apply every migration not yet applied to ``database_url``."""
    if is_sqlite(database_url):
        _ensure_sqlite_dir(database_url)
    config = alembic_config(database_url, script_location)
    # alembic's command API is synchronous; env.py runs its own event loop for the
    # async engine, so it runs in a worker thread rather than blocking this loop
    await asyncio.to_thread(command.upgrade, config, "head")


def run_env(target_metadata: MetaData) -> None:
    """The body of a service's ``migrations/env.py`` (online, async engine)."""
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("sqlalchemy.url is not set on the alembic config")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_run_online(url, target_metadata))


async def _run_online(url: str, target_metadata: MetaData) -> None:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_migrate, target_metadata, is_sqlite(url))
            await connection.commit()
    finally:
        await engine.dispose()


def _migrate(connection: Connection, target_metadata: MetaData, sqlite: bool) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: alembic copies the table instead
        render_as_batch=sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _ensure_sqlite_dir(database_url: str) -> None:
    path = database_url.split(":///", 1)[-1].split("?", 1)[0]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
