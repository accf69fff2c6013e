"""What the dev ledger records: read/write sets, endorsed transactions, blocks and
their hash chain, in one canonical serialisation.

Canonical form
--------------
Everything hashed is JSON serialised with sorted keys, no whitespace, ASCII only
(``\\uXXXX`` escapes for the rest, so NUL in composite keys is ``\\u0000``), integers
only (no floats), bytes as standard base64 with padding. :func:`canonical_json` is the
one function that does it, and the stored block data is exactly its output, so a
verifier re-hashes the stored bytes rather than re-serialising anything.

Block data (``data``)::

    {"transactions": [
      {"tx_id": str, "chaincode": str, "function": str, "args": [b64...],
       "creator_msp_id": str, "timestamp": int (seconds), "result": b64,
       "rwset": {"reads": [{"key": str, "version": [block, tx] | null}],
                 "range_reads": [{"start": str, "end": str,
                                  "results": [{"key": str, "version": [block, tx]}]}],
                 "writes": [{"key": str, "value": b64}]},
       "event": {"name": str, "payload": b64} | null,
       "validation_code": "VALID" | "MVCC_READ_CONFLICT" | ...}, ...]}

``data_hash = sha256(data)`` and the block hash is the sha256 of the canonical header
``{"committed_at": str, "data_hash": str, "number": int, "previous_hash": str}``
(all hashes lower-case hex; the genesis block 0 has no transactions and
``previous_hash`` of 64 zeros). Changing a byte of a block's data, its time, its hash
or its link to the previous block therefore breaks the chain at that block.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from fabric_protos.peer import transaction_pb2

__all__ = [
    "GENESIS_PREVIOUS_HASH",
    "BlockHeader",
    "ChaincodeEventData",
    "Endorsement",
    "KVRead",
    "KVWrite",
    "RangeRead",
    "ReadWriteSet",
    "Version",
    "block_data",
    "block_hash",
    "canonical_json",
    "sha256_hex",
    "validation_code_name",
]

#: (block number, tx number in the block) of the transaction that wrote a key.
Version = tuple[int, int]

GENESIS_PREVIOUS_HASH: Final = "0" * 64


def canonical_json(value: Any) -> bytes:
    """The one serialisation that is hashed (see the module docstring)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def validation_code_name(code: int) -> str:
    """Fabric's ``TxValidationCode`` name of ``code`` (e.g. 11 -> ``MVCC_READ_CONFLICT``)."""
    return str(transaction_pb2.TxValidationCode.Name(code))


@dataclass(frozen=True, slots=True)
class KVRead:
    """A key read during simulation and the version it had (None: it did not exist)."""

    key: str
    version: Version | None


@dataclass(frozen=True, slots=True)
class RangeRead:
    """A range read ``[start, end)`` (empty end: unbounded) and every key it returned."""

    start: str
    end: str
    results: tuple[tuple[str, Version], ...]


@dataclass(frozen=True, slots=True)
class KVWrite:
    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class ReadWriteSet:
    """One chaincode namespace's reads and writes (Fabric's ``KVRWSet``)."""

    namespace: str
    reads: tuple[KVRead, ...] = ()
    range_reads: tuple[RangeRead, ...] = ()
    writes: tuple[KVWrite, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "reads": [
                {"key": r.key, "version": list(r.version) if r.version else None}
                for r in self.reads
            ],
            "range_reads": [
                {
                    "start": r.start,
                    "end": r.end,
                    "results": [{"key": k, "version": list(v)} for k, v in r.results],
                }
                for r in self.range_reads
            ],
            "writes": [{"key": w.key, "value": _b64(w.value)} for w in self.writes],
        }

    @classmethod
    def from_json(cls, namespace: str, value: dict[str, Any]) -> ReadWriteSet:
        return cls(
            namespace=namespace,
            reads=tuple(
                KVRead(r["key"], (r["version"][0], r["version"][1]) if r["version"] else None)
                for r in value["reads"]
            ),
            range_reads=tuple(
                RangeRead(
                    r["start"],
                    r["end"],
                    tuple((x["key"], (x["version"][0], x["version"][1])) for x in r["results"]),
                )
                for r in value["range_reads"]
            ),
            writes=tuple(KVWrite(w["key"], _unb64(w["value"])) for w in value["writes"]),
        )


@dataclass(frozen=True, slots=True)
class ChaincodeEventData:
    name: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Endorsement:
    """A simulated transaction, ready to be ordered into a block (a proposal response).

    ``result`` is what the function returned; it is recorded in the block as Fabric
    records the proposal response payload. Transient data is never recorded.
    """

    tx_id: str
    chaincode: str
    function: str
    args: tuple[bytes, ...]
    creator_msp_id: str
    timestamp: int
    result: bytes
    rwset: ReadWriteSet
    event: ChaincodeEventData | None = None

    @property
    def is_read_only(self) -> bool:
        return not self.rwset.writes

    def to_json(self, validation_code: str) -> dict[str, Any]:
        """Its block entry: the transaction and the validation code it got."""
        return {**self._body(), "validation_code": validation_code}

    def to_bytes(self) -> bytes:
        """The transaction alone (no validation code yet), canonical JSON: how a
        submitted transaction waits in ``devledger_pending`` for the block cutter."""
        return canonical_json(self._body())

    @classmethod
    def from_bytes(cls, data: bytes) -> Endorsement:
        """The inverse of :meth:`to_bytes`."""
        return cls._from_body(json.loads(data))

    def _body(self) -> dict[str, Any]:
        return {
            "tx_id": self.tx_id,
            "chaincode": self.chaincode,
            "function": self.function,
            "args": [_b64(arg) for arg in self.args],
            "creator_msp_id": self.creator_msp_id,
            "timestamp": self.timestamp,
            "result": _b64(self.result),
            "rwset": self.rwset.to_json(),
            "event": (
                {"name": self.event.name, "payload": _b64(self.event.payload)}
                if self.event
                else None
            ),
        }

    @classmethod
    def from_block_entry(cls, value: dict[str, Any]) -> tuple[Endorsement, str]:
        """An endorsement from its block entry, with its validation code."""
        return cls._from_body(value), value["validation_code"]

    @classmethod
    def _from_body(cls, value: dict[str, Any]) -> Endorsement:
        event = value["event"]
        return cls(
            tx_id=value["tx_id"],
            chaincode=value["chaincode"],
            function=value["function"],
            args=tuple(_unb64(arg) for arg in value["args"]),
            creator_msp_id=value["creator_msp_id"],
            timestamp=value["timestamp"],
            result=_unb64(value["result"]),
            rwset=ReadWriteSet.from_json(value["chaincode"], value["rwset"]),
            event=ChaincodeEventData(event["name"], _unb64(event["payload"])) if event else None,
        )


def block_data(transactions: list[tuple[Endorsement, str]]) -> bytes:
    """The canonical data of a block of (transaction, validation code name)."""
    return canonical_json({"transactions": [tx.to_json(code) for tx, code in transactions]})


@dataclass(frozen=True, slots=True)
class BlockHeader:
    number: int
    previous_hash: str
    data_hash: str
    committed_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "previous_hash": self.previous_hash,
            "data_hash": self.data_hash,
            "committed_at": self.committed_at,
        }


def block_hash(header: BlockHeader) -> str:
    return sha256_hex(canonical_json(header.to_json()))


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds (the stored and hashed form of a commit time)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
