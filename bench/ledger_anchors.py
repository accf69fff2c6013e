"""Document anchoring on the dev ledger: anchors per second and commit latency.

Each run opens a fresh dev ledger (``DevLedger`` with the ``AnchoringContract``,
migrated as the service does; the block cutter configured as the service's defaults,
``DevLedgerSettings``: at most 100 transactions per block, 20 ms linger) on

- SQLite: a file in a temp dir (WAL, as ``ledgerlens.runtime.db`` opens it);
- PostgreSQL at 127.0.0.1:5432, database ``test`` (``LEDGERLENS_TEST_POSTGRES_URL``
  overrides), in a scratch schema dropped afterwards; skipped, and said so in the
  JSON, when it is not reachable.

and measures, for distinct documents (so no transaction conflicts with another):

(a) *single*: one ``AnchorDocument`` transaction per document, each one endorsed
    (``simulate``), handed to the orderer (``submit``: the block cutter batches what
    is pending) and waited for (``wait_for``), by 1 and by 16 concurrent clients;
(b) *batched*: ``AnchorDocuments`` with 64 documents per transaction, the same way,
    by 1 and by 4 concurrent clients.

A transaction's commit latency runs from the start of its simulation to ``wait_for``
returning (it is committed and valid); anchors per second are documents anchored
over the run's wall time. Every transaction must commit VALID (checked).

(c) optional: ``AnchorDocument`` through gRPC at concurrency 8, against the service
    started in this process with ``ledgerlens.services.ledger.app.run_ledger`` (dev
    backend, SQLite, auth off, a private nats-server), when that module exists.

No target is asserted (ARCHITECTURE.md sets none for the ledger); the JSON reports
how many times ingestion's measured document rate each run anchors. The whole run
takes about a minute on two CPUs.

Run alone: ``python bench/ledger_anchors.py``; ``make bench`` runs it through
``bench/run.py``. Prints / returns JSON and writes ``bench/results/ledger_anchors.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import machine, rpc_summary

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "ledger_anchors.json"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
BATCH = 64
INGESTED_AT = "2026-11-30T00:00:00Z"
#: ARCHITECTURE.md sets no ledger target; the reference is what feeds the ledger:
#: ingestion's measured documents per second (bench/results/ingestion_throughput.json).
INGESTION_RESULTS = REPO / "bench" / "results" / "ingestion_throughput.json"


def _log(message: str) -> None:
    print(f"[ledger_anchors] {message}", file=sys.stderr, flush=True)


def _sha(index: int, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{index}".encode()).hexdigest()


def _doc(index: int, salt: str) -> dict[str, Any]:
    return {
        "document_id": f"doc_{salt}_{index:07d}",
        "version": 1,
        "sha256": _sha(index, salt),
        "source_url": f"https://bench.example.org/{salt}/{index}.md",
        "ingested_at": INGESTED_AT,
    }


def _single_args(doc: dict[str, Any]) -> list[bytes]:
    return [
        str(doc[name]).encode()
        for name in ("document_id", "version", "sha256", "source_url", "ingested_at")
    ]


async def _drive(
    total: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> tuple[list[float], float]:
    """``one(i)`` for i in [0, total) by ``concurrency`` workers: latencies, wall time."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for index in counter:
            started = time.perf_counter()
            await one(index)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


# -- the dev ledger, in process ---------------------------------------------------------


@contextlib.asynccontextmanager
async def _ledger(url: str) -> AsyncIterator[Any]:
    from ledgerlens.runtime.db import create_engine
    from ledgerlens.services.ledger.contract import AnchoringContract
    from ledgerlens.services.ledger.devledger import DevLedger, migrate
    from ledgerlens.services.ledger.settings import DevLedgerSettings

    defaults = DevLedgerSettings()
    await migrate(url)
    engine = create_engine(url)
    ledger = await DevLedger.open(
        engine,
        [AnchoringContract()],
        batch_timeout=defaults.block_linger_seconds,
        max_batch_size=defaults.max_block_transactions,
    )
    try:
        yield ledger
    finally:
        await ledger.close()
        await engine.dispose()


async def _transact(ledger: Any, function: str, args: list[bytes], expected: int) -> int:
    """simulate -> submit -> wait_for; returns the documents newly anchored."""
    endorsement = await ledger.simulate("anchoring", function, args)
    await ledger.submit(endorsement)
    async with asyncio.timeout(60):
        status = await ledger.wait_for(endorsement.tx_id)
    if status.state != "valid":
        raise RuntimeError(f"{function} tx {endorsement.tx_id} committed {status.validation_code}")
    result = json.loads(endorsement.result)
    if function == "AnchorDocument":
        anchored = 0 if result["already_anchored"] else 1
    else:
        anchored = sum(1 for item in result["results"] if item["status"] == "anchored")
    if anchored != expected:
        raise RuntimeError(f"{function}: {anchored} anchored, expected {expected}")
    return anchored


async def _blocks(ledger: Any, first: int) -> int:
    return int(ledger.height) - first


async def _single(ledger: Any, docs: int, concurrency: int) -> dict[str, Any]:
    salt = uuid.uuid4().hex[:8]
    height = ledger.height

    async def one(index: int) -> None:
        await _transact(ledger, "AnchorDocument", _single_args(_doc(index, salt)), 1)

    # warm-up: first statements compile, connections open
    for index in range(docs, docs + 5):
        await one(index)
    height = ledger.height
    latencies, seconds = await _drive(docs, concurrency, one)
    summary = rpc_summary(latencies, seconds)
    blocks = await _blocks(ledger, height)
    return {
        "concurrency": concurrency,
        "documents": docs,
        "transactions": docs,
        "documents_per_transaction": 1,
        "blocks": blocks,
        "transactions_per_block": round(docs / blocks, 1) if blocks else None,
        "anchors_per_second": round(docs / seconds, 1),
        "commit_latency": {
            key: summary[key] for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "seconds")
        },
    }


async def _batched(ledger: Any, transactions: int, concurrency: int) -> dict[str, Any]:
    salt = uuid.uuid4().hex[:8]

    def batch_args(tx: int) -> list[bytes]:
        items = [_doc(tx * BATCH + i, salt) for i in range(BATCH)]
        return [json.dumps(items).encode()]

    async def one(tx: int) -> None:
        await _transact(ledger, "AnchorDocuments", batch_args(tx), BATCH)

    await one(transactions)  # warm-up
    height = ledger.height
    latencies, seconds = await _drive(transactions, concurrency, one)
    summary = rpc_summary(latencies, seconds)
    blocks = await _blocks(ledger, height)
    docs = transactions * BATCH
    return {
        "concurrency": concurrency,
        "documents": docs,
        "transactions": transactions,
        "documents_per_transaction": BATCH,
        "blocks": blocks,
        "transactions_per_block": round(transactions / blocks, 1) if blocks else None,
        "anchors_per_second": round(docs / seconds, 1),
        "transactions_per_second": round(transactions / seconds, 1),
        "commit_latency": {
            key: summary[key] for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "seconds")
        },
    }


async def _engine_runs(url: str, scale: float) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    plan: list[tuple[str, Callable[[Any], Awaitable[dict[str, Any]]]]] = [
        ("single_c1", lambda led: _single(led, int(150 * scale), 1)),
        ("single_c16", lambda led: _single(led, int(1600 * scale), 16)),
        ("batched_c1", lambda led: _batched(led, int(40 * scale), 1)),
        ("batched_c4", lambda led: _batched(led, int(80 * scale), 4)),
    ]
    async with _ledger(url) as ledger:
        for name, run in plan:
            runs[name] = await run(ledger)
            _log(f"  {name}: {runs[name]['anchors_per_second']} anchors/s, {runs[name]}")
        runs["chain_verified_blocks"] = await ledger.verify_chain()
    return runs


# -- PostgreSQL: a scratch schema -----------------------------------------------------------


async def _pg_admin(url: str, statement: str) -> str:
    import asyncpg
    from sqlalchemy.engine import make_url

    dsn = make_url(url).set(drivername="postgresql").difference_update_query(["search_path"])
    conn = await asyncpg.connect(dsn.render_as_string(hide_password=False), timeout=3)
    try:
        await conn.execute(statement)
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def _postgres(scale: float) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    base = os.environ.get("LEDGERLENS_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    shown = make_url(base).render_as_string()
    schema = f"bench_ledger_{uuid.uuid4().hex[:10]}"
    import asyncpg

    try:
        version = await _pg_admin(base, f'CREATE SCHEMA "{schema}"')
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        _log(f"PostgreSQL at {shown} not usable ({exc!r}): skipped")
        return {"skipped": f"PostgreSQL at {shown} not reachable: {exc!r}"}
    url = make_url(base).update_query_dict({"search_path": schema})
    try:
        runs = await _engine_runs(url.render_as_string(hide_password=False), scale)
    finally:
        await _pg_admin(base, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return {"database": f"{shown} (scratch schema, dropped after)", "server": version, **runs}


# -- gRPC, optional ---------------------------------------------------------------------------


def _has_run_ledger() -> bool:
    try:
        spec = importlib.util.find_spec("ledgerlens.services.ledger.app")
    except ModuleNotFoundError:
        return False
    if spec is None or spec.origin is None:
        return False
    return "run_ledger" in Path(spec.origin).read_text()


async def _grpc(workdir: Path, nats_url: str, docs: int, concurrency: int) -> dict[str, Any]:
    import grpc.aio
    from google.protobuf.timestamp_pb2 import Timestamp

    from ledgerlens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
    from ledgerlens.services.ledger.app import run_ledger
    from ledgerlens.services.ledger.settings import Settings

    settings = Settings.model_validate(
        {
            "database_url": f"sqlite+aiosqlite:///{workdir / 'ledger-grpc.db'}",
            "data_dir": str(workdir / "ledger-data"),
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "auth": {"enabled": False},
            "shutdown_grace_seconds": 2.0,
        }
    )
    ingested = Timestamp()
    ingested.FromDatetime(datetime(2026, 11, 30, tzinfo=UTC))
    salt = uuid.uuid4().hex[:8]
    async with (
        run_ledger(settings) as running,
        grpc.aio.insecure_channel(running.grpc_address) as channel,
    ):
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        async def one(index: int) -> None:
            doc = _doc(index, salt)
            response = await stub.AnchorDocument(
                ledger_pb2.AnchorDocumentRequest(
                    document_id=doc["document_id"],
                    version=1,
                    sha256=doc["sha256"],
                    source_url=doc["source_url"],
                    ingested_at=ingested,
                ),
                timeout=60,
            )
            if response.already_anchored or not response.record.anchor.tx_id:
                raise RuntimeError(f"AnchorDocument {index}: {response}")

        for index in range(docs, docs + 5):
            await one(index)
        latencies, seconds = await _drive(docs, concurrency, one)
    summary = rpc_summary(latencies, seconds)
    return {
        "rpc": "ledgerlens.ledger.v1.LedgerService/AnchorDocument (unary, waits for the commit)",
        "setup": "run_ledger in this process: dev backend, SQLite, auth off, private nats-server",
        "concurrency": concurrency,
        "documents": docs,
        "anchors_per_second": round(docs / seconds, 1),
        "commit_latency": {
            key: summary[key] for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "seconds")
        },
    }


def _grpc_run(docs: int, concurrency: int) -> dict[str, Any]:
    if not _has_run_ledger():
        return {"skipped": "ledgerlens.services.ledger.app.run_ledger does not exist yet"}
    from ledgerlens.runtime.testing import PrivateNatsServer

    with tempfile.TemporaryDirectory(prefix="ledgerlens-bench-ledger-grpc-") as tmp:
        nats = PrivateNatsServer(store_dir=Path(tmp) / "nats").start()
        try:
            return asyncio.run(_grpc(Path(tmp), nats.url, docs, concurrency))
        finally:
            nats.stop()


# -- main ---------------------------------------------------------------------------------


def _ingestion_docs_per_second() -> float | None:
    try:
        data = json.loads(INGESTION_RESULTS.read_text())
        data = data.get("ingestion_throughput", data)  # as run.py wraps it, or bare
        return float(data["pipeline"]["docs_per_second"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _headroom(engine: dict[str, Any], ingestion: float | None) -> dict[str, float] | None:
    """How many times ingestion's document rate each run anchors."""
    if ingestion is None or "single_c1" not in engine:
        return None
    return {
        name: round(engine[name]["anchors_per_second"] / ingestion, 1)
        for name in ("single_c1", "single_c16", "batched_c1", "batched_c4")
    }


def main(scale: float = 1.0, grpc: bool = True, write: bool = True) -> dict[str, Any]:
    from ledgerlens.services.ledger.settings import DevLedgerSettings

    defaults = DevLedgerSettings()
    load_start = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine(sqlite=sqlite3.sqlite_version),
        "block_cutter": {
            "max_block_transactions": defaults.max_block_transactions,
            "block_linger_seconds": defaults.block_linger_seconds,
        },
        "commit_latency": "simulate start -> wait_for returns (committed VALID)",
    }
    with tempfile.TemporaryDirectory(prefix="ledgerlens-bench-ledger-") as tmp:
        _log("SQLite")
        sqlite = asyncio.run(_engine_runs(f"sqlite+aiosqlite:///{Path(tmp) / 'ledger.db'}", scale))
        result["sqlite"] = {"database": "SQLite file in a temp dir (WAL)", **sqlite}
    _log("PostgreSQL")
    result["postgres"] = asyncio.run(_postgres(scale))
    if grpc:
        _log("gRPC")
        try:
            result["grpc_sqlite"] = _grpc_run(int(800 * scale), 8)
        except Exception as exc:  # noqa: BLE001 - optional part: report, do not fail
            _log(f"gRPC part failed: {exc!r}")
            result["grpc_sqlite"] = {"skipped": f"failed: {exc!r}"}
    else:
        result["grpc_sqlite"] = {"skipped": "--no-grpc"}
    ingestion = _ingestion_docs_per_second()
    result["reference"] = {
        "targets": "none set for the ledger (ARCHITECTURE.md); it must keep up with ingestion",
        "ingestion_docs_per_second": ingestion,
        "anchors_per_second_over_ingestion": {
            "sqlite": _headroom(result["sqlite"], ingestion),
            "postgres": _headroom(result["postgres"], ingestion),
        },
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    load_end = round(os.getloadavg()[0], 2)
    result["load_average_1m"] = {"start": load_start, "end": load_end}
    if max(load_start, load_end) > 2.5:
        result["machine_busy_note"] = (
            f"the 1-minute load average reached {max(load_start, load_end)} on "
            f"{os.cpu_count()} CPUs (this benchmark alone, with PostgreSQL, keeps about one "
            "busy): other work shared the machine, so these figures are on the low side"
        )
    if write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every run's size")
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC part")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = parser.parse_args()
    print(json.dumps(main(args.scale, not args.no_grpc, not args.no_write), indent=2))
