"""Bring a database to the ledger service's newest schema: the dev ledger's tables and
the service's own (two alembic histories with separate version tables, so either can
move on its own)."""

from __future__ import annotations

from pathlib import Path

from ledgerlens.runtime.migrations import upgrade_to_head
from ledgerlens.services.ledger.devledger import migrate as migrate_devledger

__all__ = ["MIGRATIONS_DIR", "migrate"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


async def migrate(database_url: str) -> None:
    # the dev ledger's tables exist whatever the backend: they are small when unused,
    # and switching backend then never meets a half-migrated database
    await migrate_devledger(database_url)
    await upgrade_to_head(database_url, MIGRATIONS_DIR)
