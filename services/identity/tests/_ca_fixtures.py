"""Fixtures and helpers of the CA tests (imported by them; not a conftest).

``ca_engine`` runs every CA test on SQLite and on the real PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.runtime.db import session_factory
from ledgerlens.services.identity.ca import CertificateAuthority, create_dev_ca
from ledgerlens.services.identity.ca_store import CaStore
from ledgerlens.services.identity.schema import Base

CERTIFICATE_DAYS = 30


@pytest.fixture
def ca_db_url(database_url: str) -> str:
    """The database of conftest's ``engine`` (SQLite and PostgreSQL)."""
    return database_url


@pytest.fixture
def ca_engine(engine: AsyncEngine) -> AsyncEngine:
    """conftest's migrated ``engine``: every CA test runs on SQLite and PostgreSQL."""
    return engine


@pytest.fixture
def ca_store(ca_engine: AsyncEngine) -> CaStore:
    return CaStore(session_factory(ca_engine))


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ca"


@pytest.fixture
def ca(ca_store: CaStore, ca_dir: Path) -> CertificateAuthority:
    return CertificateAuthority(
        create_dev_ca(ca_dir, "test-ca"),
        ca_store,
        ca_name="test-ca",
        certificate_days=CERTIFICATE_DAYS,
    )


def make_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    cn: str = "ignored",
    hosts: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, str]:
    """A PEM CSR and its key (a fresh P-256 key unless one is given)."""
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False
        )
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


async def dump_tables(engine: AsyncEngine) -> str:
    """Every row of every table of the identity schema, as text."""
    parts: list[str] = []
    async with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in await conn.execute(select(table)):
                parts.append(f"{table.name}: {tuple(row)!r}")
    return "\n".join(parts)
