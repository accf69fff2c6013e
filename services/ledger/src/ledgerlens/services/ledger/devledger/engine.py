"""The dev ledger: Fabric's transaction flow on one machine, persisted with SQLAlchemy.

The flow is Fabric's, so a client written against it behaves the same on a network:

1. **endorse** (:meth:`DevLedger.simulate`): the chaincode runs against committed state
   through a :class:`~ledgerlens.fabric.chaincode.ChaincodeStub` that records a
   read/write set (each read with the version, ``(block, tx)``, of what it read; each
   range read with every key it returned; each write) and the event. Nothing is
   written. A :class:`~ledgerlens.fabric.chaincode.ChaincodeError` is a refusal
   (:class:`EndorsementRefused`).
2. **order and commit** (:meth:`DevLedger.commit`, or :meth:`DevLedger.submit` and the
   block cutter): a batch of endorsements becomes one block. A submitted transaction is
   first written to ``devledger_pending`` (committed before :meth:`~DevLedger.submit`
   returns) and leaves it in the database transaction of its block, so a crash loses
   nothing a submit acknowledged: :meth:`DevLedger.open` cuts what a crashed process
   left there, in submit order, before it returns. Each transaction is
   validated in order, as a peer's committer does: a repeated tx id is
   ``DUPLICATE_TXID``; a read whose version is no longer current (counting the
   writes of earlier valid transactions of the same block) is
   ``MVCC_READ_CONFLICT``; a range whose keys or versions changed is
   ``PHANTOM_READ_CONFLICT``. Only valid transactions' writes are applied; every
   transaction is recorded in the block with its validation code. The block, the
   status index and the state change in one database transaction, and commits are
   serialised (an asyncio lock in this process; the block number's primary key
   refuses a second writer in another process).
3. **deliver**: :meth:`DevLedger.status`, :meth:`DevLedger.wait_for` and
   :meth:`DevLedger.events` (valid transactions' chaincode events in ledger order,
   from a block or right after a checkpoint, tailing new blocks).

Blocks are hash-chained (:mod:`.blocks` defines the canonical form and the hashes);
:meth:`DevLedger.open` verifies the whole chain, so a tampered database is refused
at start with the block and what does not match.

Reads during a simulation are not one snapshot on every engine (SQLite's driver
reads outside a transaction); that is harmless for the same reason as in Fabric: a
simulation that saw a mix of two states fails MVCC validation at commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from fabric_protos.peer import transaction_pb2
from sqlalchemy import ColumnElement, Connection, and_, delete, func, insert, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledgerlens.fabric.chaincode import Chaincode, ChaincodeError
from ledgerlens.services.ledger.devledger.blocks import (
    GENESIS_PREVIOUS_HASH,
    BlockHeader,
    ChaincodeEventData,
    Endorsement,
    KVRead,
    KVWrite,
    RangeRead,
    ReadWriteSet,
    Version,
    block_data,
    block_hash,
    format_time,
    parse_time,
    sha256_hex,
    validation_code_name,
)
from ledgerlens.services.ledger.devledger.schema import (
    BlockRow,
    PendingRow,
    StateRow,
    TransactionRow,
)

__all__ = [
    "Checkpoint",
    "CommittedBlock",
    "DevLedger",
    "EndorsementRefused",
    "InvalidCheckpoint",
    "LedgerCorruptedError",
    "LedgerError",
    "LedgerEvent",
    "OutOfRange",
    "StoredBlock",
    "TxResult",
    "TxStatus",
    "UnknownChaincode",
    "new_tx_id",
]

log = logging.getLogger(__name__)

VALID: Final = validation_code_name(transaction_pb2.VALID)
MVCC_READ_CONFLICT: Final = validation_code_name(transaction_pb2.MVCC_READ_CONFLICT)
PHANTOM_READ_CONFLICT: Final = validation_code_name(transaction_pb2.PHANTOM_READ_CONFLICT)
DUPLICATE_TXID: Final = validation_code_name(transaction_pb2.DUPLICATE_TXID)

DEFAULT_CHANNEL: Final = "ledgerlens"
DEFAULT_MSP_ID: Final = "DevLedgerMSP"

_MAX_TX_ID: Final = 128  # the schema's column sizes
_MAX_EVENT_NAME: Final = 256
_MAX_CHAINCODE_NAME: Final = 128
_IN_CHUNK: Final = 500  # bound parameters per IN (...) list
_EVENT_PAGE: Final = 256
_COMMIT_RETRY_SECONDS: Final = 1.0

TxState = Literal["unknown", "pending", "valid", "invalid"]


# -- errors ------------------------------------------------------------------------------


class LedgerError(Exception):
    """Base of the dev ledger's own errors."""


class LedgerCorruptedError(LedgerError):
    """The stored chain does not verify: ``block_number`` is the first bad block."""

    def __init__(self, block_number: int, reason: str) -> None:
        super().__init__(f"ledger corrupted at block {block_number}: {reason}")
        self.block_number = block_number
        self.reason = reason


class UnknownChaincode(LedgerError, LookupError):
    pass


class OutOfRange(LedgerError, ValueError):
    """A start block or checkpoint beyond the ledger."""


class InvalidCheckpoint(LedgerError, ValueError):
    """A checkpoint whose transaction is not in its block."""


class EndorsementRefused(ChaincodeError):
    """The chaincode refused the proposal (its :class:`ChaincodeError`, with the tx)."""

    def __init__(self, error: ChaincodeError, tx_id: str, chaincode: str, function: str) -> None:
        super().__init__(error.message, error.status)
        self.tx_id = tx_id
        self.chaincode = chaincode
        self.function = function


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxResult:
    tx_id: str
    tx_number: int
    validation_code: str

    @property
    def valid(self) -> bool:
        return self.validation_code == VALID


@dataclass(frozen=True, slots=True)
class CommittedBlock:
    number: int
    hash: str
    previous_hash: str
    committed_at: datetime
    transactions: tuple[TxResult, ...]

    def result(self, tx_id: str) -> TxResult:
        for tx in self.transactions:
            if tx.tx_id == tx_id:
                return tx
        raise KeyError(tx_id)


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """A block as stored: its header, hash and (transaction, validation code) pairs."""

    header: BlockHeader
    hash: str
    transactions: tuple[tuple[Endorsement, str], ...]


@dataclass(frozen=True, slots=True)
class TxStatus:
    tx_id: str
    state: TxState
    validation_code: str | None = None
    block_number: int | None = None
    committed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The last event processed: resume with the next transaction of ``block_number``
    after ``tx_id``, or with the next block when ``tx_id`` is empty."""

    block_number: int
    tx_id: str = ""


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    block_number: int
    tx_number: int
    tx_id: str
    chaincode: str
    name: str
    payload: bytes
    committed_at: datetime

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.block_number, self.tx_id)


def new_tx_id(creator: bytes) -> str:
    """Fabric's transaction id: hex(sha256(nonce || creator)) with a random 24-byte nonce."""
    return hashlib.sha256(os.urandom(24) + creator).hexdigest()


# -- simulation ------------------------------------------------------------------------


class _SimulationStub:
    """A :class:`ChaincodeStub` over committed state that records the read/write set.

    It runs inside ``AsyncConnection.run_sync``, so the chaincode's synchronous calls
    are plain SQL on the connection (the async driver is driven underneath).
    """

    def __init__(
        self, conn: Connection, namespace: str, tx_id: str, timestamp: int, msp_id: str
    ) -> None:
        self._conn = conn
        self._namespace = namespace
        self._tx_id = tx_id
        self._timestamp = timestamp
        self._msp_id = msp_id
        self.reads: dict[str, Version | None] = {}
        self.range_reads: list[RangeRead] = []
        self.writes: dict[str, bytes] = {}
        self.event: ChaincodeEventData | None = None

    def get_tx_id(self) -> str:
        return self._tx_id

    def get_tx_timestamp(self) -> int:
        return self._timestamp

    def get_creator_msp_id(self) -> str:
        return self._msp_id

    def get_state(self, key: str) -> bytes | None:
        _check_key(key)
        row = self._conn.execute(
            select(StateRow.value, StateRow.block_number, StateRow.tx_number).where(
                StateRow.namespace == self._namespace, StateRow.key == key.encode()
            )
        ).first()
        # the first read's version is the one validated (as Fabric's simulator does)
        self.reads.setdefault(key, (row.block_number, row.tx_number) if row else None)
        return bytes(row.value) if row else None

    def put_state(self, key: str, value: bytes) -> None:
        _check_key(key)
        if not value:
            # Fabric turns an empty value into a delete, which this stub does not offer
            raise ChaincodeError(f"put_state({key!r}) with an empty value (a delete)", 500)
        self.writes[key] = bytes(value)

    def get_state_by_range(self, start_key: str, end_key: str) -> list[tuple[str, bytes]]:
        query = select(StateRow.key, StateRow.value, StateRow.block_number, StateRow.tx_number)
        query = query.where(StateRow.namespace == self._namespace)
        query = query.where(*_range_filter(start_key, end_key)).order_by(StateRow.key)
        rows = self._conn.execute(query).all()
        self.range_reads.append(
            RangeRead(
                start_key,
                end_key,
                tuple((row.key.decode(), (row.block_number, row.tx_number)) for row in rows),
            )
        )
        return [(row.key.decode(), bytes(row.value)) for row in rows]

    def set_event(self, name: str, payload: bytes) -> None:
        if not name or len(name) > _MAX_EVENT_NAME:
            raise ChaincodeError(
                f"set_event: the event name must have 1 to {_MAX_EVENT_NAME} characters", 500
            )
        self.event = ChaincodeEventData(name, bytes(payload))

    def rwset(self) -> ReadWriteSet:
        return ReadWriteSet(
            namespace=self._namespace,
            reads=tuple(KVRead(key, version) for key, version in self.reads.items()),
            range_reads=tuple(self.range_reads),
            writes=tuple(KVWrite(key, value) for key, value in sorted(self.writes.items())),
        )


def _check_key(key: str) -> None:
    if not key:
        raise ChaincodeError("a state key must not be empty", 500)


def _range_filter(start_key: str, end_key: str) -> list[ColumnElement[bool]]:
    """``[start, end)``; an empty bound is open, as in Fabric's GetStateByRange."""
    conditions: list[ColumnElement[bool]] = []
    if start_key:
        conditions.append(StateRow.key >= start_key.encode())
    if end_key:
        conditions.append(StateRow.key < end_key.encode())
    return conditions


def _in_range(key: str, start_key: str, end_key: str) -> bool:
    encoded = key.encode()
    return (not start_key or encoded >= start_key.encode()) and (
        not end_key or encoded < end_key.encode()
    )


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- verification -------------------------------------------------------------------

_INDEX_COLUMNS = (
    TransactionRow.tx_id,
    TransactionRow.block_number,
    TransactionRow.tx_number,
    TransactionRow.chaincode,
    TransactionRow.validation_code,
    TransactionRow.event_name,
    TransactionRow.event_payload,
    TransactionRow.committed_at,
)
_IndexEntry = tuple[str, int, int, str, str, str | None, bytes | None, str]


def _verify_block(row: Any, previous_hash: str) -> None:
    """One stored block against its own hashes and its predecessor's hash."""
    number = int(row.number)
    data_hash = sha256_hex(bytes(row.data))
    if data_hash != row.data_hash:
        raise LedgerCorruptedError(
            number, f"its data hashes to {data_hash} but its header says {row.data_hash}"
        )
    if row.previous_hash != previous_hash:
        raise LedgerCorruptedError(
            number,
            f"previous_hash {row.previous_hash} does not match the hash {previous_hash} "
            f"of block {number - 1}"
            if number
            else f"previous_hash {row.previous_hash} of the genesis block is not "
            f"{GENESIS_PREVIOUS_HASH}",
        )
    digest = block_hash(BlockHeader(number, row.previous_hash, row.data_hash, row.committed_at))
    if digest != row.hash:
        raise LedgerCorruptedError(
            number, f"stored hash {row.hash} does not match its header's hash {digest}"
        )


def _index_entries(number: int, data: bytes, committed_at: str) -> list[_IndexEntry]:
    """The status-index rows a block's data implies (what commit wrote)."""
    try:
        transactions = json.loads(data)["transactions"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerCorruptedError(number, f"its data is not a block ({exc!r})") from exc
    entries: list[_IndexEntry] = []
    for tx_number, entry in enumerate(transactions):
        endorsement, code = Endorsement.from_block_entry(entry)
        if code == DUPLICATE_TXID:
            continue
        event = endorsement.event if code == VALID else None
        entries.append(
            (
                endorsement.tx_id,
                number,
                tx_number,
                endorsement.chaincode,
                code,
                event.name if event else None,
                event.payload if event else None,
                committed_at,
            )
        )
    return entries


def _describe(indexed: Sequence[Any] | None) -> str:
    if indexed is None:
        return "nothing"
    tx_id, block, tx_number, _, code, name, *_ = indexed
    return f"tx {tx_id} at block {block} tx {tx_number} ({code}, event {name!r})"


# -- the ledger --------------------------------------------------------------------------


class DevLedger:
    """The embedded ledger. Build it with :meth:`open` (the schema must be migrated:
    :func:`ledgerlens.services.ledger.devledger.migrate.migrate`)."""

    def __init__(
        self,
        engine: AsyncEngine,
        chaincodes: Iterable[Chaincode],
        *,
        channel: str,
        msp_id: str,
        batch_timeout: float,
        max_batch_size: int,
        poll_interval: float,
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.msp_id = msp_id
        self._chaincodes: dict[str, Chaincode] = {}
        for chaincode in chaincodes:
            self.register(chaincode)
        self._batch_timeout = batch_timeout
        self._max_batch_size = max_batch_size
        self._poll_interval = poll_interval
        self._height = 0
        self._commit_lock = asyncio.Lock()
        self._block_signal = asyncio.Event()
        #: what the cutter has to order, by tx id: (its ``devledger_pending`` seq, it)
        self._pending: dict[str, tuple[int, Endorsement]] = {}
        self._cutter: asyncio.Task[None] | None = None
        #: submits waiting for their ``devledger_pending`` row (written together: one
        #: database commit for every submit that arrived meanwhile)
        self._to_persist: list[tuple[Endorsement, asyncio.Future[None]]] = []
        self._persister: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        engine: AsyncEngine,
        chaincodes: Iterable[Chaincode] = (),
        *,
        channel: str = DEFAULT_CHANNEL,
        msp_id: str = DEFAULT_MSP_ID,
        verify: bool = True,
        batch_timeout: float = 0.05,
        max_batch_size: int = 500,
        poll_interval: float = 1.0,
        recover_pending: bool = True,
    ) -> DevLedger:
        """Opens the ledger: writes the genesis block of an empty one, verifies the
        whole chain (:class:`LedgerCorruptedError` when it does not verify), then cuts
        into blocks every transaction a previous process submitted and did not cut
        (``devledger_pending``, in submit order) before it returns.

        ``recover_pending=False`` leaves those alone (an observer: a tool or a test
        that only reads; its :meth:`status` still reports them ``pending``).

        ``batch_timeout`` and ``max_batch_size`` drive the block cutter of
        :meth:`submit`; ``poll_interval`` bounds how late a waiter notices a block
        committed by another process (this process's commits wake waiters at once).
        """
        ledger = cls(
            engine,
            chaincodes,
            channel=channel,
            msp_id=msp_id,
            batch_timeout=batch_timeout,
            max_batch_size=max_batch_size,
            poll_interval=poll_interval,
        )
        await ledger._ensure_genesis()
        if verify:
            await ledger.verify_chain()
        ledger._height = await ledger._stored_height()
        if recover_pending:
            await ledger._recover_pending()
        return ledger

    async def _recover_pending(self) -> None:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(PendingRow.seq, PendingRow.endorsement).order_by(PendingRow.seq)
                )
            ).all()
        if not rows:
            return
        for row in rows:
            endorsement = Endorsement.from_bytes(bytes(row.endorsement))
            self._pending.setdefault(endorsement.tx_id, (int(row.seq), endorsement))
        first = self._height
        while self._pending:
            await self.commit(self._next_batch())
        log.warning(
            "cut %d transactions submitted before a crash into blocks %d to %d",
            len(rows),
            first,
            self._height - 1,
        )

    async def close(self, grace: float = 10.0) -> None:
        """Commits what was submitted and not yet cut into a block (for at most ``grace``
        seconds: a database that stays away leaves those transactions uncommitted, as
        an orderer's unsent batch), then stops the block cutter."""
        cutter = self._cutter
        if cutter is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(cutter), grace)
        except TimeoutError:
            log.warning(
                "closing with %d transactions not cut into a block (they stay in "
                "devledger_pending and are cut when the ledger opens again)",
                len(self._pending),
            )
            cutter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cutter

    @property
    def height(self) -> int:
        """Blocks in the ledger (the next block's number), as this process last saw it."""
        return self._height

    def register(self, chaincode: Chaincode) -> None:
        """Installs ``chaincode`` under its name (its state namespace)."""
        if not 0 < len(chaincode.name) <= _MAX_CHAINCODE_NAME:
            raise ValueError(
                f"a chaincode name has 1 to {_MAX_CHAINCODE_NAME} characters: {chaincode.name!r}"
            )
        self._chaincodes[chaincode.name] = chaincode

    # -- endorse ---------------------------------------------------------------------------

    async def simulate(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes] = (),
        transient: Mapping[str, bytes] | None = None,
        *,
        tx_id: str | None = None,
        creator_msp_id: str | None = None,
        timestamp: int | None = None,
    ) -> Endorsement:
        """Runs ``function`` against committed state and returns the endorsement.

        Raises :class:`EndorsementRefused` when the chaincode refuses.
        """
        contract = self._chaincodes.get(chaincode)
        if contract is None:
            known = ", ".join(sorted(self._chaincodes)) or "none"
            raise UnknownChaincode(f"no chaincode {chaincode!r} on this ledger (known: {known})")
        msp_id = creator_msp_id or self.msp_id
        tx_id = tx_id or new_tx_id(msp_id.encode())
        if len(tx_id) > _MAX_TX_ID:
            raise ValueError(f"a tx id has at most {_MAX_TX_ID} characters, got {len(tx_id)}")
        timestamp = int(time.time()) if timestamp is None else timestamp
        arguments = tuple(bytes(arg) for arg in args)

        def run(conn: Connection) -> tuple[bytes, _SimulationStub]:
            stub = _SimulationStub(conn, chaincode, tx_id, timestamp, msp_id)
            result = contract.invoke(stub, function, arguments, dict(transient or {}))
            return result, stub

        async with self.engine.connect() as conn:
            try:
                result, stub = await conn.run_sync(run)
            except EndorsementRefused:
                raise
            except ChaincodeError as exc:
                raise EndorsementRefused(exc, tx_id, chaincode, function) from exc
        return Endorsement(
            tx_id=tx_id,
            chaincode=chaincode,
            function=function,
            args=arguments,
            creator_msp_id=msp_id,
            timestamp=timestamp,
            result=bytes(result),
            rwset=stub.rwset(),
            event=stub.event,
        )

    async def evaluate(self, chaincode: str, function: str, args: Sequence[bytes] = ()) -> bytes:
        """A query: simulates and returns the result, submitting nothing."""
        return (await self.simulate(chaincode, function, args)).result

    # -- order and commit ------------------------------------------------------------------

    async def submit(self, endorsement: Endorsement) -> None:
        """Hands an endorsement to the orderer: it is ``pending`` until the block cutter
        commits it (after ``batch_timeout``, or at once when ``max_batch_size`` are waiting).

        When this returns, the transaction is durable: it is in ``devledger_pending``
        (committed), and a crash before its block leaves it to the next :meth:`open`.
        A tx id already pending is not queued again; one already committed is (it is
        cut as ``DUPLICATE_TXID``, as a peer records a replayed transaction).
        """
        if endorsement.tx_id in self._pending:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_persist.append((endorsement, done))
        if self._persister is None:
            self._persister = asyncio.create_task(
                self._persist_pending(), name="devledger-pending-writer"
            )
        await done

    async def _persist_pending(self) -> None:
        """Writes what :meth:`submit` queued to ``devledger_pending``, all that arrived
        meanwhile in one database transaction (group commit), then hands it to the cutter
        and resolves the submits (with the error, when the write failed)."""
        batch: list[tuple[Endorsement, asyncio.Future[None]]] = []
        try:
            while self._to_persist:
                batch, self._to_persist = self._to_persist, []
                try:
                    queued = await self._write_pending([e for e, _ in batch])
                except (SQLAlchemyError, OSError) as exc:  # each waiting submit raises it
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for seq, endorsement in queued:
                    self._pending.setdefault(endorsement.tx_id, (seq, endorsement))
                if self._cutter is None:
                    self._cutter = asyncio.create_task(
                        self._cut_blocks(), name="devledger-block-cutter"
                    )
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._persister = None
            for _, done in batch + self._to_persist:  # cancelled, or a bug: not acknowledged
                if not done.done():
                    done.cancel()

    async def _write_pending(
        self, endorsements: list[Endorsement]
    ) -> list[tuple[int, Endorsement]]:
        """Inserts a row per endorsement in one committed transaction; returns each one's
        seq, or the seq and transaction of the row already there for its tx id (the first
        submit of a tx id is the one ordered, as before)."""
        stamp = format_time(datetime.now(UTC))
        queued: list[tuple[int, Endorsement]] = []
        async with self.engine.begin() as conn:
            for endorsement in endorsements:
                values = {
                    "tx_id": endorsement.tx_id,
                    "submitted_at": stamp,
                    "endorsement": endorsement.to_bytes(),
                }
                while True:
                    seq = await self._insert_pending(conn, values)
                    if seq is not None:
                        queued.append((seq, endorsement))
                        break
                    row = (
                        await conn.execute(
                            select(PendingRow.seq, PendingRow.endorsement).where(
                                PendingRow.tx_id == endorsement.tx_id
                            )
                        )
                    ).first()
                    if row is not None:
                        queued.append(
                            (int(row.seq), Endorsement.from_bytes(bytes(row.endorsement)))
                        )
                        break
                    # cut into a block between the insert and the read: insert again
        return queued

    @staticmethod
    async def _insert_pending(conn: AsyncConnection, values: dict[str, Any]) -> int | None:
        """The new row's seq, or None when the tx id is already pending (the dev ledger
        runs on SQLite and PostgreSQL, which both say ON CONFLICT DO NOTHING)."""
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(PendingRow).on_conflict_do_nothing(
            index_elements=[PendingRow.tx_id]
        )
        seq = await conn.scalar(statement.values(values).returning(PendingRow.seq))
        return int(seq) if seq is not None else None

    def _next_batch(self) -> list[Endorsement]:
        """The next block's transactions: the oldest pending, in submit order."""
        queued = sorted(self._pending.values(), key=lambda item: item[0])
        return [endorsement for _, endorsement in queued[: self._max_batch_size]]

    async def _cut_blocks(self) -> None:
        try:
            while self._pending:
                if len(self._pending) < self._max_batch_size:
                    await asyncio.sleep(self._batch_timeout)
                batch = self._next_batch()
                try:
                    await self.commit(batch)
                except (SQLAlchemyError, OSError):
                    # the database is away: the batch stays pending and is retried
                    log.exception("committing a block of %d transactions failed", len(batch))
                    await asyncio.sleep(_COMMIT_RETRY_SECONDS)
        finally:
            self._cutter = None

    async def commit(self, endorsements: Sequence[Endorsement]) -> CommittedBlock:
        """Validates ``endorsements`` in order and commits them as one block."""
        if not endorsements:
            raise ValueError("a block needs at least one transaction")
        async with self._commit_lock:
            block = await self._commit_block(list(endorsements))
            self._height = block.number + 1
            for tx in block.transactions:
                self._pending.pop(tx.tx_id, None)
        self._notify_block()
        return block

    async def _commit_block(self, endorsements: list[Endorsement]) -> CommittedBlock:
        async with self.engine.begin() as conn:
            last = (
                await conn.execute(
                    select(BlockRow.number, BlockRow.hash).order_by(BlockRow.number.desc()).limit(1)
                )
            ).one()
            number = int(last.number) + 1
            known_ids = await self._known_tx_ids(conn, [e.tx_id for e in endorsements])
            committed = await self._committed_versions(conn, endorsements)
            block_writes: dict[tuple[str, str], tuple[Version, bytes]] = {}
            seen: set[str] = set()
            outcomes: list[tuple[Endorsement, str]] = []
            for tx_number, endorsement in enumerate(endorsements):
                if endorsement.tx_id in known_ids or endorsement.tx_id in seen:
                    code = DUPLICATE_TXID
                else:
                    code = await self._validate(conn, endorsement, committed, block_writes)
                    seen.add(endorsement.tx_id)
                if code == VALID:
                    for write in endorsement.rwset.writes:
                        key = (endorsement.rwset.namespace, write.key)
                        block_writes[key] = ((number, tx_number), write.value)
                outcomes.append((endorsement, code))

            committed_at = datetime.now(UTC)
            stamp = format_time(committed_at)
            data = block_data(outcomes)
            header = BlockHeader(number, str(last.hash), sha256_hex(data), stamp)
            digest = block_hash(header)
            await conn.execute(
                insert(BlockRow).values(
                    number=number,
                    previous_hash=header.previous_hash,
                    data_hash=header.data_hash,
                    hash=digest,
                    committed_at=stamp,
                    data=data,
                )
            )
            tx_rows = [
                {
                    "tx_id": e.tx_id,
                    "block_number": number,
                    "tx_number": tx_number,
                    "chaincode": e.chaincode,
                    "validation_code": code,
                    "event_name": e.event.name if e.event and code == VALID else None,
                    "event_payload": e.event.payload if e.event and code == VALID else None,
                    "committed_at": stamp,
                }
                for tx_number, (e, code) in enumerate(outcomes)
                if code != DUPLICATE_TXID  # the first tx of an id keeps its status
            ]
            if tx_rows:
                await conn.execute(insert(TransactionRow), tx_rows)
            await self._apply_writes(conn, block_writes)
            # out of the orderer's queue in the transaction that puts them in the block
            for chunk in _chunks(sorted({e.tx_id for e in endorsements})):
                await conn.execute(delete(PendingRow).where(PendingRow.tx_id.in_(chunk)))
        return CommittedBlock(
            number=number,
            hash=digest,
            previous_hash=header.previous_hash,
            committed_at=committed_at,
            transactions=tuple(
                TxResult(e.tx_id, tx_number, code) for tx_number, (e, code) in enumerate(outcomes)
            ),
        )

    @staticmethod
    async def _known_tx_ids(conn: AsyncConnection, tx_ids: list[str]) -> set[str]:
        known: set[str] = set()
        for chunk in _chunks(tx_ids):
            rows = await conn.scalars(
                select(TransactionRow.tx_id).where(TransactionRow.tx_id.in_(chunk))
            )
            known.update(rows)
        return known

    @staticmethod
    async def _committed_versions(
        conn: AsyncConnection, endorsements: Sequence[Endorsement]
    ) -> dict[tuple[str, str], Version]:
        """The committed version of every key any transaction of the block read."""
        by_namespace: dict[str, set[str]] = {}
        for endorsement in endorsements:
            keys = by_namespace.setdefault(endorsement.rwset.namespace, set())
            keys.update(read.key for read in endorsement.rwset.reads)
        versions: dict[tuple[str, str], Version] = {}
        for namespace, keys in by_namespace.items():
            for chunk in _chunks(sorted(keys)):
                rows = await conn.execute(
                    select(StateRow.key, StateRow.block_number, StateRow.tx_number).where(
                        StateRow.namespace == namespace,
                        StateRow.key.in_([key.encode() for key in chunk]),
                    )
                )
                for row in rows:
                    versions[(namespace, row.key.decode())] = (row.block_number, row.tx_number)
        return versions

    @staticmethod
    async def _validate(
        conn: AsyncConnection,
        endorsement: Endorsement,
        committed: dict[tuple[str, str], Version],
        block_writes: dict[tuple[str, str], tuple[Version, bytes]],
    ) -> str:
        namespace = endorsement.rwset.namespace

        def current(key: str) -> Version | None:
            written = block_writes.get((namespace, key))
            return written[0] if written else committed.get((namespace, key))

        for read in endorsement.rwset.reads:
            if current(read.key) != read.version:
                return MVCC_READ_CONFLICT
        for range_read in endorsement.rwset.range_reads:
            rows = await conn.execute(
                select(StateRow.key, StateRow.block_number, StateRow.tx_number)
                .where(StateRow.namespace == namespace)
                .where(*_range_filter(range_read.start, range_read.end))
            )
            now = {row.key.decode(): (row.block_number, row.tx_number) for row in rows}
            for (ns, key), (version, _) in block_writes.items():
                if ns == namespace and _in_range(key, range_read.start, range_read.end):
                    now[key] = version
            if sorted(now.items(), key=lambda kv: kv[0].encode()) != list(range_read.results):
                return PHANTOM_READ_CONFLICT
        return VALID

    @staticmethod
    async def _apply_writes(
        conn: AsyncConnection, block_writes: dict[tuple[str, str], tuple[Version, bytes]]
    ) -> None:
        by_namespace: dict[str, list[str]] = {}
        for namespace, key in block_writes:
            by_namespace.setdefault(namespace, []).append(key)
        for namespace, keys in by_namespace.items():
            for chunk in _chunks(keys):
                await conn.execute(
                    delete(StateRow).where(
                        StateRow.namespace == namespace,
                        StateRow.key.in_([key.encode() for key in chunk]),
                    )
                )
        if block_writes:
            await conn.execute(
                insert(StateRow),
                [
                    {
                        "namespace": namespace,
                        "key": key.encode(),
                        "value": value,
                        "block_number": version[0],
                        "tx_number": version[1],
                    }
                    for (namespace, key), (version, value) in block_writes.items()
                ],
            )

    def _notify_block(self) -> None:
        signal, self._block_signal = self._block_signal, asyncio.Event()
        signal.set()

    async def _wait_for_block(self, signal: asyncio.Event) -> None:
        """Until ``signal`` (this process committed a block) or the poll interval (another
        process may have)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signal.wait(), self._poll_interval)

    # -- status ----------------------------------------------------------------------------

    async def status(self, tx_id: str) -> TxStatus:
        # pending first: a transaction leaves ``_pending`` (and ``devledger_pending``, in
        # the block's own database transaction) only once its block committed, so no
        # moment answers "unknown" for it
        if tx_id in self._pending:
            return TxStatus(tx_id, "pending")
        async with self.engine.connect() as conn:
            pending = await conn.scalar(select(PendingRow.seq).where(PendingRow.tx_id == tx_id))
            if pending is not None:  # submitted by another (or a crashed) process
                return TxStatus(tx_id, "pending")
            row = (
                await conn.execute(
                    select(
                        TransactionRow.validation_code,
                        TransactionRow.block_number,
                        TransactionRow.committed_at,
                    ).where(TransactionRow.tx_id == tx_id)
                )
            ).first()
        if row is None:
            return TxStatus(tx_id, "unknown")
        return TxStatus(
            tx_id,
            "valid" if row.validation_code == VALID else "invalid",
            row.validation_code,
            int(row.block_number),
            parse_time(row.committed_at),
        )

    async def wait_for(self, tx_id: str) -> TxStatus:
        """The status once ``tx_id`` is committed (valid or not). A transaction not yet
        seen is waited for too (it may still be on its way): bound the wait with
        ``asyncio.timeout``."""
        while True:
            signal = self._block_signal
            status = await self.status(tx_id)
            if status.state in ("valid", "invalid"):
                return status
            await self._wait_for_block(signal)

    # -- blocks ----------------------------------------------------------------------------

    async def _stored_height(self) -> int:
        async with self.engine.connect() as conn:
            last = await conn.scalar(select(func.max(BlockRow.number)))
        return int(last) + 1 if last is not None else 0

    async def _ensure_genesis(self) -> None:
        async with self.engine.connect() as conn:
            if await conn.scalar(select(func.count()).select_from(BlockRow)):
                return
        stamp = format_time(datetime.now(UTC))
        data = block_data([])
        header = BlockHeader(0, GENESIS_PREVIOUS_HASH, sha256_hex(data), stamp)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(BlockRow).values(
                        number=0,
                        previous_hash=header.previous_hash,
                        data_hash=header.data_hash,
                        hash=block_hash(header),
                        committed_at=stamp,
                        data=data,
                    )
                )
        except IntegrityError:
            log.info("another process wrote the genesis block first")

    async def block(self, number: int) -> StoredBlock:
        """A stored block (KeyError when there is none with that number)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(BlockRow).where(BlockRow.number == number))).first()
        if row is None:
            raise KeyError(f"no block {number} (height {self._height})")
        body = json.loads(row.data)
        return StoredBlock(
            header=BlockHeader(row.number, row.previous_hash, row.data_hash, row.committed_at),
            hash=row.hash,
            transactions=tuple(Endorsement.from_block_entry(tx) for tx in body["transactions"]),
        )

    async def verify_chain(self) -> int:
        """Verifies every block's data hash, header hash and link to its predecessor,
        and that the status/event index holds exactly what the blocks say.

        Returns the number of blocks verified; raises :class:`LedgerCorruptedError`
        naming the first block that does not verify and what does not match. The
        index is walked alongside the blocks (two ordered streams), so memory stays
        flat however long the chain.
        """
        expected = 0
        previous_hash = GENESIS_PREVIOUS_HASH
        blocks_query = select(
            BlockRow.number,
            BlockRow.previous_hash,
            BlockRow.data_hash,
            BlockRow.hash,
            BlockRow.committed_at,
            BlockRow.data,
        ).order_by(BlockRow.number)
        index_query = select(*_INDEX_COLUMNS).order_by(
            TransactionRow.block_number, TransactionRow.tx_number
        )
        async with self.engine.connect() as blocks_conn, self.engine.connect() as index_conn:
            blocks = await blocks_conn.stream(blocks_query.execution_options(yield_per=200))
            index_rows = await index_conn.stream(index_query.execution_options(yield_per=500))
            index = aiter(index_rows)
            indexed = await anext(index, None)
            async for row in blocks:
                number = int(row.number)
                if number != expected:
                    raise LedgerCorruptedError(
                        expected, f"block {expected} is missing (the next stored is {number})"
                    )
                _verify_block(row, previous_hash)
                for want in _index_entries(number, bytes(row.data), row.committed_at):
                    if indexed is None or tuple(indexed) != want:
                        raise LedgerCorruptedError(
                            number,
                            f"the status index of tx {want[0]} (tx {want[2]}) does not match "
                            f"the block: index has {_describe(indexed)}",
                        )
                    indexed = await anext(index, None)
                if indexed is not None and int(indexed[1]) <= number:
                    raise LedgerCorruptedError(
                        number, f"the status index has tx {indexed[0]}, which the block lacks"
                    )
                previous_hash = row.hash
                expected += 1
        if expected == 0:
            raise LedgerCorruptedError(0, "the ledger has no genesis block")
        if indexed is not None:
            raise LedgerCorruptedError(
                int(indexed[1]), f"the status index has tx {indexed[0]} in a block that is missing"
            )
        return expected

    # -- events ----------------------------------------------------------------------------

    def events(
        self,
        *,
        start_block: int | None = None,
        after: Checkpoint | None = None,
        chaincode: str | None = None,
        event_names: Collection[str] = (),
    ) -> AsyncGenerator[LedgerEvent, None]:
        """Chaincode events of valid transactions in ledger order, then new ones as
        blocks commit (the iterator never ends by itself: break or cancel).

        From ``start_block`` (inclusive; at most the height, i.e. the next block), or
        right after the checkpoint ``after``, or — neither given — from the next block
        committed after this call. Every event comes once, none is skipped: the
        position is a (block, tx number) pair that only grows.
        """
        if start_block is not None and after is not None:
            raise ValueError("give start_block or after, not both")
        position: tuple[int, int] | None
        if start_block is not None:
            if not 0 <= start_block <= self._height:
                raise OutOfRange(
                    f"start block {start_block} is beyond the ledger (height {self._height})"
                )
            position = (start_block, -1)
        elif after is not None:
            if not 0 <= after.block_number < self._height:
                raise OutOfRange(
                    f"checkpoint block {after.block_number} is not in the ledger "
                    f"(height {self._height})"
                )
            position = None if after.tx_id else (after.block_number + 1, -1)
        else:
            position = (self._height, -1)
        return self._iter_events(position, after, chaincode, tuple(event_names))

    async def _iter_events(
        self,
        position: tuple[int, int] | None,
        after: Checkpoint | None,
        chaincode: str | None,
        event_names: tuple[str, ...],
    ) -> AsyncGenerator[LedgerEvent, None]:
        if position is None:
            assert after is not None
            position = await self._checkpoint_position(after)
        while True:
            signal = self._block_signal  # taken before reading: no commit goes unnoticed
            events = await self._read_events(position, chaincode, event_names)
            for event in events:
                position = (event.block_number, event.tx_number)
                yield event
            if not events:
                await self._wait_for_block(signal)

    async def _checkpoint_position(self, after: Checkpoint) -> tuple[int, int]:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(TransactionRow.block_number, TransactionRow.tx_number).where(
                        TransactionRow.tx_id == after.tx_id
                    )
                )
            ).first()
        if row is None or row.block_number != after.block_number:
            where = "unknown" if row is None else f"in block {row.block_number}"
            raise InvalidCheckpoint(
                f"checkpoint tx {after.tx_id} is not in block {after.block_number} ({where})"
            )
        return int(row.block_number), int(row.tx_number)

    async def _read_events(
        self, position: tuple[int, int], chaincode: str | None, event_names: tuple[str, ...]
    ) -> list[LedgerEvent]:
        block, tx = position
        tx_table = TransactionRow
        query = (
            select(
                tx_table.block_number,
                tx_table.tx_number,
                tx_table.tx_id,
                tx_table.chaincode,
                tx_table.event_name,
                tx_table.event_payload,
                tx_table.committed_at,
            )
            .where(
                tx_table.validation_code == VALID,
                tx_table.event_name.is_not(None),
                or_(
                    tx_table.block_number > block,
                    and_(tx_table.block_number == block, tx_table.tx_number > tx),
                ),
            )
            .order_by(tx_table.block_number, tx_table.tx_number)
            .limit(_EVENT_PAGE)
        )
        if chaincode:
            query = query.where(tx_table.chaincode == chaincode)
        if event_names:
            query = query.where(tx_table.event_name.in_(event_names))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            LedgerEvent(
                block_number=int(row.block_number),
                tx_number=int(row.tx_number),
                tx_id=row.tx_id,
                chaincode=row.chaincode,
                name=str(row.event_name),
                payload=bytes(row.event_payload or b""),
                committed_at=parse_time(row.committed_at),
            )
            for row in rows
        ]
