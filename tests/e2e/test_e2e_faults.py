"""Fault tests of the whole platform (issue #9): kill, stop and restart its parts in the
middle of the flow, then check that nothing acknowledged was lost and nothing doubled.

After each fault, every document the platform acknowledged is searchable exactly once
(retrieval holds each of its chunks once, as many as ingestion made, each the exact
span of its file) and anchored exactly once (one record in the ledger's history, one
committed anchoring transaction among the chaincode events), and the anchor reached
ingestion and retrieval (see ``_faults_support``):

1. SIGKILL ingestion while an ``IngestStream`` bulk ingest is in flight; what was
   acknowledged before the kill survives, and the user's retry of the whole bulk
   ingest (idempotent by content) completes it without a second version;
2. restart NATS while documents are being ingested: the services reconnect, the
   events written meanwhile flow, and new ingests work;
3. stop retrieval, ingest, start it: it catches up from its durable consumer;
4. stop the ledger, ingest, start it: the anchors catch up and flow back.

In 3 and 4 a few documents settle before the stop, so the restart is also shown not to
lose or repeat what the service already had.

One platform serves the module (starting five services and loading the embedding model
three times costs a minute on two shared cores); each scenario uses documents and
source URLs of its own, and every part is running again before the next one starts.
Why small subsets: 10-16 mid-sized EIPs per scenario (about 40 in all) embed in seconds,
long enough to interrupt a bulk ingest, and the whole corpus would prove nothing more
about recovery than these do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sized
from pathlib import Path
from typing import Any

import grpc
import pytest
from _faults_support import (
    LEDGER_DOCUMENTS,
    RETRIEVAL_CHUNKS,
    Expected,
    check_exactly_once,
    consumer_info,
    eip_subsets,
    expected_from,
    open_clients,
    poll,
)
from _platform import Platform, ingest_files, start_platform

from ledgerlens.ingestion.v1 import ingestion_pb2

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    # the first test also waits for the platform to start
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("corpus"),
]


KILL_DOCS, NATS_DOCS, AFTER_NATS_DOCS, RETRIEVAL_DOCS, LEDGER_DOCS = eip_subsets(16, 12, 3, 10, 10)
SCOPES = ["ingest:write", "ingest:read", "search:read", "ledger:read"]
#: how long the platform may take to settle after a fault (embedding and restarts share
#: two cores with other test runs)
SETTLE_SECONDS = 150.0
INGEST_SECONDS = 300.0


def prefix(scenario: str) -> str:
    """Source URLs of a scenario's own (a document's id derives from its URL)."""
    return f"https://faults.example/{scenario}/"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A platform of the module's own: these tests kill and restart its parts (named
    ``platform`` so a failure shows each process's log, see conftest)."""
    with start_platform(tmp_path_factory.mktemp("faults")) as running:
        yield running


@pytest.fixture(scope="module")
def token(platform: Platform) -> str:
    key = platform.create_key(SCOPES, tenant="faults", name="e2e faults")
    return platform.token(key)


@pytest.fixture(autouse=True)
async def everything_running(platform: Platform) -> AsyncIterator[None]:
    """Each scenario starts and leaves with every part running (a failed one may have
    left a part stopped: start it again, NATS first)."""
    for child in platform.supervisor.children:
        assert not child.exited, f"{child.name} is not running at the start of the test"
    yield
    for child in platform.supervisor.children:
        if child.exited:
            await platform.arun(platform.supervisor.start_child(child.name))


async def _first_acks(
    platform: Platform, acked: Sized, stream: asyncio.Task[Any], at_least: int
) -> None:
    """Return once ``acked`` holds ``at_least`` results of the running ``stream``."""

    async def enough() -> str | None:
        if stream.done():
            stream.result()  # a failed stream fails here, with its error
            return None
        return None if len(acked) >= at_least else f"{len(acked)} acknowledged"

    await poll(
        enough,
        within=INGEST_SECONDS,
        interval=0.02,  # the fault must hit while the stream is in flight
        what=f"{at_least} documents acknowledged",
        platform=platform,
        logs=["ingestion"],
    )


# -- 1. SIGKILL ingestion in the middle of a bulk ingest ---------------------------------


async def test_sigkill_ingestion_during_bulk_ingest_loses_and_doubles_nothing(
    platform: Platform, token: str
) -> None:
    source = prefix("sigkill")
    acked: dict[Path, ingestion_pb2.IngestStreamResponse] = {}
    killed_pid = platform.pid("ingestion")
    async with platform.client("ingestion", token) as ingestion:
        stream = asyncio.create_task(
            ingest_files(ingestion.stub, KILL_DOCS, source_prefix=source, into=acked)
        )
        await _first_acks(platform, acked, stream, at_least=3)
        assert not stream.done(), "the bulk ingest ended before the kill: nothing interrupted"
        await platform.arun(platform.supervisor.kill_child("ingestion"))
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await stream
    assert not platform.running("ingestion")
    # whatever reached the client before the stream broke was acknowledged
    before_kill = expected_from(acked)
    assert 3 <= len(before_kill) < len(KILL_DOCS), (len(before_kill), broken.value)

    await platform.arun(platform.supervisor.start_child("ingestion"))
    assert platform.pid("ingestion") != killed_pid
    async with open_clients(platform, token) as clients:
        # without any retry: what was acknowledged was durable (rows and outbox events)
        await check_exactly_once(
            platform,
            clients,
            before_kill,
            within=SETTLE_SECONDS,
            what=f"the {len(before_kill)} documents acknowledged before SIGKILL",
        )

        # the user's retry of the whole bulk ingest: idempotent by content
        retried = await ingest_files(clients.ingestion, KILL_DOCS, source_prefix=source)
        every = expected_from(retried)
        assert set(every) == {path.name for path in KILL_DOCS}
        for name, one in before_kill.items():
            result = retried[one.path].result
            assert result.status == ingestion_pb2.INGEST_STATUS_UNCHANGED, name
            assert (result.document_id, result.version) == (one.document_id, one.version)
            assert result.chunk_count == one.chunk_count, name
        for path, response in retried.items():
            assert response.result.version == 1, (path.name, response.result)
            assert response.result.status in (
                ingestion_pb2.INGEST_STATUS_INGESTED,
                ingestion_pb2.INGEST_STATUS_UNCHANGED,  # stored, but killed before the answer
            ), path.name

        await check_exactly_once(
            platform,
            clients,
            every,
            within=SETTLE_SECONDS,
            what="every document after the retry of the killed bulk ingest",
        )


# -- 2. NATS restarts in the middle of the flow -----------------------------------------


async def test_nats_restart_during_ingest_loses_and_doubles_nothing(
    platform: Platform, token: str
) -> None:
    source = prefix("nats")
    nats_pid = platform.pid("nats")
    acked: dict[Path, ingestion_pb2.IngestStreamResponse] = {}
    async with platform.client("ingestion", token) as ingestion:
        stream = asyncio.create_task(
            ingest_files(ingestion.stub, NATS_DOCS, source_prefix=source, into=acked)
        )
        # NATS goes away while documents are being stored and their events published and
        # consumed, and stays away until the bulk ingest is done: the rest of the
        # documents are stored with their events only in ingestion's outbox
        await _first_acks(platform, acked, stream, at_least=1)
        acked_before_stop = len(acked)
        await platform.arun(platform.supervisor.stop_child("nats"))
        # ingestion acknowledges from its database and outbox: NATS is not on that path
        results = await stream
        await platform.arun(platform.supervisor.start_child("nats"))
    assert acked_before_stop < len(NATS_DOCS), "the ingest ended before NATS stopped"
    assert platform.pid("nats") != nats_pid
    expected = expected_from(results)
    assert set(expected) == {path.name for path in NATS_DOCS}
    for name in ("identity", "ingestion", "retrieval", "inference", "ledger"):
        assert platform.running(name), f"{name} died with NATS:\n{platform.log_tail(name)}"

    async with open_clients(platform, token) as clients:
        await check_exactly_once(
            platform,
            clients,
            expected,
            within=SETTLE_SECONDS,
            what="the documents ingested while NATS restarted",
        )
        # the flow keeps working on the reconnected connections
        after = expected_from(
            await ingest_files(clients.ingestion, AFTER_NATS_DOCS, source_prefix=source)
        )
        await check_exactly_once(
            platform,
            clients,
            after,
            within=SETTLE_SECONDS,
            what="documents ingested after NATS restarted",
        )


# -- 3. retrieval catches up from its durable consumer ----------------------------------

#: documents of scenarios 3 and 4 ingested (and settled) before the service stops: its
#: restart must not lose or repeat what it already had
SETTLED_BEFORE_STOP = 3


async def _ingest_settled(
    platform: Platform, token: str, paths: list[Path], source: str
) -> dict[str, Expected]:
    async with open_clients(platform, token) as clients:
        settled = expected_from(await ingest_files(clients.ingestion, paths, source_prefix=source))
        await check_exactly_once(
            platform, clients, settled, within=SETTLE_SECONDS, what="documents before the stop"
        )
    return settled


async def _stop_and_ingest(
    platform: Platform, token: str, service: str, consumer: tuple[str, str], paths: list[Path]
) -> dict[str, Expected]:
    """Stop ``service``, ingest ``paths`` (every one acknowledged), and wait until its
    durable ``consumer`` holds an event of each: they wait for it there."""
    await platform.arun(platform.supervisor.stop_child(service))
    source = prefix(service)
    async with platform.client("ingestion", token) as ingestion:
        expected = expected_from(await ingest_files(ingestion.stub, paths, source_prefix=source))
    assert set(expected) == {path.name for path in paths}

    async def held() -> str | None:
        pending = (await consumer_info(platform.nats_url, consumer)).num_pending or 0
        return None if pending >= len(expected) else f"{pending} events pending"

    await poll(
        held,
        within=SETTLE_SECONDS,
        what=f"{consumer[1]} holding the events of {len(expected)} documents",
        platform=platform,
        logs=["ingestion"],
    )
    return expected


async def test_retrieval_catches_up_from_its_durable_consumer(
    platform: Platform, token: str
) -> None:
    source = prefix("retrieval")
    before = RETRIEVAL_DOCS[:SETTLED_BEFORE_STOP]
    during = RETRIEVAL_DOCS[SETTLED_BEFORE_STOP:]
    settled = await _ingest_settled(platform, token, before, source)

    expected = await _stop_and_ingest(platform, token, "retrieval", RETRIEVAL_CHUNKS, during)

    await platform.arun(platform.supervisor.start_child("retrieval"))
    async with open_clients(platform, token) as clients:
        await check_exactly_once(
            platform,
            clients,
            {**settled, **expected},
            within=SETTLE_SECONDS,
            what="documents ingested before and while retrieval was stopped",
        )

    async def drained() -> str | None:
        info = await consumer_info(platform.nats_url, RETRIEVAL_CHUNKS)
        left = (info.num_pending or 0, info.num_ack_pending or 0)
        return None if left == (0, 0) else f"(pending, ack pending) = {left}"

    await poll(
        drained,
        within=30,
        what=f"{RETRIEVAL_CHUNKS[1]} drained",
        platform=platform,
        logs=["retrieval"],
    )


# -- 4. the ledger's anchors catch up ---------------------------------------------------


async def test_anchors_catch_up_after_the_ledger_restarts(platform: Platform, token: str) -> None:
    source = prefix("ledger")
    before = LEDGER_DOCS[:SETTLED_BEFORE_STOP]
    during = LEDGER_DOCS[SETTLED_BEFORE_STOP:]
    settled = await _ingest_settled(platform, token, before, source)

    expected = await _stop_and_ingest(platform, token, "ledger", LEDGER_DOCUMENTS, during)
    async with platform.client("ingestion", token) as ingestion:
        for name, one in expected.items():
            got = await ingestion.stub.GetDocument(
                ingestion_pb2.GetDocumentRequest(document_id=one.document_id)
            )
            assert not got.document.provenance.anchor.tx_id, f"{name} anchored with no ledger"

    await platform.arun(platform.supervisor.start_child("ledger"))
    async with open_clients(platform, token) as clients:
        # includes: ingestion's and retrieval's provenance show the committed anchor, and
        # the documents anchored before the stop were not anchored again
        await check_exactly_once(
            platform,
            clients,
            {**settled, **expected},
            within=SETTLE_SECONDS,
            what="anchors of documents ingested before and while the ledger was stopped",
        )
