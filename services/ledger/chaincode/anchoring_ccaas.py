"""The anchoring contract as a Fabric chaincode-as-a-service (fabric-chaincode-python).

The contract's logic lives once, in ``ledgerlens.services.ledger.contract`` (copied into
the image at build time with the stub protocol it is written against,
``ledgerlens.fabric.chaincode``). This module only adapts it to the shim:

- the shim's stub is asynchronous (each ``get_state`` is a message to the peer), the
  contract is synchronous and pure. The contract runs in a worker thread and each of
  its stub calls is scheduled on the shim's event loop and waited for
  (:class:`ShimStubBridge`), so the loop keeps serving the peer's replies;
- a :class:`~ledgerlens.fabric.chaincode.ChaincodeError` becomes an error response
  (status >= 400, so the endorser refuses the proposal) with the contract's message;
- the event is set once, after the function returned, so a function that sets it twice
  emits only the last one (Fabric allows one event per transaction).

Environment (Fabric's ccaas conventions): ``CHAINCODE_ID`` (the package id from
``peer lifecycle chaincode calculatepackageid``), ``CHAINCODE_SERVER_ADDRESS``
(default ``0.0.0.0:9999``), ``CHAINCODE_TLS_DISABLED`` (default ``true``), else
``CHAINCODE_TLS_KEY``, ``CHAINCODE_TLS_CERT`` and optionally
``CHAINCODE_CLIENT_CA_CERT`` (file paths; the CA makes the peer's client certificate
mandatory), ``CHAINCODE_LOG_LEVEL`` (default ``INFO``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fabric_chaincode_python.fabric_shim import server
from fabric_chaincode_python.fabric_shim.interfaces import Chaincode as ShimChaincode
from fabric_chaincode_python.fabric_shim.response import ResponseCode, success
from fabric_protos.peer import proposal_response_pb2

from ledgerlens.fabric.chaincode import Chaincode, ChaincodeError
from ledgerlens.services.ledger.contract import AnchoringContract

__all__ = ["AnchoringChaincode", "ShimStubBridge", "main"]

log = logging.getLogger("anchoring")
T = TypeVar("T")


class ShimStubBridge:
    """A ``ledgerlens.fabric.chaincode.ChaincodeStub`` over the shim's async stub, for a
    contract running in a worker thread while ``loop`` runs the shim."""

    def __init__(self, stub: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._stub = stub
        self._loop = loop
        self.event: tuple[str, bytes] | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get_tx_id(self) -> str:
        return str(self._stub.get_txid())

    def get_tx_timestamp(self) -> int:
        timestamp = self._stub.get_tx_timestamp()
        if timestamp is None:
            raise ChaincodeError("the proposal carries no timestamp", 400)
        return int(timestamp.seconds)

    def get_creator_msp_id(self) -> str:
        return str((self._stub.get_creator() or {}).get("mspid", ""))

    def get_state(self, key: str) -> bytes | None:
        value = self._call(self._stub.get_state(key))
        # the peer answers an absent key with an empty payload (Fabric never stores one)
        return bytes(value) if value else None

    def put_state(self, key: str, value: bytes) -> None:
        self._call(self._stub.put_state(key, bytes(value)))

    def get_state_by_range(self, start_key: str, end_key: str) -> list[tuple[str, bytes]]:
        return self._call(self._range(start_key, end_key))

    async def _range(self, start_key: str, end_key: str) -> list[tuple[str, bytes]]:
        iterator = await self._stub.get_state_by_range(start_key, end_key)
        try:
            return [(kv.key, bytes(kv.value)) async for kv in iterator]
        finally:
            await iterator.aclose()

    def set_event(self, name: str, payload: bytes) -> None:
        self.event = (name, bytes(payload))


def _transient(stub: Any) -> Mapping[str, bytes]:
    """The proposal's transient map (the shim decodes it but offers no accessor)."""
    decoded = getattr(stub, "signed_proposal_pb", None)
    if isinstance(decoded, dict):
        payload = decoded.get("proposal", {}).get("payload")
        if payload is not None:
            return dict(payload.TransientMap)
    return {}


def _error(status: int, message: str) -> proposal_response_pb2.Response:
    return proposal_response_pb2.Response(
        status=max(status, ResponseCode.ERRORTHRESHOLD), message=message
    )


class AnchoringChaincode(ShimChaincode):
    """The shim's chaincode: dispatches every invocation to a ledgerlens ``Chaincode``."""

    def __init__(self, contract: Chaincode | None = None) -> None:
        self._contract: Chaincode = contract or AnchoringContract()

    async def init(self, stub: Any) -> proposal_response_pb2.Response:  # type: ignore[override]
        return success(b"")

    async def invoke(self, stub: Any) -> proposal_response_pb2.Response:  # type: ignore[override]
        raw: Sequence[bytes] = list(stub.cc_input.args)
        if not raw:
            return _error(400, "the proposal names no function")
        try:
            function = raw[0].decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "the function name is not UTF-8")
        bridge = ShimStubBridge(stub, asyncio.get_running_loop())
        try:
            payload = await asyncio.to_thread(
                self._contract.invoke,
                bridge,
                function,
                [bytes(a) for a in raw[1:]],
                _transient(stub),
            )
        except ChaincodeError as exc:
            log.info("%s %s refused: %s", stub.get_txid(), function, exc.message)
            return _error(exc.status, exc.message)
        if bridge.event is not None:
            stub.set_event(*bridge.event)
        return success(payload)


def _read(variable: str) -> bytes | None:
    path = os.environ.get(variable)
    return Path(path).read_bytes() if path else None


def main() -> None:
    logging.basicConfig(level=os.environ.get("CHAINCODE_LOG_LEVEL", "INFO"))
    tls = os.environ.get("CHAINCODE_TLS_DISABLED", "true").strip().lower() not in ("true", "1")
    server.start(
        AnchoringChaincode(),
        cc_id=os.environ.get("CHAINCODE_ID"),
        address=os.environ.get("CHAINCODE_SERVER_ADDRESS", "0.0.0.0:9999"),
        key=_read("CHAINCODE_TLS_KEY") if tls else None,
        cert=_read("CHAINCODE_TLS_CERT") if tls else None,
        client_ca_certs=_read("CHAINCODE_CLIENT_CA_CERT") if tls else None,
    )


if __name__ == "__main__":
    main()
