"""Bring a database to the dev ledger's newest schema (see ledgerlens.runtime.migrations)."""

from __future__ import annotations

from pathlib import Path

from ledgerlens.runtime.migrations import upgrade_to_head

__all__ = ["MIGRATIONS_DIR", "migrate"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


async def migrate(database_url: str) -> None:
    await upgrade_to_head(database_url, MIGRATIONS_DIR)
