"""The five services for the fuzz tests, started in this process on a loop of their own.

Each service is started with the function ``python -m`` runs (``run_identity``,
``run_ingestion`` through its test helper, ...), on a SQLite file of its own under a tmp
dir, real NATS, real gRPC and HTTP sockets on free ports, and auth ON: every service
verifies tokens against identity's real JWKS endpoint, and the fuzz token is issued by
identity for a key holding every scope of the contracts (so a request always gets past
auth and reaches validation and the domain).

Event namespaces keep fuzz traffic from crossing services it would not reach anyway:
ingestion and retrieval share one (the seed document is indexed), identity, ledger and
inference have one each. So a service's row counts change only through its own RPCs and
their own background work (outbox relay, ledger follower, indexer).

The stack runs on a background thread's event loop (gRPC aio channels and the engines
are bound to it); Hypothesis tests are synchronous and submit coroutines with
:meth:`FuzzStack.run`.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc.aio
from _ingestion_support import run_ingestion_in
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, inspect, select, table
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.embedding import Embedder
from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledgerlens.options.v1 import auth_pb2
from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.events import STREAMS
from ledgerlens.runtime.testing import EventNames, delete_streams, eventually
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

SERVICES = ("identity", "ingestion", "retrieval", "inference", "ledger")

SEED_DOCUMENT = b"""# Rollup notes

A short note about rollups and the base fee, so the index has something to find.

## Data availability

Optimistic rollups post transaction data to the base layer; validity rollups post proofs.
"""


def all_scopes() -> list[str]:
    """Every scope any RPC of the five contracts asks for (read from the descriptors)."""
    from _grpc_methods import discover_methods

    scopes: set[str] = set()
    for method in discover_methods():
        scopes.update(method.descriptor.GetOptions().Extensions[auth_pb2.auth].scopes)
    return sorted(scopes)


def make_csr(common_name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Seed:
    """Real objects the valid requests refer to (made through the services' own RPCs)."""

    token: str = ""
    admin_key_id: str = ""
    admin_secret: str = ""
    victim_key_id: str = ""
    document_id: str = ""
    deletable_id: str = ""
    document_sha256: str = ""
    chunk_id: str = ""
    tx_id: str = ""
    anchored_document_id: str = ""
    anchored_sha256: str = ""
    audit_request_id: str = ""
    csr_pem: str = ""
    enrolled_id: str = ""


@dataclass
class FuzzStack:
    nats_url: str
    embedder: Embedder
    tmp: Path
    names: dict[str, EventNames] = field(default_factory=dict)
    running: dict[str, Any] = field(default_factory=dict)
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    engines: dict[str, AsyncEngine] = field(default_factory=dict)
    database_urls: dict[str, str] = field(default_factory=dict)
    seed: Seed = field(default_factory=Seed)
    #: services whose state may still be moving after a successful call
    dirty: set[str] = field(default_factory=lambda: set(SERVICES))
    loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _exit: AsyncExitStack | None = None

    # -- the loop ------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        assert self.loop is not None
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def start(self) -> FuzzStack:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="fuzz-stack", daemon=True
        )
        self._thread.start()
        try:
            self.run(self._start(), timeout=300)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.loop is None:
            return
        try:
            if self._exit is not None:
                self.run(self._exit.aclose(), timeout=120)
            for names in self.names.values():
                self.run(delete_streams(self.nats_url, names), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._thread is not None:
                self._thread.join(30)
            self.loop.close()
            self.loop = None

    # -- start ---------------------------------------------------------------------------

    def _common(self, name: str) -> dict[str, Any]:
        url = f"sqlite+aiosqlite:///{self.tmp}/{name}.db"
        self.database_urls[name] = url
        return {
            "database_url": url,
            "nats_url": self.nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(self.tmp / name),
            "shutdown_grace_seconds": 2.0,
        }

    def _auth(self) -> dict[str, Any]:
        jwks = f"{self.running['identity'].http_url}/.well-known/jwks.json"
        return {"jwks_url": jwks, "jwks_min_refresh_seconds": 0.0}

    async def _start(self) -> None:
        self._exit = stack = AsyncExitStack()
        token = secrets.token_hex(4)
        for group in ("identity", "search", "ledger", "inference"):
            self.names[group] = EventNames(f"{token}{group[:2]}")

        identity = await stack.enter_async_context(
            run_identity(
                IdentitySettings.model_validate(
                    {
                        **self._common("identity"),
                        "token_ttl_seconds": 4 * 3600,
                        # fuzzing sends many bad secrets from one address on purpose
                        "bad_secret_max_delay_seconds": 0,
                        "token_rate_per_key_per_minute": 1_000_000,
                        "token_rate_per_address_per_minute": 1_000_000,
                    }
                ),
                stream=self.names["identity"].stream(STREAMS["IDENTITY"]),
            )
        )
        self.running["identity"] = identity
        core = identity.core
        scopes = all_scopes()
        admin, admin_secret = await core.create_key("acme", "fuzz-admin", scopes)
        service, service_secret = await core.create_key("acme", "inference", ["search:read"])
        victim, _ = await core.create_key("acme", "victim", ["search:read"])
        issued = await core.issue_token(admin.key_id, admin_secret, scopes)
        self.seed.token = issued.access_token
        self.seed.admin_key_id, self.seed.admin_secret = admin.key_id, admin_secret
        self.seed.victim_key_id = victim.key_id

        search = self.names["search"]
        retrieval = await stack.enter_async_context(
            run_retrieval(
                RetrievalSettings.model_validate(
                    {**self._common("retrieval"), "backend": "local", "auth": self._auth()}
                ),
                embedder=self.embedder,
                streams=search.platform_streams(),
                consumers=[search.consumer(c) for c in RETRIEVAL_CONSUMERS],
            )
        )
        self.running["retrieval"] = retrieval
        self.running["ingestion"] = await stack.enter_async_context(
            run_ingestion_in(
                search,
                IngestionSettings.model_validate(
                    {
                        **self._common("ingestion"),
                        "auth": self._auth(),
                        # small documents only: the model is the slow part
                        "max_document_bytes": 32_768,
                    }
                ),
                self.embedder,
            )
        )
        ledger_names = self.names["ledger"]
        self.running["ledger"] = await stack.enter_async_context(
            run_ledger(
                LedgerSettings.model_validate(
                    {
                        **self._common("ledger"),
                        "auth": self._auth(),
                        "dev": {"poll_interval_seconds": 0.05},
                    }
                ),
                streams=ledger_names.platform_streams(),
                consumers=[ledger_names.consumer(c) for c in LEDGER_CONSUMERS],
            )
        )
        inference_names = self.names["inference"]
        self.running["inference"] = await stack.enter_async_context(
            run_inference(
                InferenceSettings.model_validate(
                    {
                        **self._common("inference"),
                        "auth": self._auth(),
                        "outbox_poll_seconds": 0.2,
                        # no limits: a fuzzed request must reach validation, not the limiter
                        "limits": {
                            "key_requests_per_minute": 0,
                            "key_tokens_per_minute": 0,
                            "key_tokens_per_day": 0,
                            "tenant_requests_per_minute": 0,
                            "tenant_tokens_per_minute": 0,
                            "tenant_tokens_per_day": 0,
                        },
                        "rag": {"retrieval_target": retrieval.grpc_address},
                        "service_client_id": service.key_id,
                        "service_client_secret": service_secret,
                        "service_token_url": f"{identity.http_url}/oauth/token",
                    }
                ),
                embedder=self.embedder,
                streams=inference_names.platform_streams(),
                revoked_consumer=inference_names.consumer(REVOKED_CONSUMER),
                subject=inference_names.subject,
            )
        )
        for svc in SERVICES:
            channel = grpc.aio.insecure_channel(
                self.running[svc].grpc_address,
                options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
            )
            stack.push_async_callback(channel.close)
            self.channels[svc] = channel
            engine = create_engine(self.database_urls[svc])
            stack.push_async_callback(engine.dispose)
            self.engines[svc] = engine
        await self._seed()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.seed.token}"),)

    async def _seed(self) -> None:
        """One real object of each kind, through the RPCs, for the valid requests."""
        md = self.metadata
        ingest = ingestion_pb2_grpc.IngestionServiceStub(self.channels["ingestion"])
        done = await ingest.IngestDocument(
            ingestion_pb2.IngestDocumentRequest(
                source_url="https://example.org/fuzz-seed.md",
                content=SEED_DOCUMENT,
                content_type="text/markdown",
            ),
            metadata=md,
        )
        self.seed.document_id, self.seed.document_sha256 = done.document_id, done.sha256
        deletable = await ingest.IngestDocument(
            ingestion_pb2.IngestDocumentRequest(
                source_url="https://example.org/fuzz-deletable.txt",
                content=b"A note to delete.",
                content_type="text/plain",
            ),
            metadata=md,
        )
        self.seed.deletable_id = deletable.document_id
        retrieval = self.running["retrieval"]

        async def indexed() -> bool:
            return bool(await retrieval.indexer.backend.count() >= done.chunk_count)

        await eventually(indexed, within=60, interval=0.1, message="seed document indexed")
        from ledgerlens.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

        found = await retrieval_pb2_grpc.RetrievalServiceStub(self.channels["retrieval"]).Search(
            retrieval_pb2.SearchRequest(query="rollups data availability", top_k=1),
            metadata=md,
        )
        self.seed.chunk_id = found.results[0].chunk.chunk_id

        ledger = ledger_pb2_grpc.LedgerServiceStub(self.channels["ledger"])
        stamp = datetime(2026, 1, 1, tzinfo=UTC)
        anchored = ledger_pb2.AnchorDocumentRequest(
            document_id="doc-fuzz-seed",
            version=1,
            sha256="ab" * 32,
            source_url="https://example.org/anchored.md",
        )
        anchored.ingested_at.FromDatetime(stamp)
        answer = await ledger.AnchorDocument(anchored, metadata=md)
        self.seed.tx_id = answer.record.anchor.tx_id
        self.seed.anchored_document_id, self.seed.anchored_sha256 = "doc-fuzz-seed", "ab" * 32
        audit = ledger_pb2.AnchorAuditRequest(
            record=ledger_pb2.AuditRecord(
                request_id="req-fuzz-seed",
                prompt_sha256="cd" * 32,
                answer_sha256="ef" * 32,
                model="extractive",
                tenant_id="acme",
                api_key_id=self.seed.admin_key_id,
                cited_chunk_ids=["c1"],
            )
        )
        audit.record.completed_at.FromDatetime(stamp)
        await ledger.AnchorAudit(audit, metadata=md)
        self.seed.audit_request_id = "req-fuzz-seed"

        identity = identity_pb2_grpc.IdentityServiceStub(self.channels["identity"])
        self.seed.enrolled_id = "fuzz-peer"
        self.seed.csr_pem = make_csr("fuzz-peer")
        await identity.EnrollCertificate(
            identity_pb2.EnrollCertificateRequest(
                enrollment_id="fuzz-peer", csr_pem=self.seed.csr_pem
            ),
            metadata=md,
        )

    # -- state ---------------------------------------------------------------------------

    async def row_counts(self, svc: str) -> dict[str, int]:
        """Rows in every table of ``svc``'s database (tables found by reflection)."""
        engine = self.engines[svc]
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
            counts = {}
            for name in names:
                counts[name] = int(
                    await conn.scalar(select(func.count()).select_from(table(name))) or 0
                )
        return counts

    async def settled_counts(
        self, svc: str, quiet: float = 0.15, within: float = 15.0
    ) -> dict[str, int]:
        """Row counts once ``svc``'s background work (relay, follower, indexer) stopped
        changing them for ``quiet`` seconds; at once when nothing ran since last time."""
        counts = await self.row_counts(svc)
        if svc not in self.dirty:
            return counts
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await asyncio.sleep(quiet)
            again = await self.row_counts(svc)
            if again == counts:
                self.dirty.discard(svc)
                return again
            counts = again
        raise AssertionError(f"{svc}'s row counts did not settle within {within}s: {counts}")
