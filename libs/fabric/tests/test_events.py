"""Chaincode events: from a start block, after a checkpoint, and across a peer restart
with no event lost or repeated."""

from __future__ import annotations

import asyncio

import pytest

from ledgerlens.fabric import (
    ChaincodeEvent,
    ChaincodeEventsError,
    ChaincodeEventStream,
    Checkpoint,
    Gateway,
    ReconnectPolicy,
)
from ledgerlens.fabric.testing import TestPeer

FAST = ReconnectPolicy(max_attempts=50, initial_backoff=0.02, max_backoff=0.2)


async def take(stream: ChaincodeEventStream, count: int) -> list[ChaincodeEvent]:
    events = []
    async with asyncio.timeout(5):
        async for event in stream:
            events.append(event)
            if len(events) == count:
                break
    return events


async def put_all(gateway: Gateway, keys: list[str]) -> list[str]:
    contract = gateway.network("mychannel").contract("kv")
    return [(await contract.submit("put", [k, b"v"])).tx_id for k in keys]


async def test_events_from_a_start_block(gateway: Gateway) -> None:
    tx_ids = await put_all(gateway, ["a", "b", "c"])
    async with gateway.network("mychannel").chaincode_events("kv", start_block=0) as stream:
        events = await take(stream, 3)
    assert [e.tx_id for e in events] == tx_ids
    assert [e.block_number for e in events] == [1, 2, 3]
    assert [(e.name, e.payload, e.chaincode) for e in events] == [
        ("put", b"a", "kv"),
        ("put", b"b", "kv"),
        ("put", b"c", "kv"),
    ]


async def test_events_from_next_commit_by_default(gateway: Gateway) -> None:
    await put_all(gateway, ["old"])
    async with gateway.network("mychannel").chaincode_events("kv") as stream:
        reader = asyncio.create_task(take(stream, 1))
        await asyncio.sleep(0.1)  # the stream is open before the next commit
        (new_tx,) = await put_all(gateway, ["new"])
        (event,) = await reader
    assert event.tx_id == new_tx


async def test_resume_after_a_checkpoint(gateway: Gateway) -> None:
    tx_ids = await put_all(gateway, ["a", "b", "c"])
    network = gateway.network("mychannel")
    async with network.chaincode_events("kv", start_block=1) as stream:
        first_two = await take(stream, 2)
    checkpoint = first_two[-1].checkpoint
    assert checkpoint == Checkpoint(2, tx_ids[1])

    async with network.chaincode_events("kv", after=checkpoint) as stream:
        (third,) = await take(stream, 1)
    assert third.tx_id == tx_ids[2]


async def test_resume_mid_block_skips_what_was_seen(gateway: Gateway, peer: TestPeer) -> None:
    # two transactions ordered into one block (the orderer cuts after the delay)
    peer.commit_delay = 0.2
    contract = gateway.network("mychannel").contract("kv")
    results = await asyncio.gather(
        contract.submit("put", ["x", b"1"]), contract.submit("put", ["y", b"2"])
    )
    assert results[0].block_number == results[1].block_number
    block = results[0].block_number
    network = gateway.network("mychannel")
    async with network.chaincode_events("kv", start_block=block) as stream:
        first, second = await take(stream, 2)
    async with network.chaincode_events("kv", after=first.checkpoint) as stream:
        (resumed,) = await take(stream, 1)
    assert resumed.tx_id == second.tx_id


async def test_peer_restart_mid_stream_loses_and_repeats_nothing(
    gateway: Gateway, peer: TestPeer
) -> None:
    before = await put_all(gateway, ["a", "b"])
    stream = gateway.network("mychannel").chaincode_events("kv", start_block=1, reconnect=FAST)
    async with stream:
        seen = await take(stream, 2)
        assert [e.tx_id for e in seen] == before

        await peer.stop()
        reader = asyncio.create_task(take(stream, 3))
        await asyncio.sleep(0.3)  # the stream notices and starts reconnecting
        await peer.start()  # same port, same ledger
        # unary calls fail fast while the channel is in reconnect backoff (as in every
        # gRPC client); the event stream retries on its own, the test's submits wait
        await asyncio.wait_for(gateway.channel.channel_ready(), 5)
        after = await put_all(gateway, ["c", "d", "e"])
        resumed = await reader
    assert [e.tx_id for e in resumed] == after
    # the consumer stopped right after the last event it received
    assert stream.checkpoint == Checkpoint(5, after[-1])


async def test_stream_gives_up_after_bounded_reconnects(gateway: Gateway, peer: TestPeer) -> None:
    stream = gateway.network("mychannel").chaincode_events(
        "kv",
        start_block=1,
        reconnect=ReconnectPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02),
    )
    await peer.stop()
    with pytest.raises(ChaincodeEventsError, match="UNAVAILABLE"):
        await take(stream, 1)


async def test_start_block_and_checkpoint_are_exclusive(gateway: Gateway) -> None:
    with pytest.raises(ValueError, match="not both"):
        gateway.network("mychannel").chaincode_events("kv", start_block=1, after=Checkpoint(1))
