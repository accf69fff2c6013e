"""Test support of the ingestion tests (imported by name: tests are not a package)."""

from __future__ import annotations

import os
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledgerlens.embedding import Embedder
from ledgerlens.ingestion.v1 import ingestion_pb2_grpc
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.ingestion.app import ANCHOR_CONSUMER, RunningIngestion, run_ingestion
from ledgerlens.services.ingestion.settings import Settings

CORPUS_ENV = "LEDGERLENS_CORPUS_DIR"


def run_ingestion_in(
    names: EventNames, settings: Settings, embedder: Embedder | None = None
) -> AbstractAsyncContextManager[RunningIngestion]:
    """``run_ingestion`` in a test's own NATS namespace: its streams, its anchor
    consumer and its subjects, so tests running side by side never see each other."""
    return run_ingestion(
        settings,
        embedder=embedder,
        streams=names.platform_streams(),
        anchor_consumer=names.consumer(ANCHOR_CONSUMER),
        subject=names.subject,
    )


def find_corpus() -> Path | None:
    explicit = os.environ.get(CORPUS_ENV)
    candidate = (
        Path(explicit) if explicit else Path(__file__).resolve().parents[3] / ".." / "shared"
    )
    eips = candidate if candidate.name == "eips" else candidate / "corpus" / "eips"
    return eips.resolve() if eips.is_dir() else None


@dataclass
class Harness:
    """A running ingestion service and what tests talk to it with."""

    running: RunningIngestion
    stub: ingestion_pb2_grpc.IngestionServiceStub
    metadata: tuple[tuple[str, str], ...]
    names: EventNames
    settings: Settings

    def subject(self, subject: str) -> str:
        return self.names.subject(subject)

    def stream(self, name: str) -> str:
        return self.names.stream_name(name)


async def stream_events(nats_url: str, stream: str, subject: str | None = None) -> list[Any]:
    """Every message stored in ``stream`` now (optionally only ``subject``), in order."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        found: list[Any] = []
        if not info.state.messages:
            return found
        for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            if subject is None or msg.subject == subject:
                found.append(msg)
        return found
    finally:
        await nc.close()


async def wait_published(database_url: str, seconds: float = 30.0) -> int:
    """Wait until the outbox relay published every row; returns how many rows there are."""
    import asyncio
    import time

    from sqlalchemy import func, select

    from ledgerlens.runtime.db import create_engine
    from ledgerlens.services.ingestion.schema import OUTBOX

    engine = create_engine(database_url)
    try:
        deadline = time.monotonic() + seconds
        while True:
            async with engine.connect() as conn:
                pending = await conn.scalar(
                    select(func.count()).select_from(OUTBOX).where(OUTBOX.c.published_at.is_(None))
                )
                total = await conn.scalar(select(func.count()).select_from(OUTBOX))
            if not pending:
                return int(total or 0)
            if time.monotonic() > deadline:
                raise AssertionError(f"{pending} outbox rows still unpublished after {seconds}s")
            await asyncio.sleep(0.1)
    finally:
        await engine.dispose()
