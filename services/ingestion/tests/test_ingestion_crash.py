"""Crash safety: SIGKILL in the middle of a bulk ingest, restart, and nothing that was
acknowledged is lost or duplicated, in the database or on the event stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from _ingestion_support import stream_events, wait_published

from ledgerlens.events.v1 import events_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.events import Subjects
from ledgerlens.runtime.testing import EventNames

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVER = Path(__file__).with_name("_crash_server.py")
DOCS = 40
KILL_AFTER = 12


async def _start(env: dict[str, str], token: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER), token, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
    assert line.startswith("PORT "), f"server did not start: {line!r}"
    return proc, f"127.0.0.1:{line.split()[1]}"


async def _stream(
    address: str,
    metadata: Any,
    docs: list[tuple[str, bytes]],
    results: dict[str, Any],
    enough: asyncio.Event | None = None,
) -> None:
    async def feed() -> AsyncIterator[ingestion_pb2.IngestStreamRequest]:
        for url, content in docs:
            yield ingestion_pb2.IngestStreamRequest(
                correlation_id=url,
                document=ingestion_pb2.IngestDocumentRequest(source_url=url, content=content),
            )

    async with grpc.aio.insecure_channel(address) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        async for response in stub.IngestStream(feed(), metadata=metadata, timeout=600):
            results[response.correlation_id] = response
            if enough is not None and len(results) >= KILL_AFTER:
                enough.set()


@pytest.mark.timeout(900)
async def test_sigkill_mid_bulk_ingest_loses_and_duplicates_nothing(
    sqlite_url: str,
    nats_url: str,
    event_names: EventNames,
    eip_files: list[Path],
    tmp_path: Path,
) -> None:
    issuer = DevTokenIssuer()
    metadata = (
        (
            "authorization",
            f"Bearer {issuer.issue('bulk', ['ingest:write', 'ingest:read'], ttl=3600)}",
        ),
    )
    env = {
        **os.environ,
        "LEDGERLENS_INGESTION_DATABASE_URL": sqlite_url,
        "LEDGERLENS_INGESTION_NATS_URL": nats_url,
        "LEDGERLENS_INGESTION_GRPC_PORT": "0",
        "LEDGERLENS_INGESTION_HTTP_PORT": "0",
        "LEDGERLENS_INGESTION_DATA_DIR": str(tmp_path / "data"),
        "LEDGERLENS_INGESTION_AUTH__STATIC_JWKS": json.dumps(issuer.jwks()),
        "LEDGERLENS_INGESTION_STREAM_CONCURRENCY": "4",
    }
    # the smallest EIPs: a few chunks each, so the real model keeps the test short
    small = sorted(eip_files, key=lambda p: p.stat().st_size)[:DOCS]
    docs = [(f"file:///crash/{event_names.token}/{p.name}", p.read_bytes()) for p in small]

    proc, address = await _start(env, event_names.token)
    acked: dict[str, Any] = {}
    enough = asyncio.Event()
    stream = asyncio.create_task(_stream(address, metadata, docs, acked, enough))
    try:
        await asyncio.wait(
            [stream, asyncio.create_task(enough.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        assert not stream.done(), "the bulk ingest finished (or failed) before the crash"
        proc.send_signal(signal.SIGKILL)  # no drain, no flush: a crash
        await proc.wait()
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await stream
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if proc.returncode is None:
            proc.kill()
    before_crash = dict(acked)
    assert KILL_AFTER <= len(before_crash) < DOCS
    assert all(r.HasField("result") for r in before_crash.values())

    proc, address = await _start(env, event_names.token)
    try:
        # the client sends everything again: what was acknowledged is unchanged
        after: dict[str, Any] = {}
        await _stream(address, metadata, docs, after)
        assert len(after) == DOCS
        assert all(r.HasField("result") for r in after.values())
        for url, response in before_crash.items():
            again = after[url].result
            assert again.status == ingestion_pb2.INGEST_STATUS_UNCHANGED
            assert (again.document_id, again.version) == (
                response.result.document_id,
                response.result.version,
            )
        assert {r.result.version for r in after.values()} == {1}

        async with grpc.aio.insecure_channel(address) as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            listed = await stub.ListDocuments(
                ingestion_pb2.ListDocumentsRequest(page_size=500), metadata=metadata
            )
        ids = [d.provenance.document_id for d in listed.documents]
        assert len(ids) == len(set(ids)) == DOCS

        await wait_published(sqlite_url, seconds=60)
        events = await stream_events(nats_url, event_names.stream_name("INGESTION"))
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()

    chunk_subject = event_names.subject(Subjects.INGESTION_CHUNKS_EMBEDDED)
    chunk_ids = [
        c.chunk_id
        for m in events
        if m.subject == chunk_subject
        for c in events_pb2.ChunksEmbedded.FromString(m.data).chunks
    ]
    assert len(chunk_ids) == len(set(chunk_ids)), "a consumer would see a chunk twice"
    assert len(chunk_ids) == sum(r.result.chunk_count for r in after.values())
    ingested = [
        events_pb2.DocumentIngested.FromString(m.data).provenance.document_id
        for m in events
        if m.subject == event_names.subject(Subjects.INGESTION_DOCUMENT_INGESTED)
    ]
    assert sorted(ingested) == sorted(ids)
