"""What the fault tests check on a running platform, beyond the harness (``_platform``).

The invariant after every fault: each acknowledged document is *searchable exactly
once* (retrieval holds each of its chunks once, as many as ingestion made, each the
exact span of the document it claims to be) and *anchored exactly once* (one record in
the ledger's history, one committed anchoring transaction among the chaincode events,
``VerifyDocument`` finds its sha256), and the anchor flows back to ingestion and
retrieval. :func:`wait_consistent` polls the eventually consistent parts with a
deadline and, on timeout, says what is still missing with the tail of the logs of the
services that should have done it; :func:`assert_exactly_once` then checks the whole
invariant on the settled state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
from _platform import EIP_DIR, Platform
from nats.js.api import ConsumerInfo

from ledgerlens.ingestion.v1 import ingestion_pb2
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.events import CONSUMERS, Subjects
from ledgerlens.services.ledger.contract import EVENT_DOCUMENT_ANCHORED, EVENT_DOCUMENTS_ANCHORED

__all__ = [
    "LEDGER_DOCUMENTS",
    "RETRIEVAL_ANCHORS",
    "RETRIEVAL_CHUNKS",
    "Clients",
    "Expected",
    "anchor_event_counts",
    "assert_exactly_once",
    "check_exactly_once",
    "consumer_info",
    "eip_subsets",
    "expected_from",
    "histories_of",
    "open_clients",
    "poll",
    "wait_consistent",
]

#: retrieval returns at most this many results; a document must have fewer chunks
#: for one document-filtered search to show all of them
MAX_TOP_K = 100


def eip_subsets(*sizes: int) -> list[list[Path]]:
    """Disjoint EIP subsets of ``sizes`` documents: real EIPs of 3-12 KB (10-40 chunks
    each, so a bulk ingest of a dozen takes seconds, long enough to be interrupted, and
    a document fits one search of ``MAX_TOP_K`` results), in name order so every run
    uses the same ones."""
    candidates = sorted(
        (p for p in EIP_DIR.glob("eip-*.md") if 3_000 <= p.stat().st_size <= 12_000),
        key=lambda p: int(p.stem.removeprefix("eip-")),
    )
    if not candidates:  # no corpus here: the ``corpus`` fixture skips (or, under CI, fails)
        return [[] for _ in sizes]
    if sum(sizes) > len(candidates):
        raise ValueError(f"only {len(candidates)} EIPs of that size")
    subsets, start = [], 0
    for size in sizes:
        subsets.append(candidates[start : start + size])
        start += size
    return subsets


@dataclass(frozen=True)
class Expected:
    """An acknowledged document: what ingestion answered and the file it came from."""

    path: Path
    document_id: str
    version: int
    sha256: str
    chunk_count: int

    @property
    def name(self) -> str:
        return self.path.name


def expected_from(
    results: dict[Path, ingestion_pb2.IngestStreamResponse],
) -> dict[str, Expected]:
    """The acknowledged documents of an ``IngestStream`` (every item must have succeeded)."""
    expected = {}
    for path, response in results.items():
        assert response.WhichOneof("outcome") == "result", (path.name, response.error)
        result = response.result
        expected[path.name] = Expected(
            path, result.document_id, result.version, result.sha256, result.chunk_count
        )
    return expected


@dataclass
class Clients:
    """Stubs of ingestion, retrieval and the ledger with one token (from :func:`open_clients`)."""

    ingestion: Any
    retrieval: Any
    ledger: Any


@contextlib.asynccontextmanager
async def open_clients(platform: Platform, token: str) -> AsyncIterator[Clients]:
    async with (
        platform.client("ingestion", token) as ingestion,
        platform.client("retrieval", token) as retrieval,
        platform.client("ledger", token) as ledger,
    ):
        yield Clients(ingestion.stub, retrieval.stub, ledger.stub)


# -- reading each service's view ---------------------------------------------------------


async def _document(clients: Clients, document_id: str) -> Any | None:
    """Ingestion's latest version of the document, or None when it has none."""
    try:
        got = await clients.ingestion.GetDocument(
            ingestion_pb2.GetDocumentRequest(document_id=document_id)
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None
    return got.document


async def _chunks(clients: Clients, document_id: str) -> list[retrieval_pb2.Chunk]:
    """Every chunk of the document retrieval returns: a dense-only search filtered to one
    document scores all of its chunks, so ``MAX_TOP_K`` results hold all of them."""
    response = await clients.retrieval.Search(
        retrieval_pb2.SearchRequest(
            query="specification and rationale",
            filter=retrieval_pb2.SearchFilter(document_ids=[document_id]),
            top_k=MAX_TOP_K,
            fusion=retrieval_pb2.FUSION_MODE_DENSE,
        )
    )
    return [result.chunk for result in response.results]


async def _ledger_records(clients: Clients, expected: Expected) -> list[ledger_pb2.AnchorRecord]:
    answer = await clients.ledger.VerifyDocument(
        ledger_pb2.VerifyDocumentRequest(sha256=expected.sha256, document_id=expected.document_id)
    )
    return list(answer.records) if answer.anchored else []


@dataclass
class _View:
    """One pass over every service's view of one document."""

    document: Any | None = None
    chunks: list[retrieval_pb2.Chunk] = field(default_factory=list)
    records: list[ledger_pb2.AnchorRecord] = field(default_factory=list)

    def missing(self, expected: Expected) -> list[str]:
        """What the settled state still lacks (empty once it is there)."""
        name = expected.name
        if self.document is None:
            return [f"{name}: ingestion has no {expected.document_id}"]
        gaps = []
        if len(self.chunks) < expected.chunk_count:
            gaps.append(f"{name}: {len(self.chunks)}/{expected.chunk_count} chunks searchable")
        if not self.records:
            return [*gaps, f"{name}: sha256 {expected.sha256[:12]} not anchored on the ledger"]
        tx_id = self.records[0].anchor.tx_id
        if self.document.provenance.anchor.tx_id != tx_id:
            gaps.append(f"{name}: ingestion does not know anchor {tx_id[:12]} yet")
        stale = [c.chunk_id for c in self.chunks if c.provenance.anchor.tx_id != tx_id]
        if stale and len(self.chunks) >= expected.chunk_count:
            gaps.append(f"{name}: retrieval shows anchor {tx_id[:12]} on none/some chunks")
        return gaps


async def _view(clients: Clients, expected: Expected) -> _View:
    view = _View(document=await _document(clients, expected.document_id))
    view.chunks = await _chunks(clients, expected.document_id)
    view.records = await _ledger_records(clients, expected)
    return view


def _logs(platform: Platform, services: Iterable[str], lines: int = 30) -> str:
    return "\n".join(
        f"--- {name} log (last {lines} lines) ---\n{platform.log_tail(name, lines)}"
        for name in services
    )


async def wait_consistent(
    platform: Platform,
    clients: Clients,
    expected: dict[str, Expected],
    *,
    within: float,
    what: str,
    logs: Sequence[str] = ("ingestion", "retrieval", "ledger"),
) -> dict[str, _View]:
    """Poll until every expected document is in ingestion, all its chunks are searchable,
    it is anchored, and ingestion and retrieval show the ledger's anchor; return each
    document's view. On timeout: AssertionError listing what is missing, with the tail
    of the ``logs`` services' logs."""
    views: dict[str, _View] = {}
    pending = dict(expected)
    deadline = time.monotonic() + within
    while True:
        gaps: list[str] = []
        for name, one in list(pending.items()):
            view = await _view(clients, one)
            views[name] = view
            missing = view.missing(one)
            if missing:
                gaps += missing
            else:
                del pending[name]
        if not pending:
            return views
        if time.monotonic() > deadline:
            shown = "\n  ".join(gaps[:40])
            raise AssertionError(
                f"{what}: after {within:g}s, {len(pending)}/{len(expected)} documents are "
                f"not consistent:\n  {shown}\n{_logs(platform, logs)}"
            )
        await asyncio.sleep(1.0)


# -- the ledger's own record of what was committed ---------------------------------------


async def anchor_event_counts(ledger: Any, *, idle: float = 2.0) -> Counter[tuple[str, int]]:
    """How many committed transactions anchored each (document, version), from every
    ``DocumentAnchored``/``DocumentsAnchored`` chaincode event since block 0.

    The event stream has no end-of-history marker: it is read until no event arrives
    for ``idle`` seconds (called once the state has settled, so nothing is still due).
    """
    counts: Counter[tuple[str, int]] = Counter()
    call = ledger.StreamEvents(
        ledger_pb2.StreamEventsRequest(
            start_block=0, event_names=[EVENT_DOCUMENT_ANCHORED, EVENT_DOCUMENTS_ANCHORED]
        ),
        timeout=120,
    )
    stream = call.__aiter__()
    try:
        while True:
            try:
                item = await asyncio.wait_for(stream.__anext__(), idle)
            except (TimeoutError, StopAsyncIteration):
                break
            payload = json.loads(item.event.payload)
            records = (
                [payload]
                if item.event.event_name == EVENT_DOCUMENT_ANCHORED
                else payload["records"]
            )
            for record in records:
                counts[(record["document_id"], int(record["version"]))] += 1
    finally:
        call.cancel()
    return counts


def assert_exactly_once(
    expected: dict[str, Expected],
    views: dict[str, _View],
    histories: dict[str, ledger_pb2.GetAnchorHistoryResponse],
    anchor_events: Counter[tuple[str, int]],
) -> None:
    """The settled invariant, per document: its chunks once each, as many as ingestion
    made, each the exact span of the file it came from; one version; one anchor."""
    for name, one in expected.items():
        view = views[name]
        document = view.document
        assert document is not None, name
        # one version: a retry or a redelivery never made a second one
        assert (document.provenance.version, document.latest_version) == (1, 1), (name, document)
        assert document.provenance.sha256 == one.sha256, name
        assert document.chunk_count == one.chunk_count, name
        assert one.sha256 == hashlib.sha256(one.path.read_bytes()).hexdigest(), name

        ids = [chunk.chunk_id for chunk in view.chunks]
        duplicated = [chunk_id for chunk_id, n in Counter(ids).items() if n > 1]
        assert not duplicated, f"{name}: chunks returned more than once: {duplicated}"
        assert len(ids) == document.chunk_count, (name, len(ids), document.chunk_count)
        assert sorted(c.chunk_index for c in view.chunks) == list(range(document.chunk_count))
        spans = Counter((c.char_start, c.char_end) for c in view.chunks)
        assert max(spans.values()) == 1, f"{name}: the same text indexed twice"
        text = one.path.read_text(encoding="utf-8")
        for chunk in view.chunks:
            assert chunk.provenance.document_id == one.document_id, (name, chunk.chunk_id)
            assert (chunk.provenance.version, chunk.provenance.sha256) == (1, one.sha256)
            assert text[chunk.char_start : chunk.char_end] == chunk.text, (name, chunk.chunk_id)

        (record,) = view.records
        assert (record.document_id, record.version, record.sha256) == (
            one.document_id,
            1,
            one.sha256,
        )
        history = [(r.version, r.sha256, r.anchor.tx_id) for r in histories[name].records]
        assert history == [(1, one.sha256, record.anchor.tx_id)], (name, history)
        assert anchor_events[(one.document_id, 1)] == 1, (
            f"{name}: anchored by {anchor_events[(one.document_id, 1)]} transactions"
        )
        assert document.provenance.anchor.tx_id == record.anchor.tx_id, name
        assert document.provenance.anchor.block_number == record.anchor.block_number, name
        assert {c.provenance.anchor.tx_id for c in view.chunks} == {record.anchor.tx_id}, name


async def histories_of(
    clients: Clients, expected: dict[str, Expected]
) -> dict[str, ledger_pb2.GetAnchorHistoryResponse]:
    return {
        name: await clients.ledger.GetAnchorHistory(
            ledger_pb2.GetAnchorHistoryRequest(document_id=one.document_id)
        )
        for name, one in expected.items()
    }


async def check_exactly_once(
    platform: Platform,
    clients: Clients,
    expected: dict[str, Expected],
    *,
    within: float,
    what: str,
) -> None:
    """:func:`wait_consistent`, then :func:`assert_exactly_once` on the settled state."""
    views = await wait_consistent(platform, clients, expected, within=within, what=what)
    histories = await histories_of(clients, expected)
    events = await anchor_event_counts(clients.ledger)
    assert_exactly_once(expected, views, histories, events)


# -- JetStream, seen from outside the services -------------------------------------------


def _consumer_spec(durable_prefix: str, subject: str) -> tuple[str, str]:
    (spec,) = (
        c for c in CONSUMERS if c.durable.startswith(durable_prefix) and c.filter_subject == subject
    )
    return spec.stream, spec.durable


RETRIEVAL_CHUNKS = _consumer_spec("retrieval--", Subjects.INGESTION_CHUNKS_EMBEDDED)
RETRIEVAL_ANCHORS = _consumer_spec("retrieval--", Subjects.LEDGER_ANCHOR_COMMITTED)
LEDGER_DOCUMENTS = _consumer_spec("ledger--", Subjects.INGESTION_DOCUMENT_INGESTED)


async def consumer_info(nats_url: str, stream_and_durable: tuple[str, str]) -> ConsumerInfo:
    """A durable consumer's state, read with a connection of our own."""
    connection = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=1)
    try:
        info: ConsumerInfo = await connection.jsm().consumer_info(*stream_and_durable)
        return info
    finally:
        await connection.close()


async def poll(
    check: Callable[[], Awaitable[str | None]],
    *,
    within: float,
    what: str,
    platform: Platform,
    logs: Sequence[str],
    interval: float = 0.5,
) -> None:
    """Await ``check()`` (None once satisfied, else what is missing) until the deadline;
    AssertionError with the last answer and the ``logs`` services' log tails."""
    deadline = time.monotonic() + within
    while True:
        missing = await check()
        if missing is None:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not reached within {within:g}s: {missing}\n{_logs(platform, logs)}"
            )
        await asyncio.sleep(interval)
