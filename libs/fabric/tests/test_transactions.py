"""Evaluate, submit, commit status, endorsement errors, MVCC retries and timeouts, over
real gRPC against the test peer."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2
from fabric_protos.ledger.rwset import rwset_pb2
from fabric_protos.ledger.rwset.kvrwset import kv_rwset_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.peer import proposal_pb2, proposal_response_pb2, transaction_pb2

from ledgerlens.fabric import (
    CommitError,
    CommitStatusTimeout,
    EndorseError,
    EndorseTimeout,
    EvaluateError,
    Gateway,
    GatewayTimeout,
    RetryPolicy,
)
from ledgerlens.fabric.identity import verify_signature
from ledgerlens.fabric.testing import TestPeer


async def test_submit_returns_result_and_commit_status(gateway: Gateway, peer: TestPeer) -> None:
    contract = gateway.network("mychannel").contract("kv")
    result = await contract.submit("put", ["a", b"1"])
    assert result.result == b"1"
    assert result.status.successful
    assert result.status.validation_code_name == "VALID"
    assert result.block_number == 1
    assert result.attempts == 1
    assert len(result.tx_id) == 64

    # the status can be asked again later, from the tx id alone
    again = await gateway.network("mychannel").commit_for(result.tx_id).status()
    assert again == result.status

    committed = peer.ledger.find_transaction(result.tx_id)
    assert committed is not None
    assert committed[0] == 1


async def test_evaluate_reads_committed_state(gateway: Gateway) -> None:
    contract = gateway.network("mychannel").contract("kv")
    await contract.submit("put", ["a", b"1"])
    assert await contract.evaluate("get", ["a"]) == b"1"
    assert (await contract.evaluate("whoami")).startswith(b"Org1MSP:")


async def test_evaluate_does_not_write(gateway: Gateway, peer: TestPeer) -> None:
    contract = gateway.network("mychannel").contract("kv")
    assert await contract.evaluate("put", ["a", b"1"]) == b"1"
    assert peer.ledger.height() == 1  # nothing ordered
    with pytest.raises(EvaluateError, match="chaincode response 404, key a not found") as caught:
        await contract.evaluate("get", ["a"])
    (detail,) = caught.value.details
    assert detail.msp_id == "Org1MSP"


async def test_async_commit_step_by_step(gateway: Gateway) -> None:
    contract = gateway.network("mychannel").contract("kv")
    proposal = contract.new_proposal("put", ["b", b"2"])
    transaction = await proposal.endorse()
    assert transaction.tx_id == proposal.tx_id
    assert transaction.result == b"2"
    commit = await transaction.submit()
    status = await commit.status()
    assert status is not None
    assert status.successful
    assert status.tx_id == proposal.tx_id
    # a commit request travels as bytes and can be asked again
    assert await gateway.commit_from_bytes(commit.bytes()).status() == status


async def test_transient_data_is_not_in_the_transaction(gateway: Gateway) -> None:
    contract = gateway.network("mychannel").contract("kv")
    transaction = await contract.new_proposal(
        "put_secret", ["s"], transient={"value": b"top-secret"}
    ).endorse()
    assert b"top-secret" not in transaction.bytes()
    # the transaction carries the proposal payload with its transient map stripped
    payload = common_pb2.Payload.FromString(
        gateway_pb2.PreparedTransaction.FromString(transaction.bytes()).envelope.payload
    )
    action = transaction_pb2.Transaction.FromString(payload.data).actions[0]
    action_payload = transaction_pb2.ChaincodeActionPayload.FromString(action.payload)
    proposal_payload = proposal_pb2.ChaincodeProposalPayload.FromString(
        action_payload.chaincode_proposal_payload
    )
    assert dict(proposal_payload.TransientMap) == {}
    status = await (await transaction.submit()).status()
    assert status is not None
    assert status.successful
    digest = hashlib.sha256(b"top-secret").hexdigest().encode()
    assert await contract.evaluate("get", ["s"]) == digest


async def test_endorsement_refused_by_one_org_names_the_peer(
    gateway: Gateway, peer: TestPeer
) -> None:
    peer.refuse_endorsement("Org2MSP", "policy says no")
    contract = gateway.network("mychannel").contract("kv")
    with pytest.raises(EndorseError) as caught:
        await contract.submit("put", ["a", b"1"])
    error = caught.value
    assert error.code == grpc.StatusCode.ABORTED
    (detail,) = error.details
    org2 = peer.organization("Org2MSP")
    assert (detail.address, detail.msp_id, detail.message) == (
        org2.address,
        "Org2MSP",
        "policy says no",
    )
    text = str(error)
    assert org2.address in text
    assert "Org2MSP" in text
    assert "policy says no" in text
    assert error.tx_id is not None
    assert error.tx_id in text

    # choosing endorsers avoids the refusing org
    result = await contract.submit("put", ["a", b"1"], endorsing_organizations=["Org1MSP"])
    assert result.status.successful


async def test_chaincode_error_reaches_the_client_with_every_endorser(gateway: Gateway) -> None:
    with pytest.raises(EndorseError, match="unknown function nope") as caught:
        await gateway.network("mychannel").contract("kv").submit("nope")
    assert {d.msp_id for d in caught.value.details} == {"Org1MSP", "Org2MSP"}


async def test_real_mvcc_conflict_between_two_endorsed_transactions(gateway: Gateway) -> None:
    contract = gateway.network("mychannel").contract("kv")
    await contract.submit("increment", ["n"])
    first = await contract.new_proposal("increment", ["n"]).endorse()
    second = await contract.new_proposal("increment", ["n"]).endorse()
    one = await (await first.submit()).status()
    two = await (await second.submit()).status()
    assert one is not None
    assert two is not None
    assert one.successful
    assert two.validation_code_name == "MVCC_READ_CONFLICT"
    assert await contract.evaluate("get", ["n"]) == b"2"


async def test_phantom_read_conflict(gateway: Gateway) -> None:
    contract = gateway.network("mychannel").contract("kv")
    await contract.submit("put", ["k1", b"1"])
    listing = await contract.new_proposal("list", ["k", "l"]).endorse()
    assert listing.result == b"k1"
    await contract.submit("put", ["k2", b"2"])  # a new key inside the range
    status = await (await listing.submit()).status()
    assert status is not None
    assert status.validation_code_name == "PHANTOM_READ_CONFLICT"


async def test_concurrent_increments_all_land_thanks_to_retry(gateway: Gateway) -> None:
    contract = gateway.network("mychannel").contract("kv")
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.01, max_backoff=0.05)
    results = await asyncio.gather(
        *(contract.submit("increment", ["c"], retry=policy) for _ in range(4))
    )
    assert sorted(r.result for r in results) == [b"1", b"2", b"3", b"4"]


async def test_mvcc_conflict_then_retry_succeeds(gateway: Gateway, peer: TestPeer) -> None:
    peer.force_mvcc_conflicts(2)
    result = await gateway.network("mychannel").contract("kv").submit("increment", ["x"])
    assert result.attempts == 3
    assert result.status.successful
    assert result.result == b"1"


async def test_bounded_retry_gives_up_reporting_attempts(gateway: Gateway, peer: TestPeer) -> None:
    peer.force_mvcc_conflicts(10)
    with pytest.raises(CommitError) as caught:
        await gateway.network("mychannel").contract("kv").submit("increment", ["x"])
    error = caught.value
    assert error.attempts == 3
    assert error.validation_code == transaction_pb2.MVCC_READ_CONFLICT
    assert error.validation_code_name == "MVCC_READ_CONFLICT"
    assert "MVCC_READ_CONFLICT" in str(error)
    assert "3 attempt(s)" in str(error)


async def test_no_retry_policy_fails_at_once(gateway: Gateway, peer: TestPeer) -> None:
    peer.force_mvcc_conflicts(1)
    with pytest.raises(CommitError) as caught:
        await (
            gateway.network("mychannel")
            .contract("kv")
            .submit("increment", ["x"], retry=RetryPolicy.never())
        )
    assert caught.value.attempts == 1


async def test_commit_timeout_names_the_phase_and_status_can_be_polled_later(
    gateway: Gateway, peer: TestPeer
) -> None:
    peer.commit_delay = 0.5
    contract = gateway.network("mychannel").contract("kv")
    commit = await (await contract.new_proposal("put", ["slow", b"1"]).endorse()).submit()
    with pytest.raises(CommitStatusTimeout) as caught:
        await commit.status(deadline=0.1)
    assert isinstance(caught.value, GatewayTimeout)
    assert caught.value.phase == "commit"
    assert caught.value.tx_id == commit.tx_id
    assert "commit" in str(caught.value)
    assert await commit.status(wait=False) is None
    status = await gateway.network("mychannel").commit_for(commit.tx_id).status()
    assert status is not None
    assert status.successful


async def test_submit_times_out_in_the_commit_phase(gateway: Gateway, peer: TestPeer) -> None:
    peer.commit_delay = 0.5
    impatient = Gateway(
        gateway.channel,
        gateway.identity,
        gateway.signer,
        timeouts=type(gateway.timeouts)(commit_status=0.1),
    )
    with pytest.raises(GatewayTimeout) as caught:
        await impatient.network("mychannel").contract("kv").submit("put", ["slow", b"1"])
    assert caught.value.phase == "commit"


async def test_endorse_timeout_names_the_phase(gateway: Gateway, peer: TestPeer) -> None:
    peer.endorse_delay = 0.5
    proposal = gateway.network("mychannel").contract("kv").new_proposal("put", ["a", b"1"])
    with pytest.raises(EndorseTimeout) as caught:
        await proposal.endorse(deadline=0.1)
    assert caught.value.phase == "endorse"
    assert "endorse" in str(caught.value)


async def test_unknown_channel_is_refused(gateway: Gateway) -> None:
    with pytest.raises(EndorseError) as caught:
        await gateway.network("other").contract("kv").submit("put", ["a", b"1"])
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_unsigned_steps_are_refused_locally(gateway: Gateway) -> None:
    offline = Gateway(gateway.channel, gateway.identity, None)
    proposal = offline.network("mychannel").contract("kv").new_proposal("put", ["a", b"1"])
    assert proposal.signature == b""
    with pytest.raises(ValueError, match="not signed"):
        await proposal.endorse()


async def test_peer_restart_keeps_the_ledger_and_pending_transactions(
    gateway: Gateway, peer: TestPeer
) -> None:
    contract = gateway.network("mychannel").contract("kv")
    await contract.submit("put", ["kept", b"1"])
    peer.commit_delay = 0.3
    commit = await (await contract.new_proposal("put", ["pending", b"2"]).endorse()).submit()
    port = peer.port
    await peer.stop()  # during the commit delay: the transaction is queued, not cut
    peer.commit_delay = 0
    await peer.start()
    assert peer.port == port
    await asyncio.wait_for(gateway.channel.channel_ready(), 5)
    status = await commit.status()
    assert status is not None
    assert status.successful
    assert await contract.evaluate("get", ["kept"]) == b"1"
    assert await contract.evaluate("get", ["pending"]) == b"2"


async def test_prepared_transaction_carries_each_orgs_endorsement(
    gateway: Gateway, peer: TestPeer
) -> None:
    contract = gateway.network("mychannel").contract("kv")
    await contract.submit("put", ["a", b"1"])
    transaction = await contract.new_proposal("increment", ["a"]).endorse()
    envelope = gateway_pb2.PreparedTransaction.FromString(transaction.bytes()).envelope
    payload = common_pb2.Payload.FromString(envelope.payload)
    assert common_pb2.ChannelHeader.FromString(payload.header.channel_header).tx_id == (
        transaction.tx_id
    )
    action = transaction_pb2.Transaction.FromString(payload.data).actions[0]
    endorsed = transaction_pb2.ChaincodeActionPayload.FromString(action.payload).action
    signers = []
    for endorsement in endorsed.endorsements:
        endorser = identities_pb2.SerializedIdentity.FromString(endorsement.endorser)
        verify_signature(
            endorser.id_bytes,
            hashlib.sha256(endorsed.proposal_response_payload + endorsement.endorser).digest(),
            endorsement.signature,
        )
        signers.append(endorser.mspid)
    assert signers == ["Org1MSP", "Org2MSP"]

    response_payload = proposal_response_pb2.ProposalResponsePayload.FromString(
        endorsed.proposal_response_payload
    )
    chaincode_action = proposal_pb2.ChaincodeAction.FromString(response_payload.extension)
    assert chaincode_action.response.payload == b"2"
    (ns,) = rwset_pb2.TxReadWriteSet.FromString(chaincode_action.results).ns_rwset
    kv = kv_rwset_pb2.KVRWSet.FromString(ns.rwset)
    assert ns.namespace == "kv"
    assert [(r.key, r.version.block_num, r.version.tx_num) for r in kv.reads] == [("a", 1, 0)]
    assert [(w.key, w.value) for w in kv.writes] == [("a", b"2")]
