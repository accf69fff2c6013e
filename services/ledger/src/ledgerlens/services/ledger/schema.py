"""The ledger service's own tables (beside the dev ledger's ``devledger_*`` tables, with
an alembic history of their own, in the default ``alembic_version`` table).

``ledger_checkpoints`` holds where the event follower is in the chaincode event stream;
``ledger_outbox`` the events to publish. The follower writes both in one database
transaction per chaincode event, which is what makes publishing exactly-once (see
:mod:`ledgerlens.services.ledger.follower`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ledgerlens.runtime.db import new_metadata
from ledgerlens.runtime.outbox import outbox_table

__all__ = ["OUTBOX", "Base", "CheckpointRow"]


class Base(DeclarativeBase):
    metadata = new_metadata()


#: AnchorCommitted / AuditCommitted, written with the checkpoint that consumed them.
OUTBOX = outbox_table(Base.metadata, "ledger_outbox")


class CheckpointRow(Base):
    """The last chaincode event a follower handled (the proto's ``Checkpoint``)."""

    __tablename__ = "ledger_checkpoints"

    #: the follower: ``<channel>/<chaincode>``.
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    block_number: Mapped[int] = mapped_column(BigInteger)
    #: the last handled event's transaction in that block (never empty here).
    tx_id: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
