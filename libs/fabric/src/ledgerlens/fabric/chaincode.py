"""What a chaincode sees of the ledger, and what a peer sees of a chaincode.

These two protocols are the seam between a contract's logic and whatever runs it:
the dev ledger, the protocol-level test peer (:mod:`ledgerlens.fabric.testing`) and a
real Fabric peer (through the chaincode shim's stub, whose method names these mirror:
``get_state``, ``put_state``, ``set_event``, ``get_tx_id``, ``get_tx_timestamp``). A
contract written against :class:`ChaincodeStub` runs unchanged on all three.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

__all__ = ["Chaincode", "ChaincodeError", "ChaincodeStub"]


class ChaincodeError(Exception):
    """A transaction function refused: the peer answers with this status and message
    (Fabric's chaincode error response, 500 unless the contract says otherwise)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ChaincodeStub(Protocol):
    """The ledger as one transaction simulation sees it (reads and writes are recorded
    in its read/write set; writes are visible only after the commit)."""

    def get_tx_id(self) -> str: ...

    def get_tx_timestamp(self) -> int:
        """The proposal's timestamp, seconds since the epoch."""
        ...

    def get_creator_msp_id(self) -> str: ...

    def get_state(self, key: str) -> bytes | None:
        """The committed value of ``key`` (None when absent); records the read."""
        ...

    def put_state(self, key: str, value: bytes) -> None: ...

    def get_state_by_range(self, start_key: str, end_key: str) -> Iterable[tuple[str, bytes]]:
        """Committed keys in ``[start_key, end_key)`` in key order; records the range
        read (a key added in the range before the commit is a phantom read)."""
        ...

    def set_event(self, name: str, payload: bytes) -> None:
        """The transaction's chaincode event (one per transaction, as in Fabric; a
        second call replaces the first)."""
        ...


class Chaincode(Protocol):
    """A contract: one entry point, dispatching on the function name."""

    name: str

    def invoke(
        self,
        stub: ChaincodeStub,
        function: str,
        args: Sequence[bytes],
        transient: Mapping[str, bytes],
    ) -> bytes:
        """Runs ``function``; returns its payload or raises :class:`ChaincodeError`."""
        ...
