"""The anchoring contract: document checksums and completion audit records on a ledger.

One implementation of the contract's rules, pure Python (no I/O, no asyncio, no clock,
no randomness), so every endorser computes the same read/write set. It runs unchanged
on the embedded dev ledger (:mod:`ledgerlens.services.ledger.devledger`) and, through
the chaincode shim, on a real Fabric peer (``services/ledger/chaincode``).

Encoding (what a client sends and gets back)
--------------------------------------------
Every argument is a UTF-8 string; integers are decimal, timestamps RFC 3339 with an
offset (stored normalised to UTC, ``...Z``), lists are JSON arrays. Every result is a
UTF-8 JSON object (compact, keys sorted). Refusals are :class:`ChaincodeError` with
status 400 (invalid argument), 404 (not found) or 409 (conflicts with what is anchored).

- ``AnchorDocument(doc_id, version, sha256, source_url, ingested_at)`` ->
  ``{"already_anchored": bool, "record": A}``
- ``AnchorDocuments(batch)``, batch a JSON array of ``{document_id, version (a JSON
  integer), sha256, source_url, ingested_at}``, at most :data:`MAX_BATCH` ->
  ``{"results": [{"status", "record", "error"?}]}`` in input order
- ``GetAnchor(doc_id, version)`` -> ``A`` (404 when not anchored)
- ``History(doc_id)`` -> ``{"records": [A...]}`` by version, lowest first (empty when
  unknown)
- ``FindBySha256(sha256)`` -> ``{"records": [A...]}`` oldest anchor first (by
  ``anchored_at``, then document id and version)
- ``AnchorAudit(request_id, prompt_sha256, answer_sha256, model, tenant_id,
  api_key_id, cited_chunk_ids, completed_at)``, cited_chunk_ids a JSON array of
  strings -> ``{"already_anchored": bool, "record": U}``
- ``GetAudit(request_id)`` -> ``U`` (404 when not anchored)

``A`` (an anchor record) is ``{document_id, version, sha256, source_url, ingested_at,
tx_id, anchored_at}`` and ``U`` (an audit record) ``{request_id, prompt_sha256,
answer_sha256, model, tenant_id, api_key_id, cited_chunk_ids, completed_at, tx_id,
anchored_at}``: ``tx_id`` and ``anchored_at`` (the proposal's timestamp) say which
transaction anchored it. The block number is not known while a transaction is
simulated, so it is not stored: readers join it from the ledger by ``tx_id``.

In a batch a result's ``status`` is ``"anchored"`` (new, written), ``"already_anchored"``
(the same triple was there: nothing written) or ``"conflict"`` (another sha256 is
anchored for that version: nothing written, ``record`` is the existing anchor and
``error`` says why). A conflict does not fail the batch — one bad item must not cost
the others their anchor — but a malformed item does (it is the caller's bug).

Idempotence: re-anchoring the same (document, version, sha256), or the same audit
record, reads and returns the existing record and writes nothing: it never
invalidates another transaction, and (anchors are never rewritten) its own read stays
valid. Events are emitted only when something
was written: ``DocumentAnchored`` (one record ``A``), ``DocumentsAnchored``
(``{"tx_id", "records": [A...]}`` of the newly anchored items) and ``AuditAnchored``
(``U``).

State layout
------------
Keys are Fabric composite keys (``"\\x00" + type + "\\x00" + attr + "\\x00" ...``, what
the shims' ``create_composite_key`` builds), so a partial key and
``partial + "\\U0010ffff"`` bound a range read:

- ``anchor / doc_id / version`` (version zero-padded to 10 digits, so key order is
  version order) -> the anchor record ``A``;
- ``anchor~sha256 / sha256 / doc_id / version`` -> ``b"\\x00"`` (an index entry: Fabric
  treats an empty value as a delete, hence one NUL byte);
- ``audit / request_id`` -> the audit record ``U``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

from ledgerlens.fabric.chaincode import ChaincodeError, ChaincodeStub

__all__ = [
    "ANCHOR_KEY_TYPE",
    "AUDIT_KEY_TYPE",
    "CHAINCODE_NAME",
    "EVENT_AUDIT_ANCHORED",
    "EVENT_DOCUMENTS_ANCHORED",
    "EVENT_DOCUMENT_ANCHORED",
    "MAX_BATCH",
    "SHA256_INDEX_KEY_TYPE",
    "AnchorRecord",
    "AnchoringContract",
    "AuditRecord",
    "composite_key",
    "composite_range",
    "normalize_sha256",
    "normalize_timestamp",
]

CHAINCODE_NAME: Final = "anchoring"

EVENT_DOCUMENT_ANCHORED: Final = "DocumentAnchored"
EVENT_DOCUMENTS_ANCHORED: Final = "DocumentsAnchored"
EVENT_AUDIT_ANCHORED: Final = "AuditAnchored"

ANCHOR_KEY_TYPE: Final = "anchor"
SHA256_INDEX_KEY_TYPE: Final = "anchor~sha256"
AUDIT_KEY_TYPE: Final = "audit"

#: items per AnchorDocuments call: a block must stay small enough to validate quickly.
MAX_BATCH: Final = 1000
MAX_ID_LENGTH: Final = 256
MAX_URL_LENGTH: Final = 4096
MAX_CITED_CHUNKS: Final = 1000
MAX_VERSION: Final = 2**32 - 1  # the proto's uint32

BAD_REQUEST: Final = 400
NOT_FOUND: Final = 404
CONFLICT: Final = 409

_MIN_UNICODE_RUNE: Final = "\x00"
_MAX_UNICODE_RUNE: Final = "\U0010ffff"
_INDEX_VALUE: Final = b"\x00"

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
# RFC 3339 date-time (section 5.6): a full date, a time, an offset (Z or +hh:mm).
_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)


# -- keys --------------------------------------------------------------------------


def composite_key(object_type: str, *attributes: str) -> str:
    """Fabric's composite key (``CreateCompositeKey``): type and attributes, each after
    a NUL; attributes must not contain NUL or U+10FFFF (they delimit ranges)."""
    for part in (object_type, *attributes):
        if _MIN_UNICODE_RUNE in part or _MAX_UNICODE_RUNE in part:
            raise ChaincodeError(
                f"key part {part!r} contains U+0000 or U+10FFFF, which delimit keys",
                BAD_REQUEST,
            )
    return _MIN_UNICODE_RUNE + _MIN_UNICODE_RUNE.join((object_type, *attributes)) + "\x00"


def composite_range(object_type: str, *attributes: str) -> tuple[str, str]:
    """``[start, end)`` of every key under a partial composite key (as
    ``GetStateByPartialCompositeKey`` computes it)."""
    start = composite_key(object_type, *attributes)
    return start, start + _MAX_UNICODE_RUNE


def split_composite_key(key: str) -> tuple[str, list[str]]:
    """The inverse of :func:`composite_key`."""
    if not key.startswith(_MIN_UNICODE_RUNE) or not key.endswith(_MIN_UNICODE_RUNE):
        raise ValueError(f"not a composite key: {key!r}")
    object_type, *attributes = key[1:-1].split(_MIN_UNICODE_RUNE)
    return object_type, attributes


def _version_part(version: int) -> str:
    return f"{version:010d}"


def _anchor_key(document_id: str, version: int) -> str:
    return composite_key(ANCHOR_KEY_TYPE, document_id, _version_part(version))


def _sha256_index_key(sha256: str, document_id: str, version: int) -> str:
    return composite_key(SHA256_INDEX_KEY_TYPE, sha256, document_id, _version_part(version))


def _audit_key(request_id: str) -> str:
    return composite_key(AUDIT_KEY_TYPE, request_id)


# -- validation ----------------------------------------------------------------------


def _invalid(message: str) -> ChaincodeError:
    return ChaincodeError(message, BAD_REQUEST)


def normalize_sha256(value: str, field: str = "sha256") -> str:
    """64 hex digits, returned lower case (the stored form)."""
    if not _SHA256.match(value):
        raise _invalid(f"{field} must be 64 hex digits, got {value!r}")
    return value.lower()


def normalize_timestamp(value: str, field: str) -> str:
    """An RFC 3339 date-time with an offset, returned in UTC as ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``
    (so the same instant always compares equal; digits past microseconds are dropped)."""
    match = _RFC3339.match(value)
    if match is None:
        raise _invalid(f"{field} must be an RFC 3339 date-time with offset, got {value!r}")
    date, time, fraction, offset = match.groups()
    micros = f".{fraction[:6].ljust(6, '0')}" if fraction else ""
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        parsed = datetime.fromisoformat(f"{date}T{time}{micros}{offset}")
    except ValueError as exc:
        raise _invalid(f"{field} is not a valid date-time: {value!r} ({exc})") from exc
    return _format_utc(parsed)


def _format_utc(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _timestamp_from_seconds(seconds: int) -> str:
    return _format_utc(datetime.fromtimestamp(seconds, UTC))


def _identifier(value: str, field: str) -> str:
    if not value:
        raise _invalid(f"{field} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise _invalid(f"{field} is longer than {MAX_ID_LENGTH} characters")
    if _MIN_UNICODE_RUNE in value or _MAX_UNICODE_RUNE in value:
        raise _invalid(f"{field} must not contain U+0000 or U+10FFFF")
    return value


def _version(value: str | int, field: str = "version") -> int:
    if isinstance(value, bool):
        raise _invalid(f"{field} must be an integer >= 1, got {value!r}")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise _invalid(f"{field} must be a decimal integer >= 1, got {value!r}")
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise _invalid(f"{field} must be an integer in [1, {MAX_VERSION}], got {value!r}")
    return value


def _url(value: str, field: str = "source_url") -> str:
    if len(value) > MAX_URL_LENGTH:
        raise _invalid(f"{field} is longer than {MAX_URL_LENGTH} characters")
    return value


# -- records ---------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    """Deterministic JSON (sorted keys, compact): endorsers must produce equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class AnchorRecord:
    """An anchored document version (the proto's ``AnchorRecord`` minus the block)."""

    document_id: str
    version: int
    sha256: str
    source_url: str
    ingested_at: str
    tx_id: str
    anchored_at: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> AnchorRecord:
        return cls(**{name: value[name] for name in cls.__dataclass_fields__})

    @classmethod
    def from_bytes(cls, raw: bytes) -> AnchorRecord:
        return cls.from_json(json.loads(raw))


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """The fingerprint of one completion (the proto's ``AuditRecord``: hashes, never text)."""

    request_id: str
    prompt_sha256: str
    answer_sha256: str
    model: str
    tenant_id: str
    api_key_id: str
    cited_chunk_ids: tuple[str, ...]
    completed_at: str
    tx_id: str
    anchored_at: str

    def to_json(self) -> dict[str, Any]:
        value = asdict(self)
        value["cited_chunk_ids"] = list(self.cited_chunk_ids)
        return value

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> AuditRecord:
        fields = {name: value[name] for name in cls.__dataclass_fields__}
        fields["cited_chunk_ids"] = tuple(fields["cited_chunk_ids"])
        return cls(**fields)

    @classmethod
    def from_bytes(cls, raw: bytes) -> AuditRecord:
        return cls.from_json(json.loads(raw))

    def content(self) -> AuditRecord:
        """The record without where it was anchored (what idempotence compares)."""
        return replace(self, tx_id="", anchored_at="")


@dataclass(frozen=True, slots=True)
class _AnchorRequest:
    document_id: str
    version: int
    sha256: str
    source_url: str
    ingested_at: str


def _anchor_request(
    document_id: str, version: str | int, sha256: str, source_url: str, ingested_at: str
) -> _AnchorRequest:
    return _AnchorRequest(
        document_id=_identifier(document_id, "document_id"),
        version=_version(version),
        sha256=normalize_sha256(sha256),
        source_url=_url(source_url),
        ingested_at=normalize_timestamp(ingested_at, "ingested_at"),
    )


def _conflict_message(existing: AnchorRecord, refused: str) -> str:
    return (
        f"document {existing.document_id!r} version {existing.version} is already anchored "
        f"with sha256 {existing.sha256} (tx {existing.tx_id}); refusing sha256 {refused}"
    )


# -- the contract ------------------------------------------------------------------------


class AnchoringContract:
    """The document-anchoring chaincode (implements ``ledgerlens.fabric.chaincode.Chaincode``)."""

    name: str = CHAINCODE_NAME

    def __init__(self) -> None:
        self._functions: dict[str, tuple[int, Callable[[ChaincodeStub, list[str]], bytes]]] = {
            "AnchorDocument": (5, self._anchor_document),
            "AnchorDocuments": (1, self._anchor_documents),
            "GetAnchor": (2, self._get_anchor),
            "History": (1, self._history),
            "FindBySha256": (1, self._find_by_sha256),
            "AnchorAudit": (8, self._anchor_audit),
            "GetAudit": (1, self._get_audit),
        }

    @property
    def functions(self) -> tuple[str, ...]:
        return tuple(self._functions)

    def invoke(
        self,
        stub: ChaincodeStub,
        function: str,
        args: Sequence[bytes],
        transient: Mapping[str, bytes],
    ) -> bytes:
        entry = self._functions.get(function)
        if entry is None:
            known = ", ".join(self._functions)
            raise _invalid(f"unknown function {function!r} of {self.name}; known: {known}")
        arity, handler = entry
        if len(args) != arity:
            raise _invalid(f"{function} takes {arity} arguments, got {len(args)}")
        try:
            texts = [arg.decode("utf-8") for arg in args]
        except UnicodeDecodeError as exc:
            raise _invalid(f"{function}: arguments must be UTF-8 ({exc})") from exc
        return handler(stub, texts)

    # -- documents -----------------------------------------------------------------------

    def _read_anchor(
        self, stub: ChaincodeStub, document_id: str, version: int
    ) -> AnchorRecord | None:
        raw = stub.get_state(_anchor_key(document_id, version))
        return AnchorRecord.from_bytes(raw) if raw is not None else None

    def _write_anchor(self, stub: ChaincodeStub, request: _AnchorRequest) -> AnchorRecord:
        record = AnchorRecord(
            document_id=request.document_id,
            version=request.version,
            sha256=request.sha256,
            source_url=request.source_url,
            ingested_at=request.ingested_at,
            tx_id=stub.get_tx_id(),
            anchored_at=_timestamp_from_seconds(stub.get_tx_timestamp()),
        )
        stub.put_state(_anchor_key(record.document_id, record.version), _dumps(record.to_json()))
        stub.put_state(
            _sha256_index_key(record.sha256, record.document_id, record.version), _INDEX_VALUE
        )
        return record

    def _anchor_document(self, stub: ChaincodeStub, args: list[str]) -> bytes:
        request = _anchor_request(*args)
        existing = self._read_anchor(stub, request.document_id, request.version)
        if existing is not None:
            if existing.sha256 != request.sha256:
                raise ChaincodeError(_conflict_message(existing, request.sha256), CONFLICT)
            return _dumps({"already_anchored": True, "record": existing.to_json()})
        record = self._write_anchor(stub, request)
        stub.set_event(EVENT_DOCUMENT_ANCHORED, _dumps(record.to_json()))
        return _dumps({"already_anchored": False, "record": record.to_json()})

    def _anchor_documents(self, stub: ChaincodeStub, args: list[str]) -> bytes:
        requests = self._parse_batch(args[0])
        # reads do not see this transaction's own writes (as on a peer): track them here
        written: dict[tuple[str, int], AnchorRecord] = {}
        results: list[dict[str, Any]] = []
        anchored: list[dict[str, Any]] = []
        for request in requests:
            key = (request.document_id, request.version)
            existing = written.get(key) or self._read_anchor(stub, *key)
            if existing is None:
                record = self._write_anchor(stub, request)
                written[key] = record
                results.append({"status": "anchored", "record": record.to_json()})
                anchored.append(record.to_json())
            elif existing.sha256 == request.sha256:
                results.append({"status": "already_anchored", "record": existing.to_json()})
            else:
                results.append(
                    {
                        "status": "conflict",
                        "record": existing.to_json(),
                        "error": _conflict_message(existing, request.sha256),
                    }
                )
        if anchored:
            payload = {"tx_id": stub.get_tx_id(), "records": anchored}
            stub.set_event(EVENT_DOCUMENTS_ANCHORED, _dumps(payload))
        return _dumps({"results": results})

    @staticmethod
    def _parse_batch(raw: str) -> list[_AnchorRequest]:
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _invalid(f"AnchorDocuments: the batch is not JSON ({exc})") from exc
        if not isinstance(items, list) or not items:
            raise _invalid("AnchorDocuments: the batch must be a non-empty JSON array")
        if len(items) > MAX_BATCH:
            raise _invalid(f"AnchorDocuments: at most {MAX_BATCH} items, got {len(items)}")
        fields = ("document_id", "version", "sha256", "source_url", "ingested_at")
        requests = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise _invalid(f"AnchorDocuments: item {index} is not a JSON object")
            missing = [name for name in fields if name not in item]
            if missing:
                raise _invalid(f"AnchorDocuments: item {index} lacks {', '.join(missing)}")
            strings = [
                name for name in fields if name != "version" and not isinstance(item[name], str)
            ]
            if strings:
                raise _invalid(
                    f"AnchorDocuments: item {index}: {', '.join(strings)} must be strings"
                )
            try:
                requests.append(_anchor_request(*(item[name] for name in fields)))
            except ChaincodeError as exc:
                raise _invalid(f"AnchorDocuments: item {index}: {exc.message}") from exc
        return requests

    def _get_anchor(self, stub: ChaincodeStub, args: list[str]) -> bytes:
        document_id, version = _identifier(args[0], "document_id"), _version(args[1])
        record = self._read_anchor(stub, document_id, version)
        if record is None:
            raise ChaincodeError(
                f"document {document_id!r} version {version} is not anchored", NOT_FOUND
            )
        return _dumps(record.to_json())

    def _history(self, stub: ChaincodeStub, args: list[str]) -> bytes:
        document_id = _identifier(args[0], "document_id")
        start, end = composite_range(ANCHOR_KEY_TYPE, document_id)
        records = [
            AnchorRecord.from_bytes(raw).to_json() for _, raw in stub.get_state_by_range(start, end)
        ]
        return _dumps({"records": records})

    def _find_by_sha256(self, stub: ChaincodeStub, args: list[str]) -> bytes:
        sha256 = normalize_sha256(args[0])
        start, end = composite_range(SHA256_INDEX_KEY_TYPE, sha256)
        records: list[AnchorRecord] = []
        for key, _ in stub.get_state_by_range(start, end):
            _, (_, document_id, version) = split_composite_key(key)
            record = self._read_anchor(stub, document_id, int(version))
            if record is not None:  # an index entry always has its record; be safe
                records.append(record)
        records.sort(key=lambda r: (r.anchored_at, r.document_id, r.version))
        return _dumps({"records": [record.to_json() for record in records]})

    # -- audit -------------------------------------------------------------------------

    def _anchor_audit(self, stub: ChaincodeStub, args: list[str]) -> bytes:
        request_id, prompt, answer, model, tenant_id, api_key_id, cited, completed_at = args
        record = AuditRecord(
            request_id=_identifier(request_id, "request_id"),
            prompt_sha256=normalize_sha256(prompt, "prompt_sha256"),
            answer_sha256=normalize_sha256(answer, "answer_sha256"),
            model=_identifier(model, "model"),
            tenant_id=_identifier(tenant_id, "tenant_id"),
            api_key_id=_identifier(api_key_id, "api_key_id"),
            cited_chunk_ids=self._parse_chunk_ids(cited),
            completed_at=normalize_timestamp(completed_at, "completed_at"),
            tx_id=stub.get_tx_id(),
            anchored_at=_timestamp_from_seconds(stub.get_tx_timestamp()),
        )
        key = _audit_key(record.request_id)
        raw = stub.get_state(key)
        if raw is not None:
            existing = AuditRecord.from_bytes(raw)
            if existing.content() != record.content():
                differing = [
                    name
                    for name in AuditRecord.__dataclass_fields__
                    if name not in ("tx_id", "anchored_at")
                    and getattr(existing, name) != getattr(record, name)
                ]
                raise ChaincodeError(
                    f"an audit record for request {record.request_id!r} is already anchored "
                    f"(tx {existing.tx_id}) and differs in {', '.join(differing)}",
                    CONFLICT,
                )
            return _dumps({"already_anchored": True, "record": existing.to_json()})
        stub.put_state(key, _dumps(record.to_json()))
        stub.set_event(EVENT_AUDIT_ANCHORED, _dumps(record.to_json()))
        return _dumps({"already_anchored": False, "record": record.to_json()})

    @staticmethod
    def _parse_chunk_ids(raw: str) -> tuple[str, ...]:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _invalid(f"cited_chunk_ids must be a JSON array of strings ({exc})") from exc
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise _invalid("cited_chunk_ids must be a JSON array of non-empty strings")
        if len(value) > MAX_CITED_CHUNKS:
            raise _invalid(f"cited_chunk_ids: at most {MAX_CITED_CHUNKS} ids, got {len(value)}")
        return tuple(value)

    def _get_audit(self, stub: ChaincodeStub, args: list[str]) -> bytes:
        request_id = _identifier(args[0], "request_id")
        raw = stub.get_state(_audit_key(request_id))
        if raw is None:
            raise ChaincodeError(
                f"no audit record is anchored for request {request_id!r}", NOT_FOUND
            )
        return _dumps(AuditRecord.from_bytes(raw).to_json())
