"""The identity service's tables share one MetaData (and so one alembic history)."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase

from ledgerlens.runtime.db import new_metadata
from ledgerlens.runtime.outbox import outbox_table


class Base(DeclarativeBase):
    metadata = new_metadata()


#: events written in the same transaction as the data (``identity.key.revoked``).
OUTBOX = outbox_table(Base.metadata)
