"""The bytes the client sends: proposal structure, tx id, signatures (decoded with the
official protos), and the peer's refusal of forged or high-S signatures."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.peer import chaincode_pb2, proposal_pb2

from ledgerlens.fabric import EndorseError, Gateway
from ledgerlens.fabric.identity import ECDSASigner, Identity, is_low_s, to_low_s, verify_signature
from ledgerlens.fabric.testing import new_test_identity

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def high_s_twin(signature: bytes) -> bytes:
    r, s = decode_dss_signature(signature)
    return encode_dss_signature(r, P256_ORDER - s)


def test_proposal_structure_and_tx_id(gateway: Gateway) -> None:
    contract = gateway.network("mychannel").contract("kv")
    before = int(time.time())
    proposal = contract.new_proposal(
        "put", ["k", b"v"], transient={"secret": b"s"}, endorsing_organizations=["Org1MSP"]
    )

    proposed = gateway_pb2.ProposedTransaction.FromString(proposal.bytes())
    assert proposed.transaction_id == proposal.tx_id
    assert list(proposed.endorsing_organizations) == ["Org1MSP"]
    signed = proposed.proposal
    message = proposal_pb2.Proposal.FromString(signed.proposal_bytes)
    header = common_pb2.Header.FromString(message.header)
    channel_header = common_pb2.ChannelHeader.FromString(header.channel_header)
    signature_header = common_pb2.SignatureHeader.FromString(header.signature_header)

    creator = identities_pb2.SerializedIdentity.FromString(signature_header.creator)
    assert creator.mspid == "Org1MSP"
    assert creator.id_bytes == gateway.identity.certificate_pem
    assert len(signature_header.nonce) == 24
    expected_tx_id = hashlib.sha256(signature_header.nonce + signature_header.creator).hexdigest()
    assert channel_header.tx_id == expected_tx_id == proposal.tx_id
    assert channel_header.type == common_pb2.ENDORSER_TRANSACTION
    assert channel_header.channel_id == "mychannel"
    assert before <= channel_header.timestamp.seconds <= int(time.time())
    extension = proposal_pb2.ChaincodeHeaderExtension.FromString(channel_header.extension)
    assert extension.chaincode_id.name == "kv"

    payload = proposal_pb2.ChaincodeProposalPayload.FromString(message.payload)
    assert dict(payload.TransientMap) == {"secret": b"s"}
    spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(payload.input).chaincode_spec
    assert spec.chaincode_id.name == "kv"
    assert list(spec.input.args) == [b"put", b"k", b"v"]

    # the signature is over SHA-256 of the proposal bytes, by the creator's key
    assert proposal.digest() == hashlib.sha256(signed.proposal_bytes).digest()
    verify_signature(creator.id_bytes, proposal.digest(), signed.signature)


def test_two_proposals_have_fresh_nonces(gateway: Gateway) -> None:
    contract = gateway.network("mychannel").contract("kv")
    assert contract.new_proposal("get", ["a"]).tx_id != contract.new_proposal("get", ["a"]).tx_id


def test_signatures_are_low_s_and_deterministic() -> None:
    _, signer, _ = new_test_identity("Org1MSP")
    curve = ec.SECP256R1()
    for i in range(64):
        digest = hashlib.sha256(str(i).encode()).digest()
        signature = signer.sign(digest)
        assert is_low_s(signature, curve)
        assert signer.sign(digest) == signature  # RFC 6979
        # the high-S twin is a valid ECDSA signature, which is why Fabric bans it
        twin = high_s_twin(signature)
        signer.public_key.verify(twin, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        assert not is_low_s(twin, curve)
        assert to_low_s(twin, curve) == signature


def test_verify_rejects_high_s(client_identity: tuple[Identity, ECDSASigner, bytes]) -> None:
    identity, signer, _ = client_identity
    digest = hashlib.sha256(b"m").digest()
    with pytest.raises(InvalidSignature, match="high-S"):
        verify_signature(identity.certificate_pem, digest, high_s_twin(signer.sign(digest)))


async def test_peer_rejects_high_s_signature(gateway: Gateway) -> None:
    proposal = gateway.network("mychannel").contract("kv").new_proposal("put", ["a", b"1"])
    forged = proposal.with_signature(high_s_twin(proposal.signature))
    with pytest.raises(EndorseError, match="high-S") as caught:
        await forged.endorse()
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.tx_id == proposal.tx_id


async def test_peer_rejects_signature_by_another_key(gateway: Gateway) -> None:
    _, stranger, _ = new_test_identity("Org1MSP", "stranger")
    proposal = gateway.network("mychannel").contract("kv").new_proposal("put", ["a", b"1"])
    with pytest.raises(EndorseError, match="signature verification failed") as caught:
        await proposal.with_signature(stranger.sign(proposal.digest())).endorse()
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_peer_rejects_forged_tx_id(gateway: Gateway) -> None:
    proposal = gateway.network("mychannel").contract("kv").new_proposal("put", ["a", b"1"])
    proposed = gateway_pb2.ProposedTransaction.FromString(proposal.bytes())
    message = proposal_pb2.Proposal.FromString(proposed.proposal.proposal_bytes)
    header = common_pb2.Header.FromString(message.header)
    channel_header = common_pb2.ChannelHeader.FromString(header.channel_header)
    channel_header.tx_id = "00" * 32
    header.channel_header = channel_header.SerializeToString()
    message.header = header.SerializeToString()
    proposed.proposal.proposal_bytes = message.SerializeToString()
    proposed.transaction_id = channel_header.tx_id
    tampered = gateway.proposal_from_bytes(proposed.SerializeToString())
    assert gateway.signer is not None
    with pytest.raises(EndorseError, match="invalid tx id") as caught:
        await tampered.with_signature(gateway.signer.sign(tampered.digest())).endorse()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_peer_rejects_creator_outside_the_channel(gateway: Gateway) -> None:
    identity, signer, _ = new_test_identity("EvilMSP")
    outsider = Gateway(gateway.channel, identity, signer)
    with pytest.raises(EndorseError, match="not a member") as caught:
        await outsider.network("mychannel").contract("kv").submit("put", ["a", b"1"])
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
