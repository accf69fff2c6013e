"""The dev ledger with the anchoring contract, on SQLite and on PostgreSQL: endorsement,
validation (MVCC, phantoms, duplicates), the hash chain, commit status and events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import aclosing

import pytest
from _ledger_support import anchor_args, audit_args, nothing_more, sha, take
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.services.ledger.contract import (
    CHAINCODE_NAME,
    EVENT_AUDIT_ANCHORED,
    EVENT_DOCUMENT_ANCHORED,
)
from ledgerlens.services.ledger.devledger import (
    Checkpoint,
    DevLedger,
    EndorsementRefused,
    InvalidCheckpoint,
    LedgerCorruptedError,
    LedgerEvent,
    OutOfRange,
    UnknownChaincode,
)

CC = CHAINCODE_NAME
OpenLedger = Callable[[], Awaitable[DevLedger]]


async def anchor(ledger: DevLedger, doc: str, version: int, digest: str) -> str:
    """Endorses and commits one anchor in a block of its own; returns the tx id."""
    endorsement = await ledger.simulate(CC, "AnchorDocument", anchor_args(doc, version, digest))
    block = await ledger.commit([endorsement])
    assert block.result(endorsement.tx_id).validation_code == "VALID"
    return endorsement.tx_id


async def test_anchor_commit_status_and_genesis(ledger: DevLedger) -> None:
    assert ledger.height == 1  # the genesis block
    endorsement = await ledger.simulate(CC, "AnchorDocument", anchor_args("doc", 1, sha("v1")))
    assert json.loads(endorsement.result)["already_anchored"] is False
    assert (await ledger.status(endorsement.tx_id)).state == "unknown"
    block = await ledger.commit([endorsement])
    assert block.number == 1
    assert ledger.height == 2
    status = await ledger.status(endorsement.tx_id)
    assert (status.state, status.validation_code, status.block_number) == ("valid", "VALID", 1)
    assert status.committed_at == block.committed_at
    record = json.loads(await ledger.evaluate(CC, "GetAnchor", [b"doc", b"1"]))
    assert record["tx_id"] == endorsement.tx_id
    stored = await ledger.block(1)
    assert stored.hash == block.hash
    assert stored.header.previous_hash == (await ledger.block(0)).hash
    assert stored.transactions[0][0].rwset == endorsement.rwset
    assert await ledger.verify_chain() == 2


async def test_reanchoring_the_same_triple_is_a_no_op(ledger: DevLedger) -> None:
    first = await anchor(ledger, "doc", 1, sha("v1"))
    again = await ledger.simulate(CC, "AnchorDocument", anchor_args("doc", 1, sha("v1")))
    out = json.loads(again.result)
    assert out["already_anchored"] is True
    assert out["record"]["tx_id"] == first
    assert again.rwset.writes == ()
    assert again.event is None
    # committing it anyway is harmless: valid, nothing written, no event
    block = await ledger.commit([again])
    assert block.result(again.tx_id).validation_code == "VALID"
    async with aclosing(ledger.events(start_block=0)) as events:
        assert [e.tx_id for e in await take(events, 1)] == [first]
        assert await nothing_more(events)


async def test_a_different_sha256_is_refused_at_endorsement(ledger: DevLedger) -> None:
    await anchor(ledger, "doc", 1, sha("v1"))
    with pytest.raises(EndorsementRefused) as info:
        await ledger.simulate(CC, "AnchorDocument", anchor_args("doc", 1, sha("v2")))
    assert info.value.status == 409
    assert sha("v1") in info.value.message
    assert sha("v2") in info.value.message
    assert info.value.function == "AnchorDocument"
    assert ledger.height == 2  # nothing was ordered


async def test_mvcc_conflict_within_one_block(ledger: DevLedger) -> None:
    # both endorsed on the same (empty) state: each read says "absent" and writes
    first = await ledger.simulate(CC, "AnchorDocument", anchor_args("doc", 1, sha("a")))
    second = await ledger.simulate(CC, "AnchorDocument", anchor_args("doc", 1, sha("b")))
    other = await ledger.simulate(CC, "AnchorDocument", anchor_args("doc", 2, sha("c")))
    block = await ledger.commit([first, second, other])
    codes = [tx.validation_code for tx in block.transactions]
    assert codes == ["VALID", "MVCC_READ_CONFLICT", "VALID"]
    status = await ledger.status(second.tx_id)
    assert (status.state, status.validation_code) == ("invalid", "MVCC_READ_CONFLICT")
    record = json.loads(await ledger.evaluate(CC, "GetAnchor", [b"doc", b"1"]))
    assert record["sha256"] == sha("a")
    # the invalid one left no trace in state or events
    async with aclosing(ledger.events(start_block=0)) as events:
        assert [e.tx_id for e in await take(events, 2)] == [first.tx_id, other.tx_id]
        assert await nothing_more(events)


async def test_mvcc_conflict_across_blocks_and_phantom_reads(ledger: DevLedger) -> None:
    await anchor(ledger, "doc", 1, sha("v1"))
    stale = await ledger.simulate(CC, "AnchorDocument", anchor_args("doc", 2, sha("x")))
    history = await ledger.simulate(CC, "History", [b"doc"])
    assert history.rwset.range_reads
    await anchor(ledger, "doc", 2, sha("v2"))
    block = await ledger.commit([stale, history])
    codes = [tx.validation_code for tx in block.transactions]
    assert codes == ["MVCC_READ_CONFLICT", "PHANTOM_READ_CONFLICT"]


async def test_duplicate_tx_ids_are_invalid(ledger: DevLedger) -> None:
    endorsement = await ledger.simulate(CC, "AnchorDocument", anchor_args("doc", 1, sha("v1")))
    block = await ledger.commit([endorsement, endorsement])
    assert [tx.validation_code for tx in block.transactions] == ["VALID", "DUPLICATE_TXID"]
    later = await ledger.commit([endorsement])
    assert later.transactions[0].validation_code == "DUPLICATE_TXID"
    # the status stays the first (valid) commit's
    status = await ledger.status(endorsement.tx_id)
    assert (status.state, status.block_number) == ("valid", block.number)


async def test_submit_is_pending_until_the_block_is_cut(ledger: DevLedger) -> None:
    endorsements = [
        await ledger.simulate(CC, "AnchorDocument", anchor_args(f"d{i}", 1, sha(str(i))))
        for i in range(3)
    ]
    for endorsement in endorsements:
        await ledger.submit(endorsement)
    assert (await ledger.status(endorsements[0].tx_id)).state == "pending"
    async with asyncio.timeout(10):
        statuses = [await ledger.wait_for(e.tx_id) for e in endorsements]
    assert {s.state for s in statuses} == {"valid"}
    assert len({s.block_number for s in statuses}) == 1  # one block for the batch


@pytest.mark.parametrize(
    ("column", "value", "block", "fragment"),
    [
        ("data", b'{"transactions":[]}', 2, "its data hashes to"),
        ("hash", "f" * 64, 1, "stored hash " + "f" * 64 + " does not match"),
        ("previous_hash", "0" * 64, 2, "previous_hash " + "0" * 64 + " does not match the hash"),
        ("committed_at", "2020-01-01T00:00:00.000000Z", 3, "stored hash"),
    ],
)
async def test_a_tampered_block_fails_the_chain_check(
    ledger: DevLedger,
    engine: AsyncEngine,
    open_ledger: OpenLedger,
    column: str,
    value: object,
    block: int,
    fragment: str,
) -> None:
    for version in (1, 2, 3):
        await anchor(ledger, "doc", version, sha(f"v{version}"))
    assert await ledger.verify_chain() == 4
    async with engine.begin() as conn:
        await conn.execute(
            text(f"UPDATE devledger_blocks SET {column} = :value WHERE number = :number"),  # noqa: S608
            {"value": value, "number": block},
        )
    with pytest.raises(LedgerCorruptedError) as info:
        await open_ledger()
    assert info.value.block_number == block
    assert str(info.value).startswith(f"ledger corrupted at block {block}: ")
    assert fragment in str(info.value)


async def test_reopening_keeps_the_ledger(ledger: DevLedger, open_ledger: OpenLedger) -> None:
    tx = await anchor(ledger, "doc", 1, sha("v1"))
    reopened = await open_ledger()
    assert reopened.height == ledger.height == 2
    assert (await reopened.status(tx)).state == "valid"


async def _multi_block_history(ledger: DevLedger) -> None:
    """Blocks with several events, an invalid tx, a block without events, audits."""
    await anchor(ledger, "a", 1, sha("a1"))
    batch = [
        await ledger.simulate(CC, "AnchorDocument", anchor_args("b", v, sha(f"b{v}")))
        for v in (1, 2, 3)
    ]
    clash = await ledger.simulate(CC, "AnchorDocument", anchor_args("b", 1, sha("clash")))
    await ledger.commit([batch[0], clash, batch[1], batch[2]])
    noop = await ledger.simulate(CC, "AnchorDocument", anchor_args("a", 1, sha("a1")))
    await ledger.commit([noop])  # a block without events
    audit = await ledger.simulate(CC, "AnchorAudit", audit_args("req-1"))
    another = await ledger.simulate(CC, "AnchorDocument", anchor_args("c", 1, sha("c1")))
    await ledger.commit([audit, another])


async def test_events_resume_exactly_from_every_checkpoint(ledger: DevLedger) -> None:
    await _multi_block_history(ledger)
    async with aclosing(ledger.events(start_block=0)) as events:
        full = await take(events, 6)
        assert await nothing_more(events)
    assert [(e.block_number, e.name) for e in full] == [
        (1, EVENT_DOCUMENT_ANCHORED),
        (2, EVENT_DOCUMENT_ANCHORED),
        (2, EVENT_DOCUMENT_ANCHORED),
        (2, EVENT_DOCUMENT_ANCHORED),
        (4, EVENT_AUDIT_ANCHORED),
        (4, EVENT_DOCUMENT_ANCHORED),
    ]
    positions = [(e.block_number, e.tx_number) for e in full]
    assert positions == sorted(positions)
    assert all(e.chaincode == CC for e in full)

    async def after(**start: object) -> list[LedgerEvent]:
        async with aclosing(ledger.events(**start)) as events:  # type: ignore[arg-type]
            expected = len(rest(**start))
            got = await take(events, expected)
            assert await nothing_more(events), f"more events than expected from {start}"
            return got

    def rest(**start: object) -> list[LedgerEvent]:
        if "after" in start:
            point = start["after"]
            assert isinstance(point, Checkpoint)
            if not point.tx_id:
                return [e for e in full if e.block_number > point.block_number]
            index = next(i for i, e in enumerate(full) if e.tx_id == point.tx_id)
            return full[index + 1 :]
        return [e for e in full if e.block_number >= int(str(start["start_block"]))]

    for event in full:  # every event's checkpoint
        assert await after(after=event.checkpoint) == rest(after=event.checkpoint)
    for number in range(ledger.height):  # every block boundary, and every start block
        whole = Checkpoint(number, "")
        assert await after(after=whole) == rest(after=whole)
        assert await after(start_block=number) == rest(start_block=number)


async def test_event_filters_and_bad_starts(ledger: DevLedger) -> None:
    await _multi_block_history(ledger)
    async with aclosing(ledger.events(start_block=0, event_names=[EVENT_AUDIT_ANCHORED])) as ev:
        (audit,) = await take(ev, 1)
        assert audit.name == EVENT_AUDIT_ANCHORED
        assert json.loads(audit.payload)["request_id"] == "req-1"
        assert await nothing_more(ev)
    with pytest.raises(OutOfRange, match="start block 99 is beyond the ledger"):
        ledger.events(start_block=99)
    with pytest.raises(OutOfRange):
        ledger.events(after=Checkpoint(ledger.height, ""))
    async with aclosing(ledger.events(after=Checkpoint(1, "no-such-tx"))) as ev:
        with pytest.raises(InvalidCheckpoint, match="checkpoint tx no-such-tx is not in block 1"):
            await anext(ev)


async def test_live_tail_sees_blocks_committed_after_it_started(ledger: DevLedger) -> None:
    old = await anchor(ledger, "old", 1, sha("old"))
    async with (
        aclosing(ledger.events()) as from_next,
        aclosing(ledger.events(start_block=0)) as from_start,
    ):
        waiting = asyncio.create_task(take(from_next, 2))
        first = await take(from_start, 1)
        assert [e.tx_id for e in first] == [old]
        await asyncio.sleep(0.05)  # both tails are now waiting for a block
        new_a = await anchor(ledger, "new", 1, sha("n1"))
        new_b = await anchor(ledger, "new", 2, sha("n2"))
        tail = await asyncio.wait_for(waiting, 5)
        assert [e.tx_id for e in tail] == [new_a, new_b]
        assert [e.tx_id for e in await take(from_start, 2)] == [new_a, new_b]
        assert await nothing_more(from_next)


@pytest.mark.parametrize(
    ("statement", "fragment"),
    [
        (
            "UPDATE devledger_transactions SET validation_code = 'MVCC_READ_CONFLICT' "
            "WHERE block_number = 2",
            "the status index of tx",
        ),
        (
            "UPDATE devledger_transactions SET event_payload = :payload WHERE block_number = 2",
            "does not match the block",
        ),
        ("DELETE FROM devledger_transactions WHERE block_number = 2", "index has tx"),
    ],
)
async def test_a_tampered_status_index_fails_the_chain_check(
    ledger: DevLedger, engine: AsyncEngine, open_ledger: OpenLedger, statement: str, fragment: str
) -> None:
    for version in (1, 2, 3):
        await anchor(ledger, "doc", version, sha(f"v{version}"))
    async with engine.begin() as conn:
        await conn.execute(text(statement), {"payload": b"{}"} if ":payload" in statement else {})
    with pytest.raises(LedgerCorruptedError) as info:
        await open_ledger()
    assert info.value.block_number == 2
    assert fragment in str(info.value)


async def test_batch_and_find_by_sha256_through_the_ledger(ledger: DevLedger) -> None:
    same = sha("same")
    item = {"source_url": "https://x", "ingested_at": "2026-11-30T00:00:00Z"}
    batch = [
        {"document_id": "b", "version": 1, "sha256": same, **item},
        {"document_id": "a", "version": 7, "sha256": same, **item},
        {"document_id": "a", "version": 8, "sha256": sha("other"), **item},
    ]
    endorsement = await ledger.simulate(CC, "AnchorDocuments", [json.dumps(batch).encode()])
    assert endorsement.event is not None
    assert endorsement.event.name == "DocumentsAnchored"
    block = await ledger.commit([endorsement])
    assert block.transactions[0].valid
    found = json.loads(await ledger.evaluate(CC, "FindBySha256", [same.encode()]))["records"]
    assert sorted((r["document_id"], r["version"]) for r in found) == [("a", 7), ("b", 1)]
    assert {r["tx_id"] for r in found} == {endorsement.tx_id}
    history = json.loads(await ledger.evaluate(CC, "History", [b"a"]))["records"]
    assert [r["version"] for r in history] == [7, 8]


async def test_concurrent_submissions_commit_once_each(ledger: DevLedger) -> None:
    async def anchor_via_orderer(doc: str, digest: str) -> str:
        endorsement = await ledger.simulate(CC, "AnchorDocument", anchor_args(doc, 1, digest))
        await ledger.submit(endorsement)
        status = await ledger.wait_for(endorsement.tx_id)
        return str(status.validation_code)

    async with asyncio.timeout(20):
        distinct = await asyncio.gather(
            *(anchor_via_orderer(f"d{i}", sha(str(i))) for i in range(8))
        )
        racing = await asyncio.gather(*(anchor_via_orderer("same", sha(str(i))) for i in range(4)))
    assert distinct == ["VALID"] * 8
    # endorsed on the same state, ordered together: exactly one wins, the rest conflict
    assert sorted(racing) == ["MVCC_READ_CONFLICT"] * 3 + ["VALID"]
    assert await ledger.verify_chain() == ledger.height


async def test_unknown_chaincode_and_refusals_write_nothing(ledger: DevLedger) -> None:
    with pytest.raises(UnknownChaincode, match="no chaincode 'nope'"):
        await ledger.simulate("nope", "AnchorDocument", [])
    with pytest.raises(EndorsementRefused) as info:
        await ledger.simulate(CC, "AnchorDocument", anchor_args("doc", 0, sha("x")))
    assert info.value.status == 400
    assert ledger.height == 1
