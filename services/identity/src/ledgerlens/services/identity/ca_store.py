"""Persistence of the certificate authority: enrollment identities, issued certificates
(with their revocation state) and the CRL number.

Only public material and hashes live here: a certificate's PEM, an identity's
*hashed* secret. The CA's private key never reaches the database (see ``ca.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    Text,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from ledgerlens.runtime.errors import AlreadyExists

from .schema import Base

__all__ = [
    "Attribute",
    "CaCertificateRow",
    "CaCrlCounterRow",
    "CaIdentityRow",
    "CaStore",
    "IdentityRecord",
    "IssuedRecord",
]


class CaIdentityRow(Base):
    """A registered enrollment identity (Fabric CA's ``users`` table, our shape)."""

    __tablename__ = "ca_identities"

    enrollment_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: ``scrypt$N$r$p$salt$hash`` (base64); null: enrolls only when already authenticated.
    secret_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    affiliation: Mapped[str] = mapped_column(String(255), default="")
    #: JSON list of ``{"name", "value", "ecert"}``.
    attrs_json: Mapped[str] = mapped_column(Text, default="[]")
    #: null: unlimited.
    max_enrollments: Mapped[int | None] = mapped_column(Integer, nullable=True)
    enrollments: Mapped[int] = mapped_column(Integer, default=0)
    #: set when the identity itself was revoked (Fabric CA: no further enrollments).
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CaCertificateRow(Base):
    """A certificate this CA issued, and its revocation if any."""

    __tablename__ = "ca_certificates"

    #: lower-case hex, no leading zeros.
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    enrollment_id: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    affiliation: Mapped[str] = mapped_column(String(255), default="")
    #: the attributes put into the certificate (JSON object), for authorisation.
    attrs_json: Mapped[str] = mapped_column(Text, default="{}")
    #: the issuing CA's subject key identifier (lower-case hex): the cert's AKI.
    aki: Mapped[str] = mapped_column(String(128))
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    not_after: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    pem: Mapped[str] = mapped_column(Text)
    revoked_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, index=True
    )
    #: RFC 5280 CRLReason code.
    revocation_reason: Mapped[int | None] = mapped_column(Integer, nullable=True)


class CaCrlCounterRow(Base):
    """The one row holding the last CRL number handed out (monotonic across replicas)."""

    __tablename__ = "ca_crl_counter"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    crl_number: Mapped[int] = mapped_column(BigInteger)


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything here is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


@dataclass(frozen=True)
class Attribute:
    """An identity attribute; ``ecert`` ones go into certificates unless others are
    asked for (Fabric CA's ``:ecert``)."""

    name: str
    value: str
    ecert: bool = False


@dataclass(frozen=True)
class IdentityRecord:
    enrollment_id: str
    secret_hash: str | None
    role: str
    affiliation: str
    attrs: tuple[Attribute, ...]
    max_enrollments: int | None
    enrollments: int
    revoked_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, row: CaIdentityRow) -> IdentityRecord:
        raw = json.loads(row.attrs_json or "[]")
        return cls(
            enrollment_id=row.enrollment_id,
            secret_hash=row.secret_hash,
            role=row.role,
            affiliation=row.affiliation,
            attrs=tuple(
                Attribute(str(a["name"]), str(a["value"]), bool(a.get("ecert", False))) for a in raw
            ),
            max_enrollments=row.max_enrollments,
            enrollments=row.enrollments,
            revoked_at=_utc_or_none(row.revoked_at),
            created_at=_utc(row.created_at),
        )


@dataclass(frozen=True)
class IssuedRecord:
    serial: str
    enrollment_id: str
    role: str
    affiliation: str
    attrs: dict[str, str]
    aki: str
    not_before: datetime
    not_after: datetime
    pem: str
    revoked_at: datetime | None
    revocation_reason: int | None

    @classmethod
    def of(cls, row: CaCertificateRow) -> IssuedRecord:
        return cls(
            serial=row.serial,
            enrollment_id=row.enrollment_id,
            role=row.role,
            affiliation=row.affiliation,
            attrs={str(k): str(v) for k, v in json.loads(row.attrs_json or "{}").items()},
            aki=row.aki,
            not_before=_utc(row.not_before),
            not_after=_utc(row.not_after),
            pem=row.pem,
            revoked_at=_utc_or_none(row.revoked_at),
            revocation_reason=row.revocation_reason,
        )


class CaStore:
    """The CA's repository over one async session factory (SQLite or PostgreSQL)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    # -- identities ----------------------------------------------------------------

    async def add_identity(
        self,
        *,
        enrollment_id: str,
        secret_hash: str | None,
        role: str,
        affiliation: str,
        attrs: Sequence[Attribute],
        max_enrollments: int | None,
        now: datetime,
    ) -> IdentityRecord:
        row = CaIdentityRow(
            enrollment_id=enrollment_id,
            secret_hash=secret_hash,
            role=role,
            affiliation=affiliation,
            attrs_json=json.dumps(
                [{"name": a.name, "value": a.value, "ecert": a.ecert} for a in attrs]
            ),
            max_enrollments=max_enrollments,
            enrollments=0,
            revoked_at=None,
            created_at=now,
        )
        try:
            async with self._sessions.begin() as session:
                session.add(row)
        except IntegrityError as exc:
            raise AlreadyExists(
                f"enrollment id {enrollment_id!r} is already registered",
                reason="ENROLLMENT_ID_TAKEN",
                metadata={"enrollment_id": enrollment_id},
            ) from exc
        return IdentityRecord.of(row)

    async def get_identity(self, enrollment_id: str) -> IdentityRecord | None:
        async with self._sessions() as session:
            row = await session.get(CaIdentityRow, enrollment_id)
            return None if row is None else IdentityRecord.of(row)

    async def count_enrollment(self, enrollment_id: str) -> bool:
        """Count one enrollment unless the identity has used up its ``max_enrollments``.

        One conditional UPDATE, so concurrent enrollments never exceed the limit.
        """
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(CaIdentityRow)
                .where(CaIdentityRow.enrollment_id == enrollment_id)
                .where(
                    (CaIdentityRow.max_enrollments.is_(None))
                    | (CaIdentityRow.enrollments < CaIdentityRow.max_enrollments)
                )
                .values(enrollments=CaIdentityRow.enrollments + 1)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def mark_identity_revoked(self, enrollment_id: str, when: datetime) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(CaIdentityRow)
                .where(CaIdentityRow.enrollment_id == enrollment_id)
                .where(CaIdentityRow.revoked_at.is_(None))
                .values(revoked_at=when)
            )

    # -- certificates --------------------------------------------------------------

    async def add_certificate(
        self,
        *,
        serial: str,
        enrollment_id: str,
        role: str,
        affiliation: str,
        attrs: dict[str, str],
        aki: str,
        not_before: datetime,
        not_after: datetime,
        pem: str,
    ) -> None:
        async with self._sessions.begin() as session:
            session.add(
                CaCertificateRow(
                    serial=serial,
                    enrollment_id=enrollment_id,
                    role=role,
                    affiliation=affiliation,
                    attrs_json=json.dumps(attrs, sort_keys=True),
                    aki=aki,
                    not_before=not_before,
                    not_after=not_after,
                    pem=pem,
                    revoked_at=None,
                    revocation_reason=None,
                )
            )

    async def get_certificate(self, serial: str) -> IssuedRecord | None:
        async with self._sessions() as session:
            row = await session.get(CaCertificateRow, serial)
            return None if row is None else IssuedRecord.of(row)

    async def certificates_of(self, enrollment_id: str) -> list[IssuedRecord]:
        async with self._sessions() as session:
            rows = await session.scalars(
                select(CaCertificateRow)
                .where(CaCertificateRow.enrollment_id == enrollment_id)
                .order_by(CaCertificateRow.not_before, CaCertificateRow.serial)
            )
            return [IssuedRecord.of(r) for r in rows]

    async def revoke(
        self,
        *,
        serials: Sequence[str],
        reason: int,
        when: datetime,
    ) -> list[str]:
        """Revoke those of ``serials`` not revoked yet; returns the ones this call revoked."""
        if not serials:
            return []
        async with self._sessions.begin() as session:
            pending = list(
                await session.scalars(
                    select(CaCertificateRow.serial)
                    .where(CaCertificateRow.serial.in_(list(serials)))
                    .where(CaCertificateRow.revoked_at.is_(None))
                    .with_for_update()
                )
            )
            if pending:
                await session.execute(
                    update(CaCertificateRow)
                    .where(CaCertificateRow.serial.in_(pending))
                    .where(CaCertificateRow.revoked_at.is_(None))
                    .values(revoked_at=when, revocation_reason=reason)
                )
        return sorted(pending)

    async def revoked(self) -> list[IssuedRecord]:
        """Every revoked certificate, oldest revocation first."""
        async with self._sessions() as session:
            rows = await session.scalars(
                select(CaCertificateRow)
                .where(CaCertificateRow.revoked_at.is_not(None))
                .order_by(CaCertificateRow.revoked_at, CaCertificateRow.serial)
            )
            return [IssuedRecord.of(r) for r in rows]

    # -- CRL numbers ---------------------------------------------------------------

    async def next_crl_number(self) -> int:
        """A CRL number larger than every one handed out before (any replica)."""
        for _ in range(3):
            async with self._sessions.begin() as session:
                result = await session.execute(
                    update(CaCrlCounterRow)
                    .where(CaCrlCounterRow.id == 1)
                    .values(crl_number=CaCrlCounterRow.crl_number + 1)
                    .returning(CaCrlCounterRow.crl_number)
                )
                number = result.scalar_one_or_none()
                if number is not None:
                    return int(number)
            try:
                async with self._sessions.begin() as session:
                    session.add(CaCrlCounterRow(id=1, crl_number=1))
                return 1
            except IntegrityError:
                continue  # another replica created the row first: increment it
        raise RuntimeError("could not allocate a CRL number")
