"""The retrieval service's tables (one MetaData, so one alembic history).

``chunks`` is the embedded backend's durable copy of every indexed chunk (the HNSW
graph in ``data_dir`` is rebuilt from it when its snapshot is missing or stale);
``tombstones`` and ``anchors`` serve every backend: versions that must never be
indexed again, and ledger anchors joined onto results.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ledgerlens.runtime.db import new_metadata

__all__ = ["AnchorRow", "Base", "ChunkRow", "StateRow", "TombstoneRow"]


class Base(DeclarativeBase):
    metadata = new_metadata()


class ChunkRow(Base):
    __tablename__ = "chunks"

    chunk_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    #: the chunk's key in the HNSW graph; never reused.
    slot: Mapped[int] = mapped_column(BigInteger, unique=True)
    document_id: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    #: the contract's ``Chunk`` message, serialised (anchor unset).
    chunk: Mapped[bytes] = mapped_column(LargeBinary)
    #: float32 little-endian, L2-normalised.
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class TombstoneRow(Base):
    """A retired or deleted document version: never indexed again, never returned."""

    __tablename__ = "tombstones"

    document_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    reason: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AnchorRow(Base):
    """Where a document version's checksum was committed on the ledger."""

    __tablename__ = "anchors"

    document_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    #: the contract's ``LedgerAnchor`` message, serialised.
    anchor: Mapped[bytes] = mapped_column(LargeBinary)


class StateRow(Base):
    """Counters: ``generation`` grows with every change to ``chunks``."""

    __tablename__ = "index_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
