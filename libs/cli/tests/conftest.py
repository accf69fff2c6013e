"""Fixtures shared by the CLI tests: a real identity service to log in against."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _cli_support import identity_service

from ledgerlens.services.identity.app import RunningIdentity


@pytest.fixture
async def identity(
    sqlite_url: str, nats_url: str, tmp_path: Path
) -> AsyncIterator[RunningIdentity]:
    async with identity_service(sqlite_url, nats_url, tmp_path / "identity-data") as running:
        yield running
