"""Offline signing: a gateway without a key hands out digests, the key holder signs
them, and the result is the very transaction online signing produces."""

from __future__ import annotations

from ledgerlens.fabric import Gateway
from ledgerlens.fabric.identity import ECDSASigner, Identity


async def test_offline_signing_matches_online_signing(
    gateway: Gateway, client_identity: tuple[Identity, ECDSASigner, bytes]
) -> None:
    identity, key_holder, _ = client_identity
    offline = Gateway(gateway.channel, identity, signer=None)
    online_contract = gateway.network("mychannel").contract("kv")

    online_proposal = online_contract.new_proposal("put", ["k", b"v"])
    # the unsigned proposal travels as bytes to whoever holds the key...
    unsigned = offline.proposal_from_bytes(online_proposal.bytes()).with_signature(b"")
    assert unsigned.signature == b""
    # ...which signs its digest; deterministic ECDSA makes the bytes identical
    offline_proposal = unsigned.with_signature(key_holder.sign(unsigned.digest()))
    assert offline_proposal.tx_id == online_proposal.tx_id
    assert offline_proposal.bytes() == online_proposal.bytes()

    online_tx = await online_proposal.endorse()
    unsigned_tx = await offline_proposal.endorse()
    assert unsigned_tx.signature == b""
    offline_tx = unsigned_tx.with_signature(key_holder.sign(unsigned_tx.digest()))
    assert offline_tx.tx_id == online_tx.tx_id
    assert offline_tx.bytes() == online_tx.bytes()
    assert offline_tx.result == b"v"

    # the offline gateway's commit request, built before submit, is unsigned too
    unsigned_commit = offline_tx.commit()
    assert unsigned_commit.signature == b""
    offline_commit = unsigned_commit.with_signature(key_holder.sign(unsigned_commit.digest()))
    assert offline_commit.bytes() == online_tx.commit().bytes()

    submitted = await offline.transaction_from_bytes(offline_tx.bytes(), "mychannel").submit()
    assert submitted.tx_id == online_tx.tx_id
    status = await offline_commit.status()
    assert status is not None
    assert status.successful
    assert await online_contract.evaluate("get", ["k"]) == b"v"
