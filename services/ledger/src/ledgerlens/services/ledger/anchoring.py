"""Anchoring documents and audit records: the contract's functions over a backend, with
each record joined to where its transaction was committed.

The contract stores a record's ``tx_id`` and ``anchored_at`` (the proposal time) but
not its block — a transaction does not know its block while it is simulated. The block
and commit time come from the backend's commit status, looked up by ``tx_id`` and kept
in a bounded cache (a committed transaction's place never changes). Fabric's Gateway
reports no commit time, so on Fabric ``committed_at`` is the transaction's own
timestamp (``anchored_at``, on the ledger and the same for every reader).

Re-anchoring something already anchored submits nothing: the endorsement's result says
``already_anchored`` and the transaction is dropped before the orderer (``skip_when``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from ledgerlens.services.ledger.backend import LedgerBackend, Submitted
from ledgerlens.services.ledger.contract import AnchorRecord, AuditRecord
from ledgerlens.services.ledger.errors import TxNotFound

__all__ = [
    "Anchored",
    "Anchoring",
    "AuditAnchored",
    "BatchItem",
    "DocumentAnchor",
    "Location",
    "NewAudit",
    "parse_time",
]

_LOCATION_CACHE: Final = 10_000
_LOCATE_TIMEOUT: Final = 5.0


def parse_time(value: str) -> datetime:
    """The contract's RFC 3339 UTC form (``…Z``) as an aware datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Location:
    """Where a transaction was committed (the proto's ``LedgerAnchor``)."""

    tx_id: str
    block_number: int
    committed_at: datetime
    channel: str


@dataclass(frozen=True)
class DocumentAnchor:
    """A document version to anchor (validated by the caller; times RFC 3339)."""

    document_id: str
    version: int
    sha256: str
    source_url: str
    ingested_at: str

    def args(self) -> list[bytes]:
        return [
            part.encode()
            for part in (
                self.document_id,
                str(self.version),
                self.sha256,
                self.source_url,
                self.ingested_at,
            )
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "document_id": self.document_id,
            "version": self.version,
            "sha256": self.sha256,
            "source_url": self.source_url,
            "ingested_at": self.ingested_at,
        }


@dataclass(frozen=True)
class NewAudit:
    request_id: str
    prompt_sha256: str
    answer_sha256: str
    model: str
    tenant_id: str
    api_key_id: str
    cited_chunk_ids: tuple[str, ...]
    completed_at: str

    def args(self) -> list[bytes]:
        parts = (
            self.request_id,
            self.prompt_sha256,
            self.answer_sha256,
            self.model,
            self.tenant_id,
            self.api_key_id,
            json.dumps(list(self.cited_chunk_ids)),
            self.completed_at,
        )
        return [part.encode() for part in parts]


@dataclass(frozen=True)
class Anchored:
    record: AnchorRecord
    location: Location
    already_anchored: bool = False


@dataclass(frozen=True)
class AuditAnchored:
    record: AuditRecord
    location: Location
    already_anchored: bool = False


@dataclass(frozen=True)
class BatchItem:
    """One item's outcome in an ``AnchorDocuments`` batch."""

    status: Literal["anchored", "already_anchored", "conflict"]
    record: AnchorRecord
    error: str = ""


def _already_anchored(result: bytes) -> bool:
    return bool(json.loads(result).get("already_anchored"))


def _nothing_new(result: bytes) -> bool:
    return all(item["status"] != "anchored" for item in json.loads(result)["results"])


class Anchoring:
    """The anchoring contract's functions, results joined with their commit location."""

    def __init__(self, backend: LedgerBackend, chaincode: str) -> None:
        self.backend = backend
        self.chaincode = chaincode
        self._locations: OrderedDict[str, Location] = OrderedDict()

    # -- locations ------------------------------------------------------------------------

    def _remember(self, location: Location) -> Location:
        self._locations[location.tx_id] = location
        self._locations.move_to_end(location.tx_id)
        while len(self._locations) > _LOCATION_CACHE:
            self._locations.popitem(last=False)
        return location

    async def locate(self, tx_id: str, anchored_at: str) -> Location:
        """Where the (committed) transaction ``tx_id`` is."""
        cached = self._locations.get(tx_id)
        if cached is not None:
            return cached
        # a record is in the world state only once its transaction committed, so this
        # answers at once; the wait only covers a peer that is a block behind
        info = await self.backend.commit_status(tx_id, wait=True, wait_seconds=_LOCATE_TIMEOUT)
        return self._remember(
            Location(
                tx_id,
                info.block_number or 0,
                info.committed_at or parse_time(anchored_at),
                self.backend.channel,
            )
        )

    def _located(self, submitted: Submitted, anchored_at: str) -> Location:
        status = submitted.status
        return self._remember(
            Location(
                submitted.tx_id,
                status.block_number or 0,
                status.committed_at or parse_time(anchored_at),
                self.backend.channel,
            )
        )

    # -- documents ------------------------------------------------------------------------

    async def anchor_document(self, item: DocumentAnchor) -> Anchored:
        submitted = await self.backend.submit(
            self.chaincode, "AnchorDocument", item.args(), skip_when=_already_anchored
        )
        payload = json.loads(submitted.result)
        record = AnchorRecord.from_json(payload["record"])
        if submitted.submitted and not payload["already_anchored"]:
            return Anchored(record, self._located(submitted, record.anchored_at))
        return Anchored(record, await self.locate(record.tx_id, record.anchored_at), True)

    async def anchor_documents(self, items: Sequence[DocumentAnchor]) -> list[BatchItem]:
        """One ``AnchorDocuments`` transaction; results in input order. A conflicting
        item does not fail the others (the contract's rule)."""
        batch = json.dumps([item.to_json() for item in items])
        submitted = await self.backend.submit(
            self.chaincode, "AnchorDocuments", [batch.encode()], skip_when=_nothing_new
        )
        results = [
            BatchItem(r["status"], AnchorRecord.from_json(r["record"]), r.get("error", ""))
            for r in json.loads(submitted.result)["results"]
        ]
        new = [r.record for r in results if r.status == "anchored"]
        if submitted.submitted and new:
            self._located(submitted, new[0].anchored_at)
        return results

    async def _with_locations(self, raw: bytes) -> list[Anchored]:
        records = [AnchorRecord.from_json(r) for r in json.loads(raw)["records"]]
        return [Anchored(r, await self.locate(r.tx_id, r.anchored_at)) for r in records]

    async def verify(self, sha256: str, document_id: str = "", version: int = 0) -> list[Anchored]:
        """Anchored records with this checksum (``sha256`` lower case), oldest first."""
        if document_id and version:
            try:
                raw = await self.backend.evaluate(
                    self.chaincode, "GetAnchor", [document_id.encode(), str(version).encode()]
                )
            except TxNotFound:
                return []
            record = AnchorRecord.from_bytes(raw)
            if record.sha256 != sha256:
                return []
            return [Anchored(record, await self.locate(record.tx_id, record.anchored_at))]
        if document_id:
            found = await self.history(document_id)
            matching = [a for a in found if a.record.sha256 == sha256]
            return sorted(matching, key=lambda a: (a.record.anchored_at, a.record.version))
        raw = await self.backend.evaluate(self.chaincode, "FindBySha256", [sha256.encode()])
        found = await self._with_locations(raw)
        return [a for a in found if not version or a.record.version == version]

    async def history(self, document_id: str) -> list[Anchored]:
        raw = await self.backend.evaluate(self.chaincode, "History", [document_id.encode()])
        return await self._with_locations(raw)

    # -- audit records --------------------------------------------------------------------

    async def anchor_audit(self, audit: NewAudit) -> AuditAnchored:
        submitted = await self.backend.submit(
            self.chaincode, "AnchorAudit", audit.args(), skip_when=_already_anchored
        )
        payload = json.loads(submitted.result)
        record = AuditRecord.from_json(payload["record"])
        if submitted.submitted and not payload["already_anchored"]:
            return AuditAnchored(record, self._located(submitted, record.anchored_at))
        return AuditAnchored(record, await self.locate(record.tx_id, record.anchored_at), True)

    async def get_audit(self, request_id: str) -> AuditAnchored:
        """The anchored audit record (:class:`TxNotFound` when there is none)."""
        raw = await self.backend.evaluate(self.chaincode, "GetAudit", [request_id.encode()])
        record = AuditRecord.from_bytes(raw)
        return AuditAnchored(record, await self.locate(record.tx_id, record.anchored_at))
