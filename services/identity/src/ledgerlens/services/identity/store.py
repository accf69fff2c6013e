"""Persistence of API keys and signing keys (SQLite or PostgreSQL, SQLAlchemy async).

The domain modules (``keys.py``, ``tokens.py``) only see :class:`IdentityStore` and the
plain records it returns; no SQL leaves this module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Index,
    LargeBinary,
    String,
    Text,
    and_,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from ledgerlens.runtime.db import session_factory
from ledgerlens.runtime.outbox import add_to_outbox
from ledgerlens.services.identity.schema import OUTBOX, Base

__all__ = [
    "ApiKeyRecord",
    "ApiKeyRow",
    "IdentityStore",
    "SigningKeyConflict",
    "SigningKeyRecord",
    "SigningKeyRow",
]


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends.

    SQLite has no timezone type: values are stored as naive UTC (one format, so they
    compare and sort as text) and come back aware.
    """

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


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    scopes: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    #: HMAC-SHA256 of the secret under the server pepper; never the secret.
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoke_reason: Mapped[str | None] = mapped_column(String(256), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    __table_args__ = (Index("ix_api_keys_tenant_created", "tenant_id", "created_at", "key_id"),)


class SigningKeyRow(Base):
    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16), nullable=False)
    public_jwk: Mapped[str] = mapped_column(Text, nullable=False)
    #: PKCS#8 DER of the private key, AES-GCM encrypted under the KEK (``secrets_box``).
    private_key_encrypted: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    activated_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    #: when it stopped signing; NULL while active.
    retired_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    #: when it leaves the JWKS (every token it signed has expired by then).
    not_after: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    #: TRUE for the active key, NULL otherwise: the unique constraint (NULLs are distinct
    #: on both backends) makes "at most one active key" a database fact, even when two
    #: replicas start or rotate at once.
    active: Mapped[bool | None] = mapped_column(Boolean, nullable=True, unique=True)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key's public record (never the secret)."""

    key_id: str
    tenant_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoke_reason: str | None = None
    last_used_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    kid: str
    algorithm: str
    public_jwk: str
    private_key_encrypted: bytes
    created_at: datetime
    activated_at: datetime
    retired_at: datetime | None
    not_after: datetime | None

    @property
    def active(self) -> bool:
        return self.retired_at is None


class SigningKeyConflict(Exception):
    """Another process made a key active at the same time."""


def _api_key(row: ApiKeyRow) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row.key_id,
        tenant_id=row.tenant_id,
        name=row.name,
        scopes=tuple(row.scopes),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        revoke_reason=row.revoke_reason,
        last_used_at=row.last_used_at,
    )


def _signing_key(row: SigningKeyRow) -> SigningKeyRecord:
    return SigningKeyRecord(
        kid=row.kid,
        algorithm=row.algorithm,
        public_jwk=row.public_jwk,
        private_key_encrypted=row.private_key_encrypted,
        created_at=row.created_at,
        activated_at=row.activated_at,
        retired_at=row.retired_at,
        not_after=row.not_after,
    )


class IdentityStore:
    """The identity tables over one AsyncEngine (tables are created by migrations)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = session_factory(engine)

    # -- API keys -------------------------------------------------------------------------

    async def insert_api_key(self, record: ApiKeyRecord, secret_hash: bytes) -> None:
        async with self._sessions.begin() as session:
            session.add(
                ApiKeyRow(
                    key_id=record.key_id,
                    tenant_id=record.tenant_id,
                    name=record.name,
                    scopes=list(record.scopes),
                    secret_hash=secret_hash,
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                    revoked_at=None,
                    revoke_reason=None,
                    last_used_at=None,
                )
            )

    async def get_api_key(self, key_id: str) -> tuple[ApiKeyRecord, bytes] | None:
        """The key's record and its secret hash, or ``None``."""
        async with self._sessions() as session:
            row = await session.get(ApiKeyRow, key_id)
            return None if row is None else (_api_key(row), row.secret_hash)

    async def list_api_keys(
        self,
        tenant_id: str,
        *,
        active_at: datetime | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> list[ApiKeyRecord]:
        """Newest first; with ``active_at``, only keys neither revoked nor expired then;
        ``after`` is the (created_at, key_id) of the last key of the previous page."""
        t = ApiKeyRow
        query = select(t).where(t.tenant_id == tenant_id)
        if active_at is not None:
            query = query.where(
                t.revoked_at.is_(None), or_(t.expires_at.is_(None), t.expires_at > active_at)
            )
        if after is not None:
            created, key_id = after
            query = query.where(
                or_(t.created_at < created, and_(t.created_at == created, t.key_id < key_id))
            )
        query = query.order_by(t.created_at.desc(), t.key_id.desc()).limit(limit)
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        return [_api_key(r) for r in rows]

    async def revoke_api_key(
        self,
        key_id: str,
        reason: str,
        revoked_at: datetime,
        *,
        event_subject: str,
        event: Message,
        event_msg_id: str,
    ) -> tuple[ApiKeyRecord, bool] | None:
        """Revoke the key and write ``event`` to the outbox in the same transaction.

        Returns the record and whether this call revoked it (``False`` when it already
        was: no second event), or ``None`` for an unknown key.
        """
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.key_id == key_id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=revoked_at, revoke_reason=reason)
                .execution_options(synchronize_session=False)
            )
            changed = result.rowcount == 1  # type: ignore[attr-defined]
            if changed:
                await add_to_outbox(session, event_subject, event, event_msg_id, table=OUTBOX)
            row = await session.get(ApiKeyRow, key_id, populate_existing=True)
            return None if row is None else (_api_key(row), changed)

    async def touch_api_key(self, key_id: str, used_at: datetime) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.key_id == key_id)
                .values(last_used_at=used_at)
                .execution_options(synchronize_session=False)
            )

    # -- signing keys ---------------------------------------------------------------------

    async def signing_keys(self) -> list[SigningKeyRecord]:
        """Every signing key, newest first (retired ones included)."""
        query = select(SigningKeyRow).order_by(
            SigningKeyRow.activated_at.desc(), SigningKeyRow.kid.desc()
        )
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        return [_signing_key(r) for r in rows]

    async def get_signing_key(self, kid: str) -> SigningKeyRecord | None:
        async with self._sessions() as session:
            row = await session.get(SigningKeyRow, kid)
            return None if row is None else _signing_key(row)

    async def activate_signing_key(
        self, new: SigningKeyRecord, *, retire_at: datetime, previous_not_after: datetime
    ) -> SigningKeyRecord | None:
        """Make ``new`` the active key; the active one (if any) retires in the same
        transaction. Returns the retired key. :class:`SigningKeyConflict` when another
        process activated a key concurrently."""
        try:
            async with self._sessions.begin() as session:
                previous = (
                    await session.scalars(
                        select(SigningKeyRow).where(SigningKeyRow.active.is_(True))
                    )
                ).one_or_none()
                retired: SigningKeyRecord | None = None
                if previous is not None:
                    values: dict[str, Any] = {
                        "active": None,
                        "retired_at": retire_at,
                        "not_after": previous_not_after,
                    }
                    result = await session.execute(
                        update(SigningKeyRow)
                        .where(SigningKeyRow.kid == previous.kid, SigningKeyRow.active.is_(True))
                        .values(**values)
                        .execution_options(synchronize_session=False)
                    )
                    if result.rowcount != 1:  # type: ignore[attr-defined]
                        raise SigningKeyConflict("the active signing key changed meanwhile")
                    retired = replace(
                        _signing_key(previous), retired_at=retire_at, not_after=previous_not_after
                    )
                await session.execute(
                    insert(SigningKeyRow).values(
                        kid=new.kid,
                        algorithm=new.algorithm,
                        public_jwk=new.public_jwk,
                        private_key_encrypted=new.private_key_encrypted,
                        created_at=new.created_at,
                        activated_at=new.activated_at,
                        retired_at=None,
                        not_after=None,
                        active=True,
                    )
                )
        except IntegrityError as exc:
            raise SigningKeyConflict("another signing key was activated concurrently") from exc
        return retired
