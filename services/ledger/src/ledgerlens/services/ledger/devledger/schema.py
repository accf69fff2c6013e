"""The dev ledger's tables (one MetaData, one alembic history of its own).

``devledger_blocks`` is the ledger itself: each block's canonical data and its hash
chain (:mod:`.blocks` defines both). ``devledger_transactions`` (status by tx id,
events in ledger order) and ``devledger_state`` (the world state with each key's
version) are indexes derived from the blocks, written in the same database
transaction as the block they come from.

``devledger_pending`` is the orderer's queue made durable: every transaction handed to
the block cutter (:meth:`DevLedger.submit`) is written there, in a committed database
transaction of its own, before the submit returns, and leaves it in the database
transaction that writes the block containing it. ``seq`` is the submit order; a
ledger opening after a crash cuts what is left in that order before anything else.

Keys are stored as bytes (their UTF-8 encoding): Fabric composite keys contain NUL,
which PostgreSQL text cannot hold, and bytewise order is Fabric's key order in SQLite
(``memcmp``) and PostgreSQL (``bytea``) alike. Every table has the ``devledger_``
prefix and the history its own version table, so the dev ledger can share a
database with the ledger service's own tables.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ledgerlens.runtime.db import new_metadata

__all__ = ["VERSION_TABLE", "Base", "BlockRow", "PendingRow", "StateRow", "TransactionRow"]

#: alembic's version table of this history (not the default ``alembic_version``).
VERSION_TABLE = "devledger_alembic_version"


class Base(DeclarativeBase):
    metadata = new_metadata()


class BlockRow(Base):
    __tablename__ = "devledger_blocks"

    number: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    previous_hash: Mapped[str] = mapped_column(String(64))
    data_hash: Mapped[str] = mapped_column(String(64))
    #: sha256 of the canonical header (number, previous_hash, data_hash, committed_at).
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: RFC 3339 UTC with microseconds, exactly as hashed (a string: no driver round trip).
    committed_at: Mapped[str] = mapped_column(String(32))
    #: the block data's canonical JSON (ASCII), exactly as hashed.
    data: Mapped[bytes] = mapped_column(LargeBinary)


class TransactionRow(Base):
    """One committed transaction (the first one of a tx id; duplicates stay in the block only)."""

    __tablename__ = "devledger_transactions"
    __table_args__ = (
        Index("ix_devledger_transactions_position", "block_number", "tx_number", unique=True),
    )

    tx_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    block_number: Mapped[int] = mapped_column(BigInteger)
    #: the transaction's index in its block, 0-based.
    tx_number: Mapped[int] = mapped_column(Integer)
    chaincode: Mapped[str] = mapped_column(String(128))
    validation_code: Mapped[str] = mapped_column(String(32))
    event_name: Mapped[str | None] = mapped_column(String(256))
    event_payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    committed_at: Mapped[str] = mapped_column(String(32))


class StateRow(Base):
    """The world state: a key's committed value and the (block, tx) that wrote it."""

    __tablename__ = "devledger_state"

    namespace: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    block_number: Mapped[int] = mapped_column(BigInteger)
    tx_number: Mapped[int] = mapped_column(Integer)


class PendingRow(Base):
    """A submitted transaction not yet in a block (at most one row per tx id)."""

    __tablename__ = "devledger_pending"

    #: the submit order (SQLite's INTEGER PRIMARY KEY is its rowid, so it counts too).
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tx_id: Mapped[str] = mapped_column(String(128), unique=True)
    #: RFC 3339 UTC with microseconds: how long it has waited, for people.
    submitted_at: Mapped[str] = mapped_column(String(32))
    #: :meth:`Endorsement.to_bytes`: everything the cutter validates and records.
    endorsement: Mapped[bytes] = mapped_column(LargeBinary)
