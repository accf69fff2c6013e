"""The inference service's tables share one MetaData (and so one alembic history).

Every table is prefixed ``inference_`` (the outbox too), so the service can share a
database or schema with others without a name clash.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

from ledgerlens.runtime.db import new_metadata
from ledgerlens.runtime.outbox import outbox_table

__all__ = ["OUTBOX", "Base", "UtcDateTime"]


class Base(DeclarativeBase):
    metadata = new_metadata()


#: events written in the same transaction as the data (``inference.completion.recorded``);
#: give it to ``OutboxRelay(bus, engine, table=OUTBOX)``.
OUTBOX = outbox_table(Base.metadata, name="inference_outbox")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores naive UTC text, so
    values compare, sort and truncate with ``strftime`` as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
