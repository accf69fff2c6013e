"""The test peer's storage: a versioned world state and a chain of blocks.

Kept behind :class:`Ledger` so another engine (a persistent store, the dev ledger)
can stand in for :class:`InMemoryLedger` without touching the Gateway protocol code in
:mod:`ledgerlens.fabric.testing`. Validation (MVCC) is the peer's job, not the
ledger's: the ledger stores what it is told and versions keys by (block, tx).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fabric_protos.peer import transaction_pb2

__all__ = ["Block", "CommittedTransaction", "InMemoryLedger", "Ledger", "Version", "Write"]


@dataclass(frozen=True, order=True)
class Version:
    """Fabric's key version: the block and the transaction index that last wrote it."""

    block: int
    tx: int


@dataclass(frozen=True)
class Write:
    namespace: str
    key: str
    value: bytes | None  # None deletes the key


@dataclass(frozen=True)
class CommittedTransaction:
    tx_id: str
    validation_code: int
    envelope: bytes
    event: Any | None = None  # peer.ChaincodeEvent of a valid transaction

    @property
    def valid(self) -> bool:
        return bool(self.validation_code == transaction_pb2.VALID)


@dataclass(frozen=True)
class Block:
    number: int
    transactions: tuple[CommittedTransaction, ...]


class Ledger(Protocol):
    """What the test peer needs from a ledger engine."""

    def height(self) -> int:
        """The number of blocks, i.e. the number the next block gets."""
        ...

    def get_state(self, namespace: str, key: str) -> tuple[bytes, Version] | None: ...

    def get_state_range(
        self, namespace: str, start_key: str, end_key: str
    ) -> list[tuple[str, bytes, Version]]:
        """Keys in ``[start_key, end_key)`` in order (empty end_key: to the end)."""
        ...

    def append_block(
        self, transactions: Sequence[tuple[CommittedTransaction, Sequence[Write]]]
    ) -> Block:
        """Appends a block; applies the writes of its valid transactions."""
        ...

    def block(self, number: int) -> Block | None: ...

    def find_transaction(self, tx_id: str) -> tuple[int, CommittedTransaction] | None:
        """(block number, transaction) of a committed tx id."""
        ...


class InMemoryLedger:
    """A :class:`Ledger` in dicts; block 0 is an empty genesis block, as on a channel
    whose first block is its configuration."""

    def __init__(self) -> None:
        self._blocks: list[Block] = [Block(0, ())]
        self._state: dict[str, dict[str, tuple[bytes, Version]]] = {}
        self._sorted_keys: dict[str, list[str]] = {}
        self._tx_index: dict[str, tuple[int, CommittedTransaction]] = {}

    def height(self) -> int:
        return len(self._blocks)

    def get_state(self, namespace: str, key: str) -> tuple[bytes, Version] | None:
        return self._state.get(namespace, {}).get(key)

    def get_state_range(
        self, namespace: str, start_key: str, end_key: str
    ) -> list[tuple[str, bytes, Version]]:
        keys = self._sorted_keys.get(namespace, [])
        state = self._state.get(namespace, {})
        lo = bisect.bisect_left(keys, start_key)
        hi = bisect.bisect_left(keys, end_key) if end_key else len(keys)
        return [(k, *state[k]) for k in keys[lo:hi]]

    def append_block(
        self, transactions: Sequence[tuple[CommittedTransaction, Sequence[Write]]]
    ) -> Block:
        number = len(self._blocks)
        for index, (tx, writes) in enumerate(transactions):
            self._tx_index.setdefault(tx.tx_id, (number, tx))
            if tx.valid:
                for write in writes:
                    self._apply(write, Version(number, index))
        block = Block(number, tuple(tx for tx, _ in transactions))
        self._blocks.append(block)
        return block

    def _apply(self, write: Write, version: Version) -> None:
        state = self._state.setdefault(write.namespace, {})
        keys = self._sorted_keys.setdefault(write.namespace, [])
        present = write.key in state
        if write.value is None:
            if present:
                del state[write.key]
                keys.pop(bisect.bisect_left(keys, write.key))
            return
        state[write.key] = (write.value, version)
        if not present:
            bisect.insort(keys, write.key)

    def block(self, number: int) -> Block | None:
        return self._blocks[number] if 0 <= number < len(self._blocks) else None

    def find_transaction(self, tx_id: str) -> tuple[int, CommittedTransaction] | None:
        return self._tx_index.get(tx_id)
