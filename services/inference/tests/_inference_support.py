"""Shared helpers of the inference tests (import by name: ``from _inference_support
import ...``; the tests folder is on pytest's ``pythonpath``).

* :data:`PROMPT_MARKER`: a string to put into prompts/answers and then search for in
  DB rows, event payloads and logs (it must never be found there).
* :func:`migrated_engine`: an AsyncEngine on a database migrated with the inference
  alembic history (use with the runtime's ``database_url`` fixture: SQLite and
  PostgreSQL).
* :class:`WallClock`: a settable epoch clock for the in-process limiter and caches.
* :func:`redis_prefix`: a unique Redis key prefix for one test.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.runtime.db import create_engine
from ledgerlens.services.inference.migrate import migrate

__all__ = ["PROMPT_MARKER", "WallClock", "migrated_engine", "redis_prefix"]

#: never to be found in a DB row, an event or a log line
PROMPT_MARKER = "ZEBRA-MARKER-7f3a91"


@asynccontextmanager
async def migrated_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await migrate(database_url)
    engine = create_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


class WallClock:
    """Epoch seconds the test sets and advances by hand."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def redis_prefix(name: str) -> str:
    return f"test:{name}:{secrets.token_hex(6)}:"
