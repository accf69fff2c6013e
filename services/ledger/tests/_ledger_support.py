"""Test support of the ledger tests: an in-memory stub for the contract alone, and
helpers to build arguments and read events with a deadline."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ledgerlens.services.ledger.contract import AnchoringContract

T = TypeVar("T")

INGESTED_AT = "2026-11-30T01:02:03Z"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def anchor_args(
    doc: str,
    version: int,
    digest: str,
    url: str = "https://example.org/doc",
    ingested_at: str = INGESTED_AT,
) -> list[bytes]:
    return [part.encode() for part in (doc, str(version), digest, url, ingested_at)]


def audit_args(request_id: str = "req-1", **overrides: Any) -> list[bytes]:
    values: dict[str, Any] = {
        "request_id": request_id,
        "prompt_sha256": sha("prompt"),
        "answer_sha256": sha("answer"),
        "model": "extractive-v1",
        "tenant_id": "acme",
        "api_key_id": "key-1",
        "cited_chunk_ids": ["doc-1:1:0", "doc-1:1:3"],
        "completed_at": "2026-11-30T02:00:00.5+01:00",
    }
    values.update(overrides)
    values["cited_chunk_ids"] = json.dumps(values["cited_chunk_ids"])
    return [str(values[name]).encode() for name in values]


@dataclass
class MemoryStub:
    """A ChaincodeStub over a dict: reads see committed state only, as on a peer."""

    state: Mapping[str, bytes]
    tx_id: str
    timestamp: int
    writes: dict[str, bytes] = field(default_factory=dict)
    event: tuple[str, bytes] | None = None
    reads: list[str] = field(default_factory=list)

    def get_tx_id(self) -> str:
        return self.tx_id

    def get_tx_timestamp(self) -> int:
        return self.timestamp

    def get_creator_msp_id(self) -> str:
        return "TestMSP"

    def get_state(self, key: str) -> bytes | None:
        self.reads.append(key)
        return self.state.get(key)

    def put_state(self, key: str, value: bytes) -> None:
        self.writes[key] = value

    def get_state_by_range(self, start_key: str, end_key: str) -> Iterable[tuple[str, bytes]]:
        keys = sorted(self.state, key=lambda k: k.encode())
        return [
            (k, self.state[k])
            for k in keys
            if k.encode() >= start_key.encode() and (not end_key or k.encode() < end_key.encode())
        ]

    def set_event(self, name: str, payload: bytes) -> None:
        self.event = (name, payload)


@dataclass
class MemoryLedger:
    """Runs the contract one transaction at a time and applies its writes on success."""

    contract: AnchoringContract = field(default_factory=AnchoringContract)
    state: dict[str, bytes] = field(default_factory=dict)
    clock: int = 1_790_000_000
    tx_count: int = 0
    last: MemoryStub | None = None

    def invoke(self, function: str, *args: bytes | str) -> Any:
        self.tx_count += 1
        self.clock += 10
        stub = MemoryStub(dict(self.state), f"tx{self.tx_count:04d}", self.clock)
        self.last = stub
        raw = [a.encode() if isinstance(a, str) else a for a in args]
        result = self.contract.invoke(stub, function, raw, {})
        self.state.update(stub.writes)
        return json.loads(result)


async def take(events: AsyncIterator[T], count: int, within: float = 10.0) -> list[T]:
    """The next ``count`` items, failing after ``within`` seconds."""
    items: list[T] = []
    async with asyncio.timeout(within):
        while len(items) < count:
            items.append(await anext(events))
    return items


async def nothing_more(events: AsyncIterator[Any], within: float = 0.05) -> bool:
    """True when the iterator yields nothing more within ``within`` seconds."""
    try:
        await asyncio.wait_for(anext(events), within)
    except TimeoutError:
        return True
    return False
