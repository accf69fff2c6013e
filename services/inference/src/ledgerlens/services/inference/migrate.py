"""Bring the inference database to the newest schema (alembic, like every service)."""

from __future__ import annotations

from pathlib import Path

from ledgerlens.runtime.migrations import upgrade_to_head

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


async def migrate(database_url: str) -> None:
    await upgrade_to_head(database_url, MIGRATIONS_DIR)
