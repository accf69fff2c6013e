"""Async SQLAlchemy engines and sessions from a URL (SQLite embedded, PostgreSQL at scale).

    engine = create_engine(settings.database_url)
    sessions = session_factory(engine)
    async with sessions.begin() as session:
        ...

A PostgreSQL URL may carry ``?search_path=<schema>`` (one schema per service or per
test in a shared database); it becomes the connection's ``search_path`` for asyncpg
and psycopg2 alike. SQLite gets WAL, a busy timeout and foreign keys, so a relay and
the service can share one file.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

__all__ = [
    "NAMING_CONVENTION",
    "create_engine",
    "database_check",
    "is_postgres",
    "is_sqlite",
    "new_metadata",
    "session_factory",
]

#: constraint names alembic can rely on (autogenerate and downgrades need names).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# how long a SQLite writer waits for another one (a bulk ingest queues many writers)
_SQLITE_BUSY_TIMEOUT_MS = 30_000


def new_metadata() -> MetaData:
    """A MetaData with the platform's naming convention; one per service, never shared."""
    return MetaData(naming_convention=NAMING_CONVENTION)


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def is_postgres(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def _split_search_path(url: URL) -> tuple[URL, str | None]:
    schema = url.query.get("search_path")
    if schema is None:
        return url, None
    if isinstance(schema, tuple):
        raise ValueError("search_path given more than once")
    for part in schema.split(","):
        if not _SCHEMA_NAME.match(part.strip()):
            raise ValueError(f"invalid schema name in search_path: {part!r}")
    return url.difference_update_query(["search_path"]), schema


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``)."""
    parsed = make_url(url)
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend == "postgresql":
        parsed, schema = _split_search_path(parsed)
        if schema is not None:
            if driver == "asyncpg":
                settings = dict(connect_args.get("server_settings", {}))
                settings["search_path"] = schema
                connect_args["server_settings"] = settings
            else:
                connect_args["options"] = f"-csearch_path={schema}"
        kwargs.setdefault("pool_pre_ping", True)
    engine = _create_async_engine(parsed, connect_args=connect_args, **kwargs)
    if backend == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        if not _is_memory(dbapi_connection):
            cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _is_memory(dbapi_connection: Any) -> bool:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA database_list")
        rows = cursor.fetchall()
    finally:
        cursor.close()
    return not any(row[2] for row in rows if row[1] == "main")


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit (no implicit refresh IO)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def database_check(engine: AsyncEngine) -> Callable[[], Awaitable[bool]]:
    """A ``/readyz`` check: the database answers ``SELECT 1`` (it raises when it does not)."""

    async def ready() -> bool:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True

    return ready
