"""Fixtures shared by the CLI tests: a real identity service to log in against."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ledgerlens.services.identity.app import RunningIdentity, run_identity
from ledgerlens.services.identity.settings import Settings


@pytest.fixture
async def identity(
    sqlite_url: str, nats_url: str, tmp_path: Path
) -> AsyncIterator[RunningIdentity]:
    settings = Settings(
        database_url=sqlite_url,
        nats_url=nats_url,
        grpc_port=0,
        http_port=0,
        data_dir=str(tmp_path / "identity-data"),
        shutdown_grace_seconds=1,
    )
    async with run_identity(settings) as running:
        yield running
