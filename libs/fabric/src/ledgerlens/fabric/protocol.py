"""The Fabric messages, built and read exactly as the official Gateway clients do.

Pure functions over the official protos (no gRPC, no keys): the client uses the
builders, the test peer the readers, so both sides agree by construction and a test
can decode what the client sends.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2
from fabric_protos.orderer import ab_pb2
from fabric_protos.peer import chaincode_pb2, proposal_pb2, proposal_response_pb2, transaction_pb2
from google.protobuf import timestamp_pb2

__all__ = [
    "NONCE_LENGTH",
    "ProposalContents",
    "build_proposal",
    "chaincode_events_request",
    "commit_status_request",
    "read_proposal",
    "transaction_id",
    "transaction_result",
]

#: The official clients draw 24 random bytes per transaction.
NONCE_LENGTH = 24


def transaction_id(nonce: bytes, creator: bytes) -> str:
    """hex(SHA-256(nonce || creator)): what peers recompute to reject forged tx ids."""
    return hashlib.sha256(nonce + creator).hexdigest()


def build_proposal(
    *,
    channel: str,
    chaincode: str,
    function: str,
    args: Sequence[bytes | str],
    creator: bytes,
    transient: Mapping[str, bytes] | None = None,
    nonce: bytes | None = None,
    timestamp: float | None = None,
) -> tuple[str, bytes]:
    """An unsigned ``peer.Proposal``: returns ``(tx_id, proposal bytes)``.

    ``nonce`` and ``timestamp`` exist so a proposal can be rebuilt identically (tests,
    reproducible offline signing); normally leave them to their random/now defaults.
    """
    nonce = os.urandom(NONCE_LENGTH) if nonce is None else nonce
    tx_id = transaction_id(nonce, creator)
    now = time.time() if timestamp is None else timestamp
    ts = timestamp_pb2.Timestamp(seconds=int(now), nanos=int((now % 1) * 1e9))
    chaincode_id = chaincode_pb2.ChaincodeID(name=chaincode)
    channel_header = common_pb2.ChannelHeader(
        type=common_pb2.ENDORSER_TRANSACTION,
        channel_id=channel,
        tx_id=tx_id,
        timestamp=ts,
        epoch=0,
        extension=proposal_pb2.ChaincodeHeaderExtension(
            chaincode_id=chaincode_id
        ).SerializeToString(),
    )
    signature_header = common_pb2.SignatureHeader(creator=creator, nonce=nonce)
    header = common_pb2.Header(
        channel_header=channel_header.SerializeToString(),
        signature_header=signature_header.SerializeToString(),
    )
    spec = chaincode_pb2.ChaincodeInvocationSpec(
        chaincode_spec=chaincode_pb2.ChaincodeSpec(
            type=chaincode_pb2.ChaincodeSpec.Type.UNDEFINED,
            chaincode_id=chaincode_id,
            input=chaincode_pb2.ChaincodeInput(
                args=[function.encode(), *(_as_bytes(a) for a in args)]
            ),
        )
    )
    payload = proposal_pb2.ChaincodeProposalPayload(
        input=spec.SerializeToString(), TransientMap=dict(transient or {})
    )
    proposal = proposal_pb2.Proposal(
        header=header.SerializeToString(), payload=payload.SerializeToString()
    )
    return tx_id, proposal.SerializeToString()


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


@dataclass(frozen=True)
class ProposalContents:
    """A decoded proposal: what the peer needs to check and run it."""

    tx_id: str
    channel: str
    chaincode: str
    function: str
    args: tuple[bytes, ...]
    transient: Mapping[str, bytes]
    creator: bytes
    nonce: bytes
    timestamp: int
    header: Any  # common_pb2.Header
    channel_header: Any  # common_pb2.ChannelHeader
    payload: Any  # proposal_pb2.ChaincodeProposalPayload


def read_proposal(proposal_bytes: bytes) -> ProposalContents:
    """Decodes ``peer.Proposal`` bytes down to the chaincode invocation."""
    proposal = proposal_pb2.Proposal.FromString(proposal_bytes)
    header = common_pb2.Header.FromString(proposal.header)
    channel_header = common_pb2.ChannelHeader.FromString(header.channel_header)
    signature_header = common_pb2.SignatureHeader.FromString(header.signature_header)
    extension = proposal_pb2.ChaincodeHeaderExtension.FromString(channel_header.extension)
    payload = proposal_pb2.ChaincodeProposalPayload.FromString(proposal.payload)
    spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(payload.input).chaincode_spec
    args = [bytes(a) for a in spec.input.args]
    if not args:
        raise ValueError("the proposal names no chaincode function")
    return ProposalContents(
        tx_id=channel_header.tx_id,
        channel=channel_header.channel_id,
        chaincode=extension.chaincode_id.name or spec.chaincode_id.name,
        function=args[0].decode(),
        args=tuple(args[1:]),
        transient={k: bytes(v) for k, v in payload.TransientMap.items()},
        creator=bytes(signature_header.creator),
        nonce=bytes(signature_header.nonce),
        timestamp=channel_header.timestamp.seconds,
        header=header,
        channel_header=channel_header,
        payload=payload,
    )


def transaction_result(envelope: Any) -> bytes:
    """The chaincode's return value inside a prepared transaction (``common.Envelope``):
    payload → Transaction → first action → endorsed action → ChaincodeAction.response."""
    payload = common_pb2.Payload.FromString(envelope.payload)
    transaction = transaction_pb2.Transaction.FromString(payload.data)
    for action in transaction.actions:
        action_payload = transaction_pb2.ChaincodeActionPayload.FromString(action.payload)
        response_payload = proposal_response_pb2.ProposalResponsePayload.FromString(
            action_payload.action.proposal_response_payload
        )
        chaincode_action = proposal_pb2.ChaincodeAction.FromString(response_payload.extension)
        return bytes(chaincode_action.response.payload)
    return b""


def commit_status_request(channel: str, tx_id: str, creator: bytes) -> bytes:
    """Unsigned ``gateway.CommitStatusRequest`` bytes (the signed part of the request)."""
    message = gateway_pb2.CommitStatusRequest(
        transaction_id=tx_id, channel_id=channel, identity=creator
    )
    return bytes(message.SerializeToString())


def chaincode_events_request(
    channel: str,
    chaincode: str,
    creator: bytes,
    *,
    start_block: int | None,
    after_tx_id: str = "",
) -> bytes:
    """Unsigned ``gateway.ChaincodeEventsRequest`` bytes. No start block means "from the
    next block committed", as in the official clients."""
    if start_block is None:
        position = ab_pb2.SeekPosition(next_commit=ab_pb2.SeekNextCommit())
    else:
        position = ab_pb2.SeekPosition(specified=ab_pb2.SeekSpecified(number=start_block))
    message = gateway_pb2.ChaincodeEventsRequest(
        channel_id=channel,
        chaincode_id=chaincode,
        identity=creator,
        start_position=position,
        after_transaction_id=after_tx_id,
    )
    return bytes(message.SerializeToString())
