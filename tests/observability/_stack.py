"""The running services whose ``/metrics`` the dashboards, rules and chart are checked
against (imported by name): identity, ingestion, retrieval, ledger and inference, started in this
process with the functions ``python -m`` runs (through the services' own test helpers),
in an event namespace of their own, on SQLite and the session's NATS.

One small document goes through the real pipeline once (ingest -> chunks indexed by
retrieval and anchored by the ledger -> the anchor back to ingestion), so every metric a
service only exposes after a first observation (event counters, handler, lag and commit
histograms) is there; then each service's ``/metrics`` is scraped over HTTP and the
stack stopped. The result is plain data (conftest.py caches it for the session).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc.aio
import httpx
from _ingestion_support import run_ingestion_in
from prometheus_client.parser import text_string_to_metric_families

from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.inference.v1 import inference_pb2, inference_pb2_grpc
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledgerlens.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from ledgerlens.runtime.events import STREAMS
from ledgerlens.runtime.testing import EventNames, eventually
from ledgerlens.services.identity.app import run_identity
from ledgerlens.services.identity.settings import Settings as IdentitySettings
from ledgerlens.services.inference.app import REVOKED_CONSUMER, run_inference
from ledgerlens.services.inference.settings import Settings as InferenceSettings
from ledgerlens.services.ingestion.settings import Settings as IngestionSettings
from ledgerlens.services.ledger.app import LEDGER_CONSUMERS, run_ledger
from ledgerlens.services.ledger.settings import Settings as LedgerSettings
from ledgerlens.services.retrieval.app import RETRIEVAL_CONSUMERS, run_retrieval
from ledgerlens.services.retrieval.settings import Settings as RetrievalSettings

T = TypeVar("T")

#: the gRPC service (the ``service`` label) of each running service
GRPC_SERVICES = {
    "identity": "ledgerlens.identity.v1.IdentityService",
    "ingestion": "ledgerlens.ingestion.v1.IngestionService",
    "retrieval": "ledgerlens.retrieval.v1.RetrievalService",
    "ledger": "ledgerlens.ledger.v1.LedgerService",
    "inference": "ledgerlens.inference.v1.InferenceService",
}

#: the inference gateway's providers: chat goes to a provider that refuses connections
#: (port 9, like the inference tests' unreachable retrieval) and falls back to the local
#: extractive answerer, so the provider, fallback and accounting metrics all count
INFERENCE_GATEWAY = {
    "providers": [
        {
            "name": "down",
            "kind": "openai",
            "base_url": "http://127.0.0.1:9/v1",
            "models": ["gpt-down"],
            "prices": {"gpt-down": {"input_per_1k": 150, "output_per_1k": 600}},
            "timeout_seconds": 2,
        },
        {"name": "local", "kind": "extractive", "models": ["extractive", "all-MiniLM-L6-v2"]},
    ],
    "router": {
        "aliases": {
            "default": ["down/gpt-down", "local/extractive"],
            "embed": ["local/all-MiniLM-L6-v2"],
        },
        "retry_attempts": 1,
    },
}

PROBE_DOCUMENT = b"""# Observability probe

A short note about rollups, so that ingestion has something to chunk and embed.

## Data availability

Optimistic rollups post transaction data to the base layer; validity rollups post proofs.
"""


@dataclass
class Exposition:
    """What the services' ``/metrics`` answered."""

    #: service -> the raw text of its ``/metrics``
    texts: dict[str, str]
    #: sample name (``foo_bucket``, ``bar_total``, ...) -> label names seen on it
    labels: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: (sample name, label) -> values seen
    values: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    #: sample name -> the services whose /metrics had it
    exposed_by: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    names: EventNames | None = None

    @classmethod
    def parse(cls, texts: dict[str, str], names: EventNames | None = None) -> Exposition:
        found = cls(texts, names=names)
        for service, text in texts.items():
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    found.labels[sample.name] |= set(sample.labels)
                    found.exposed_by[sample.name].add(service)
                    for label, value in sample.labels.items():
                        found.values[(sample.name, label)].add(value)
        return found


def run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` on a thread of its own: the stack gets a loop of its own,
    whatever loop the calling test uses, and is gone when this returns."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="observability-stack")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _common(nats_url: str, tmp: Path, name: str) -> dict[str, Any]:
    return {
        "database_url": f"sqlite+aiosqlite:///{tmp}/{name}.db",
        "nats_url": nats_url,
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "data_dir": str(tmp / name),
        "shutdown_grace_seconds": 2.0,
        # the JetStream state gauges are read at once and then this often (15 s deployed)
        "events_state_interval_seconds": 0.2,
        # the interceptor's auth is not what this checks; the metrics are the same
        "auth": {"enabled": False},
    }


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    await eventually(check, within=60, interval=0.1, message=what)


async def run_stack_and_scrape(
    nats_url: str, embedder: CachingEmbedder, tmp: Path, names: EventNames
) -> dict[str, str]:
    """Start the five services, push one document through them, ask about it, scrape
    ``/metrics``."""
    async with AsyncExitStack() as stack:
        identity = await stack.enter_async_context(
            run_identity(
                IdentitySettings.model_validate(_common(nats_url, tmp, "identity")),
                stream=names.stream(STREAMS["IDENTITY"]),
            )
        )
        ledger = await stack.enter_async_context(
            run_ledger(
                LedgerSettings.model_validate(
                    {
                        **_common(nats_url, tmp, "ledger"),
                        "dev": {"poll_interval_seconds": 0.2},
                    }
                ),
                streams=names.platform_streams(),
                consumers=[names.consumer(c) for c in LEDGER_CONSUMERS],
            )
        )
        retrieval = await stack.enter_async_context(
            run_retrieval(
                RetrievalSettings.model_validate(
                    {**_common(nats_url, tmp, "retrieval"), "backend": "local"}
                ),
                embedder=embedder,
                streams=names.platform_streams(),
                consumers=[names.consumer(c) for c in RETRIEVAL_CONSUMERS],
            )
        )
        ingestion = await stack.enter_async_context(
            run_ingestion_in(
                names,
                IngestionSettings.model_validate(_common(nats_url, tmp, "ingestion")),
                embedder,
            )
        )
        inference = await stack.enter_async_context(
            run_inference(
                InferenceSettings.model_validate(
                    {
                        **_common(nats_url, tmp, "inference"),
                        **INFERENCE_GATEWAY,
                        "rag": {"retrieval_target": retrieval.grpc_address},
                    }
                ),
                embedder=embedder,
                streams=names.platform_streams(),
                revoked_consumer=names.consumer(REVOKED_CONSUMER),
                subject=names.subject,
            )
        )
        running_services = {
            "identity": identity,
            "ingestion": ingestion,
            "retrieval": retrieval,
            "ledger": ledger,
            "inference": inference,
        }
        channels = {
            svc: await stack.enter_async_context(grpc.aio.insecure_channel(running.grpc_address))
            for svc, running in running_services.items()
        }
        ingest = ingestion_pb2_grpc.IngestionServiceStub(channels["ingestion"])
        verify = ledger_pb2_grpc.LedgerServiceStub(channels["ledger"])
        search = retrieval_pb2_grpc.RetrievalServiceStub(channels["retrieval"])
        jwks = identity_pb2_grpc.IdentityServiceStub(channels["identity"])

        # one real RPC per service (the histogram's OK series exist from registration on;
        # these make them count something)
        await jwks.GetJwks(identity_pb2.GetJwksRequest())
        done = await ingest.IngestDocument(
            ingestion_pb2.IngestDocumentRequest(
                source_url=f"https://example.org/observability-probe-{names.token}",
                content=PROBE_DOCUMENT,
                content_type="text/markdown",
            )
        )

        async def indexed() -> bool:
            return bool(await retrieval.indexer.backend.count() >= done.chunk_count)

        async def anchored() -> bool:
            response = await verify.VerifyDocument(
                ledger_pb2.VerifyDocumentRequest(sha256=done.sha256)
            )
            return bool(response.anchored)

        async def anchor_back_in_ingestion() -> bool:
            response = await ingest.GetDocument(
                ingestion_pb2.GetDocumentRequest(document_id=done.document_id)
            )
            return response.document.provenance.HasField("anchor")

        await _until(indexed, "the probe document indexed by retrieval")
        await _until(anchored, "the probe document anchored by the ledger")
        await _until(anchor_back_in_ingestion, "the anchor recorded by ingestion")
        # whatever its code, the call is observed; only the metrics matter here
        with contextlib.suppress(grpc.aio.AioRpcError):
            await search.Search(retrieval_pb2.SearchRequest(query="rollup data availability"))
        # a grounded answer: the gateway's RPC, provider and accounting metrics
        answer = inference_pb2_grpc.InferenceServiceStub(channels["inference"])
        with contextlib.suppress(grpc.aio.AioRpcError):
            await answer.Answer(inference_pb2.AnswerRequest(query="rollup data availability"))
        # a chat that falls back (the domain metrics of the inference dashboard); its
        # errors are not suppressed: the check below needs what it records
        await answer.Chat(
            inference_pb2.ChatRequest(
                messages=[
                    inference_pb2.ChatMessage(
                        role=inference_pb2.ROLE_USER,
                        content="What do rollups post to the base layer?",
                    )
                ]
            )
        )

        async with httpx.AsyncClient(timeout=10) as http:
            texts = {}
            for svc, running in running_services.items():
                response = await http.get(f"{running.http_url}/metrics")
                response.raise_for_status()
                texts[svc] = response.text
        return texts
