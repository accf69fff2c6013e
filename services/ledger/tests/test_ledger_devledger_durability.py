"""A submitted transaction survives the crash of the process that submitted it, on
SQLite and on PostgreSQL: the crash is real (a process SIGKILLed after its submit
returned, its block cutter still lingering), and a ledger opened afterwards on the same
database cuts what it left, validated exactly as without the crash."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import pytest
import pytest_asyncio
from _ledger_support import anchor_args, nothing_more, sha, take
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.services.ledger.backend import DevBackend
from ledgerlens.services.ledger.contract import CHAINCODE_NAME, AnchoringContract
from ledgerlens.services.ledger.devledger import DevLedger, Endorsement
from ledgerlens.services.ledger.devledger.schema import PendingRow, TransactionRow

CC = CHAINCODE_NAME

# Opens the ledger with a block cutter that lingers for an hour, simulates every
# transaction of argv[2] (all against the same state, so they may conflict), submits
# them in order, prints them as block entries once every submit returned, then waits to
# be killed: nothing it submitted can have been cut into a block by then.
_SUBMIT_THEN_HANG = """
import asyncio, json, sys
from ledgerlens.runtime.db import create_engine
from ledgerlens.services.ledger.contract import AnchoringContract
from ledgerlens.services.ledger.devledger import DevLedger

async def main(url, calls):
    ledger = await DevLedger.open(
        create_engine(url), [AnchoringContract()], batch_timeout=3600.0
    )
    endorsements = [
        await ledger.simulate("anchoring", function, [a.encode() for a in args])
        for function, args in calls
    ]
    height = ledger.height
    for endorsement in endorsements:
        await ledger.submit(endorsement)
    assert ledger.height == height, "a block was cut before the crash"
    print(json.dumps([e.to_json("") for e in endorsements]), flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


async def submit_and_crash(url: str, calls: Sequence[tuple[str, list[bytes]]]) -> list[Endorsement]:
    """Submits ``calls`` in a process of its own, SIGKILLs it once the submits returned
    and returns what it submitted."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SUBMIT_THEN_HANG,
        url,
        json.dumps([(function, [a.decode() for a in args]) for function, args in calls]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = await process.stdout.readline()
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = await process.communicate()
    assert line, f"the submitting process died first: {stderr.decode()[-2000:]}"
    assert process.returncode == -signal.SIGKILL
    return [Endorsement.from_block_entry(entry)[0] for entry in json.loads(line)]


@pytest_asyncio.fixture
async def open_dev(engine: AsyncEngine) -> AsyncIterator[Any]:
    """``await open_dev(**options)``: a DevLedger on this test's database, closed after."""
    opened: list[DevLedger] = []

    async def open_(**options: Any) -> DevLedger:
        options = {"poll_interval": 0.2, "batch_timeout": 0.01, **options}
        ledger = await DevLedger.open(engine, [AnchoringContract()], **options)
        opened.append(ledger)
        return ledger

    yield open_
    for ledger in opened:
        await ledger.close()


async def count(engine: AsyncEngine, table: Any, *where: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def anchor_call(doc: str, version: int, digest: str) -> tuple[str, list[bytes]]:
    return "AnchorDocument", anchor_args(doc, version, digest)


async def test_an_acknowledged_submit_is_committed_after_a_crash(
    database_url: str, engine: AsyncEngine, open_dev: Any
) -> None:
    (submitted,) = await submit_and_crash(database_url, [anchor_call("doc", 1, sha("v1"))])
    assert await count(engine, PendingRow) == 1  # the crash left it in the queue

    ledger = await open_dev()  # cuts it before it returns
    status = await ledger.status(submitted.tx_id)
    assert (status.state, status.validation_code, status.block_number) == ("valid", "VALID", 1)
    assert ledger.height == 2
    assert await count(engine, PendingRow) == 0
    assert await ledger.verify_chain() == 2
    stored = await ledger.block(1)
    assert [(tx.tx_id, code) for tx, code in stored.transactions] == [(submitted.tx_id, "VALID")]
    assert stored.transactions[0][0] == submitted  # recorded exactly as endorsed
    record = json.loads(await ledger.evaluate(CC, "GetAnchor", [b"doc", b"1"]))
    assert record["tx_id"] == submitted.tx_id

    again = await open_dev()  # nothing left to cut: no second block, no second event
    assert again.height == 2
    async with aclosing(again.events(start_block=0)) as events:
        assert [e.tx_id for e in await take(events, 1)] == [submitted.tx_id]
        assert await nothing_more(events)


async def test_a_pending_transaction_reports_pending_after_a_restart_until_cut(
    database_url: str, engine: AsyncEngine, open_dev: Any
) -> None:
    (submitted,) = await submit_and_crash(database_url, [anchor_call("doc", 1, sha("v1"))])

    observer = await open_dev(recover_pending=False)  # a process that does not cut it
    assert (await observer.status(submitted.tx_id)).state == "pending"
    backend = DevBackend(observer)
    info = await backend.commit_status(submitted.tx_id)
    assert (info.state, info.validation_code) == ("pending", "")
    waiting = asyncio.create_task(observer.wait_for(submitted.tx_id))
    await asyncio.sleep(0.3)
    assert not waiting.done()

    await open_dev()  # the restarted writer cuts it; the waiter notices (by polling)
    async with asyncio.timeout(10):
        status = await waiting
    assert (status.state, status.block_number) == ("valid", 1)
    assert (await backend.commit_status(submitted.tx_id)).state == "valid"


async def test_conflicts_resolve_as_without_a_crash(
    database_url: str, engine: AsyncEngine, open_dev: Any
) -> None:
    def calls(doc: str) -> list[tuple[str, list[bytes]]]:
        # all endorsed on the same state: the second conflicts with the first
        return [
            anchor_call(doc, 1, sha("a")),
            anchor_call(doc, 1, sha("b")),
            anchor_call(doc, 2, sha("c")),
        ]

    # with a crash: submitted, killed; a late client endorsed on the pre-crash state
    crashed = await submit_and_crash(database_url, calls("crashed"))
    observer = await open_dev(recover_pending=False)
    late = await observer.simulate(CC, *anchor_call("crashed", 1, sha("late")))
    await observer.close()
    ledger = await open_dev()
    await ledger.submit(late)
    async with asyncio.timeout(10):
        with_crash = [(await ledger.wait_for(e.tx_id)).validation_code for e in crashed]
        late_code = (await ledger.wait_for(late.tx_id)).validation_code

    # without: the same transactions in one process that lives on
    clean = [await ledger.simulate(CC, *call) for call in calls("clean")]
    clean_late = await ledger.simulate(CC, *anchor_call("clean", 1, sha("late")))
    for endorsement in clean:
        await ledger.submit(endorsement)
    async with asyncio.timeout(10):
        without_crash = [(await ledger.wait_for(e.tx_id)).validation_code for e in clean]
        await ledger.submit(clean_late)
        clean_late_code = (await ledger.wait_for(clean_late.tx_id)).validation_code

    assert with_crash == without_crash == ["VALID", "MVCC_READ_CONFLICT", "VALID"]
    assert late_code == clean_late_code == "MVCC_READ_CONFLICT"
    record = json.loads(await ledger.evaluate(CC, "GetAnchor", [b"crashed", b"1"]))
    assert (record["sha256"], record["tx_id"]) == (sha("a"), crashed[0].tx_id)
    assert await ledger.verify_chain() == ledger.height
    async with aclosing(ledger.events(start_block=0)) as events:
        got = [e.tx_id for e in await take(events, 4)]
        assert await nothing_more(events)
    assert got == [crashed[0].tx_id, crashed[2].tx_id, clean[0].tx_id, clean[2].tx_id]


async def test_resubmitting_a_transaction_does_not_duplicate_it(
    database_url: str, engine: AsyncEngine, open_dev: Any
) -> None:
    # pending in this process: queued once
    ledger = await open_dev()
    here = await ledger.simulate(CC, *anchor_call("here", 1, sha("h")))
    await ledger.submit(here)
    await ledger.submit(here)
    assert await count(engine, PendingRow, PendingRow.tx_id == here.tx_id) == 1
    async with asyncio.timeout(10):
        first = await ledger.wait_for(here.tx_id)
    assert len((await ledger.block(int(first.block_number or 0))).transactions) == 1
    await ledger.close()

    # pending in the queue a crashed process left: the resubmit joins that row
    crashed, other = await submit_and_crash(
        database_url, [anchor_call("crashed", 1, sha("c")), anchor_call("other", 1, sha("o"))]
    )
    observer = await open_dev(recover_pending=False)
    await observer.submit(crashed)
    async with asyncio.timeout(10):
        status = await observer.wait_for(crashed.tx_id)
    assert status.state == "valid"
    await observer.close()
    recovered = await open_dev()  # cuts the other one the crash left
    assert (await recovered.status(other.tx_id)).state == "valid"
    assert await count(engine, PendingRow) == 0

    # committed: ordered again, recorded as DUPLICATE_TXID, its status and event unchanged
    for endorsement, committed in ((here, first), (crashed, status)):
        await recovered.submit(endorsement)
        await recovered.close()  # returns once the cutter cut everything submitted
        assert await count(engine, PendingRow) == 0
        again = await recovered.status(endorsement.tx_id)
        assert (again.state, again.block_number) == ("valid", committed.block_number)
    last = await recovered.block(recovered.height - 1)
    assert [code for _, code in last.transactions] == ["DUPLICATE_TXID"]
    for tx_id in (here.tx_id, crashed.tx_id, other.tx_id):
        assert await count(engine, TransactionRow, TransactionRow.tx_id == tx_id) == 1
    assert await recovered.verify_chain() == recovered.height
    async with aclosing(recovered.events(start_block=0)) as events:
        got = [e.tx_id for e in await take(events, 3)]
        assert await nothing_more(events)
    assert sorted(got) == sorted([here.tx_id, crashed.tx_id, other.tx_id])


@pytest.mark.parametrize("wait", [True, False], ids=["sync", "async"])
async def test_the_backend_acknowledges_only_what_is_durable(
    engine: AsyncEngine, open_dev: Any, wait: bool
) -> None:
    """Through DevBackend.submit: a pending answer means a row in ``devledger_pending``;
    the synchronous path still returns the committed status."""
    ledger = await open_dev(batch_timeout=3600.0 if not wait else 0.01)
    backend = DevBackend(ledger)
    submitted = await backend.submit(CC, *anchor_call("doc", 1, sha("v1")), wait=wait)
    if wait:
        assert (submitted.status.state, submitted.status.block_number) == ("valid", 1)
        assert await count(engine, PendingRow) == 0
    else:
        assert submitted.status.state == "pending"
        assert await count(engine, PendingRow, PendingRow.tx_id == submitted.tx_id) == 1
        await ledger.close(grace=0.1)  # a "crash": the cutter stops, the row stays
        assert await count(engine, PendingRow) == 1
        reopened = await open_dev()
        assert (await reopened.status(submitted.tx_id)).state == "valid"
