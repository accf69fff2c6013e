"""Alembic environment of the dev ledger.

As :func:`ledgerlens.runtime.migrations.run_env`, but with a version table of its own
(``devledger_alembic_version``): the dev ledger may live in the same database as the
ledger service's tables, and two histories cannot share one version table.
"""

import asyncio

from alembic import context
from sqlalchemy import Connection

from ledgerlens.runtime.db import create_engine, is_sqlite
from ledgerlens.services.ledger.devledger.schema import VERSION_TABLE, Base


def _migrate(connection: Connection, sqlite: bool) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_migrate, is_sqlite(url))
            await connection.commit()
    finally:
        await engine.dispose()


def _run() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("sqlalchemy.url is not set on the alembic config")
    if context.is_offline_mode():
        context.configure(
            url=url, target_metadata=Base.metadata, version_table=VERSION_TABLE, literal_binds=True
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_run_online(url))


_run()
