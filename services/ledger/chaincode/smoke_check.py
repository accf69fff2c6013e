"""A build-time smoke check of the adapter on the real shim stub (run in the image's venv).

The shim's own ``ChaincodeStub`` is driven with a signed proposal like a peer's, and
its peer connection is replaced by an in-memory state that answers GetState, PutState
and GetStateByRange the way a peer does. This checks the seam the repository's tests
cannot reach (they never import the shim): arguments, timestamps, the MSP id, range
iterators, events and error responses. ``python smoke_check.py`` exits non-zero on a
failure; the Dockerfile runs it before the final stage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from anchoring_ccaas import AnchoringChaincode
from fabric_chaincode_python.fabric_shim.stub import ChaincodeStub
from fabric_protos.common import common_pb2
from fabric_protos.ledger.queryresult import kv_query_result_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.peer import chaincode_pb2, chaincode_shim_pb2, proposal_pb2
from google.protobuf import timestamp_pb2


class _Message:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class MemoryPeer:
    """What the shim's handler asks the peer, answered from a dict (writes buffered)."""

    def __init__(self) -> None:
        self.state: dict[str, bytes] = {}
        self.writes: dict[str, bytes] = {}

    async def handle_get_state(self, collection: str, key: str, *_: Any) -> bytes:
        return self.state.get(key, b"")

    async def handle_put_state(self, collection: str, key: str, value: bytes, *_: Any) -> bytes:
        self.writes[key] = value
        return b""

    async def handle_get_state_by_range(
        self, collection: str, start: str, end: str, *_: Any
    ) -> _Message:
        response = chaincode_shim_pb2.QueryResponse(has_more=False, id="q1")
        for key in sorted(self.state, key=str.encode):
            if key.encode() >= start.encode() and (not end or key.encode() < end.encode()):
                kv = kv_query_result_pb2.KV(key=key, value=self.state[key])
                response.results.add(resultBytes=kv.SerializeToString())
        return _Message(response.SerializeToString())

    async def handle_query_state_close(self, *_: Any) -> None:
        return None

    def commit(self) -> None:
        self.state.update(self.writes)
        self.writes.clear()


def _stub(peer: MemoryPeer, tx_id: str, *args: str) -> ChaincodeStub:
    cc_input = chaincode_pb2.ChaincodeInput(args=[a.encode() for a in args])
    creator = identities_pb2.SerializedIdentity(mspid="Org1MSP", id_bytes=b"cert")
    header = common_pb2.Header(
        channel_header=common_pb2.ChannelHeader(
            tx_id=tx_id, timestamp=timestamp_pb2.Timestamp(seconds=1_790_000_000)
        ).SerializeToString(),
        signature_header=common_pb2.SignatureHeader(
            creator=creator.SerializeToString(), nonce=b"n"
        ).SerializeToString(),
    )
    payload = proposal_pb2.ChaincodeProposalPayload(input=cc_input.SerializeToString())
    proposal = proposal_pb2.Proposal(
        header=header.SerializeToString(), payload=payload.SerializeToString()
    )
    signed = proposal_pb2.SignedProposal(proposal_bytes=proposal.SerializeToString())
    return ChaincodeStub(peer, "ledgerlens", tx_id, cc_input, signed)


async def _check() -> None:
    chaincode = AnchoringChaincode()
    peer = MemoryPeer()
    digest = hashlib.sha256(b"v1").hexdigest()
    args = ("AnchorDocument", "doc-1", "1", digest, "https://x", "2026-11-30T01:02:03Z")

    stub = _stub(peer, "tx1", *args)
    response = await chaincode.invoke(stub)
    assert response.status == 200, response.message
    record = json.loads(response.payload)["record"]
    assert record["tx_id"] == "tx1"
    assert record["anchored_at"] == "2026-09-21T14:13:20Z"
    (event,) = stub.get_events()
    assert event.event_name == "DocumentAnchored"
    peer.commit()

    stub = _stub(peer, "tx2", "History", "doc-1")
    response = await chaincode.invoke(stub)
    assert response.status == 200, response.message
    assert [r["sha256"] for r in json.loads(response.payload)["records"]] == [digest]

    stub = _stub(peer, "tx3", *args[:3], hashlib.sha256(b"v2").hexdigest(), *args[4:])
    response = await chaincode.invoke(stub)
    assert response.status == 409, response
    assert digest in response.message
    assert not stub.get_events()

    response = await chaincode.invoke(_stub(peer, "tx4", "Nope"))
    assert response.status == 400, response


if __name__ == "__main__":
    asyncio.run(_check())
    print("anchoring chaincode smoke check: ok")
