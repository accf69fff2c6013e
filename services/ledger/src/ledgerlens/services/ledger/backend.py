"""The ledger behind one small interface: the embedded dev ledger or a Fabric network.

:class:`LedgerBackend` is what the API, the anchoring logic and the event follower use;
``backend = "dev"`` gives :class:`DevBackend` (over
:class:`~ledgerlens.services.ledger.devledger.DevLedger`, in the service's database),
``backend = "fabric"`` gives :class:`FabricBackend` (over a
:class:`ledgerlens.fabric.Gateway`). Both fail the same way, with the errors of
:mod:`ledgerlens.services.ledger.errors`: a refused endorsement is ABORTED (or the
contract's 400/404/409 as INVALID_ARGUMENT/NOT_FOUND/ALREADY_EXISTS) with every refusing
peer in the ``TransactionFailure`` detail; an invalidated commit is ABORTED with its
validation code after the bounded retries of MVCC/phantom conflicts; a phase that ran
out of time is DEADLINE_EXCEEDED naming the phase; a peer that cannot be reached is
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import grpc
from fabric_protos.peer import transaction_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

import ledgerlens.fabric as fabric
from ledgerlens.fabric.errors import validation_code_name
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.runtime.errors import InvalidArgument
from ledgerlens.services.ledger.contract import AnchoringContract
from ledgerlens.services.ledger.devledger import Checkpoint as DevCheckpoint
from ledgerlens.services.ledger.devledger import (
    DevLedger,
    Endorsement,
    EndorsementRefused,
    InvalidCheckpoint,
    UnknownChaincode,
)
from ledgerlens.services.ledger.devledger import OutOfRange as DevOutOfRange
from ledgerlens.services.ledger.errors import (
    PHASE_COMMIT,
    PHASE_ENDORSE,
    PHASE_EVALUATE,
    PHASE_SUBMIT,
    EndorserRefusal,
    OutOfRange,
    Phase,
    TransactionError,
    TxAborted,
    TxDeadlineExceeded,
    TxFailure,
    TxUnavailable,
    refusal_error,
)
from ledgerlens.services.ledger.settings import FabricSettings, Settings

__all__ = [
    "RETRYABLE_CODES",
    "BackendEvent",
    "CommitInfo",
    "DevBackend",
    "EventPosition",
    "FabricBackend",
    "LedgerBackend",
    "SkipWhen",
    "Submitted",
    "TxState",
    "create_backend",
]

log = logging.getLogger(__name__)

TxState = Literal["unknown", "pending", "valid", "invalid"]

#: validation codes worth a fresh endorse → submit → commit round: the state moved.
RETRYABLE_CODES: Final = frozenset(
    {
        validation_code_name(transaction_pb2.MVCC_READ_CONFLICT),
        validation_code_name(transaction_pb2.PHANTOM_READ_CONFLICT),
    }
)
DEV_PEER_ADDRESS: Final = "devledger"
_READY_WAIT: Final = 1.0
_MAX_REMEMBERED_SUBMITS: Final = 100_000


@dataclass(frozen=True)
class CommitInfo:
    """Where a transaction stands. ``committed_at`` is None when the backend cannot say
    (Fabric's Gateway reports the block, not its time)."""

    tx_id: str
    state: TxState
    validation_code: str = ""
    block_number: int | None = None
    committed_at: datetime | None = None


@dataclass(frozen=True)
class Submitted:
    """A submitted transaction: the function's result and its commit status.

    ``submitted`` is False when ``skip_when`` judged the endorsement result enough (e.g.
    the record was already anchored): nothing went to the orderer, ``status`` is unknown.
    """

    tx_id: str
    result: bytes
    status: CommitInfo
    attempts: int = 1
    submitted: bool = True


@dataclass(frozen=True)
class EventPosition:
    """The last event processed (the proto's ``Checkpoint``)."""

    block_number: int
    tx_id: str = ""


@dataclass(frozen=True)
class BackendEvent:
    block_number: int
    tx_id: str
    chaincode: str
    name: str
    payload: bytes
    committed_at: datetime | None

    @property
    def position(self) -> EventPosition:
        return EventPosition(self.block_number, self.tx_id)


SkipWhen = Callable[[bytes], bool]


class LedgerBackend(Protocol):
    """A ledger with Fabric's transaction flow, on one channel."""

    #: ``dev`` or ``fabric``.
    kind: str
    channel: str

    def has_chaincode(self, name: str) -> bool:
        """Whether ``name`` can be invoked (the dev ledger knows; Fabric is asked later)."""
        ...

    async def submit(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes],
        *,
        transient: Mapping[str, bytes] | None = None,
        endorsing_organizations: Sequence[str] = (),
        wait: bool = True,
        skip_when: SkipWhen | None = None,
    ) -> Submitted:
        """Endorse, submit and (``wait``) wait for a valid commit, retrying conflicts."""
        ...

    async def evaluate(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes],
        *,
        transient: Mapping[str, bytes] | None = None,
    ) -> bytes: ...

    async def commit_status(
        self, tx_id: str, *, wait: bool = False, wait_seconds: float | None = None
    ) -> CommitInfo: ...

    def events(
        self,
        chaincode: str,
        *,
        start_block: int | None = None,
        after: EventPosition | None = None,
        event_names: Collection[str] = (),
    ) -> AsyncIterator[BackendEvent]:
        """Chaincode events of valid transactions in ledger order, tailing new blocks;
        from ``start_block``, right after ``after``, or (neither) the next block."""
        ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


def _timeout_error(
    phase: Phase, tx_id: str, seconds: float | None, attempts: int = 1
) -> TxDeadlineExceeded:
    failure = TxFailure(phase=phase, tx_id=tx_id, attempts=attempts)
    within = f" within {seconds:g}s" if seconds is not None else ""
    error = TxDeadlineExceeded(
        f"the {failure.phase_name} phase of tx {tx_id} did not finish{within}",
        reason=f"{failure.phase_name.upper()}_TIMEOUT",
    )
    error.with_failure(failure)
    return error


def _invalidated(tx_id: str, code: str, block: int | None, attempts: int) -> TxAborted:
    where = f" in block {block}" if block is not None else ""
    error = TxAborted(
        f"transaction {tx_id} was invalidated with {code}{where} after {attempts} attempt(s)",
        reason="TRANSACTION_INVALIDATED",
        metadata={"validation_code": code},
    )
    error.with_failure(
        TxFailure(phase=PHASE_COMMIT, tx_id=tx_id, validation_code=code, attempts=attempts)
    )
    return error


# -- the dev ledger ------------------------------------------------------------------------


class DevBackend:
    """The embedded dev ledger: one endorsing peer (``DEV_PEER_ADDRESS``, ``msp_id``)."""

    kind = "dev"

    def __init__(
        self,
        ledger: DevLedger,
        *,
        chaincodes: Collection[str] = (AnchoringContract.name,),
        msp_id: str = "DevLedgerMSP",
        max_attempts: int = 3,
        commit_timeout: float = 30.0,
    ) -> None:
        self.ledger = ledger
        self._chaincodes = frozenset(chaincodes)
        self.channel = ledger.channel
        self._msp_id = msp_id
        self._max_attempts = max_attempts
        self._commit_timeout = commit_timeout

    @classmethod
    async def open(cls, engine: AsyncEngine, settings: Settings) -> DevBackend:
        ledger = await DevLedger.open(
            engine,
            [AnchoringContract()],
            channel=settings.channel,
            batch_timeout=settings.dev.block_linger_seconds,
            max_batch_size=settings.dev.max_block_transactions,
            poll_interval=settings.dev.poll_interval_seconds,
        )
        return cls(
            ledger,
            msp_id=ledger.msp_id,
            max_attempts=settings.dev.max_attempts,
            commit_timeout=settings.dev.commit_timeout_seconds,
        )

    def has_chaincode(self, name: str) -> bool:
        return name in self._chaincodes

    def _refused(self, exc: EndorsementRefused, phase: Phase) -> TransactionError:
        message = f"chaincode response {exc.status}, {exc.message}"
        return refusal_error(
            phase,
            exc.tx_id,
            [EndorserRefusal(DEV_PEER_ADDRESS, self._msp_id, message)],
            "failed to endorse transaction",
        )

    async def _simulate(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes],
        transient: Mapping[str, bytes] | None,
        phase: Phase,
    ) -> Endorsement:
        try:
            return await self.ledger.simulate(chaincode, function, args, transient)
        except EndorsementRefused as exc:
            raise self._refused(exc, phase) from exc
        except UnknownChaincode as exc:
            raise InvalidArgument(str(exc), [("chaincode", str(exc))]) from exc

    async def submit(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes],
        *,
        transient: Mapping[str, bytes] | None = None,
        endorsing_organizations: Sequence[str] = (),
        wait: bool = True,
        skip_when: SkipWhen | None = None,
    ) -> Submitted:
        unknown = [org for org in endorsing_organizations if org != self._msp_id]
        if unknown:
            raise InvalidArgument(
                f"the dev ledger has one organisation, {self._msp_id}; unknown: {unknown}",
                [("endorsing_organizations", f"only {self._msp_id} endorses on the dev ledger")],
            )
        attempt = 0
        while True:
            attempt += 1
            endorsement = await self._simulate(chaincode, function, args, transient, PHASE_ENDORSE)
            tx_id = endorsement.tx_id
            if skip_when is not None and skip_when(endorsement.result):
                return Submitted(
                    tx_id, endorsement.result, CommitInfo(tx_id, "unknown"), attempt, False
                )
            await self.ledger.submit(endorsement)
            if not wait:
                return Submitted(tx_id, endorsement.result, CommitInfo(tx_id, "pending"), attempt)
            status = await self.commit_status(tx_id, wait=True)
            if status.state == "valid":
                return Submitted(tx_id, endorsement.result, status, attempt)
            if status.validation_code in RETRYABLE_CODES and attempt < self._max_attempts:
                log.info("tx %s: %s, retrying (%d)", tx_id, status.validation_code, attempt)
                continue
            raise _invalidated(tx_id, status.validation_code, status.block_number, attempt)

    async def evaluate(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes],
        *,
        transient: Mapping[str, bytes] | None = None,
    ) -> bytes:
        endorsement = await self._simulate(chaincode, function, args, transient, PHASE_EVALUATE)
        return bytes(endorsement.result)

    async def commit_status(
        self, tx_id: str, *, wait: bool = False, wait_seconds: float | None = None
    ) -> CommitInfo:
        if wait:
            limit = wait_seconds if wait_seconds is not None else self._commit_timeout
            try:
                async with asyncio.timeout(limit):
                    status = await self.ledger.wait_for(tx_id)
            except TimeoutError:
                raise _timeout_error(PHASE_COMMIT, tx_id, limit) from None
        else:
            status = await self.ledger.status(tx_id)
        return CommitInfo(
            tx_id,
            status.state,
            status.validation_code or "",
            status.block_number,
            status.committed_at,
        )

    async def events(
        self,
        chaincode: str,
        *,
        start_block: int | None = None,
        after: EventPosition | None = None,
        event_names: Collection[str] = (),
    ) -> AsyncIterator[BackendEvent]:
        try:
            stream = self.ledger.events(
                start_block=start_block,
                after=DevCheckpoint(after.block_number, after.tx_id) if after else None,
                chaincode=chaincode,
                event_names=event_names,
            )
        except DevOutOfRange as exc:
            raise OutOfRange(str(exc), reason="BEYOND_LEDGER_HEIGHT") from exc
        try:
            async for event in _checked_dev_events(stream):
                yield BackendEvent(
                    event.block_number,
                    event.tx_id,
                    event.chaincode,
                    event.name,
                    event.payload,
                    event.committed_at,
                )
        finally:
            await stream.aclose()

    async def ready(self) -> bool:
        return True  # the dev ledger is the database: its check covers it

    async def close(self) -> None:
        await self.ledger.close()


async def _checked_dev_events(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        async for event in stream:
            yield event
    except InvalidCheckpoint as exc:
        raise InvalidArgument(str(exc), [("after.tx_id", str(exc))]) from exc


# -- Fabric -----------------------------------------------------------------------------------


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise RuntimeError(f"cannot read the {what} {path!r}: {exc}") from exc


def _phase_of(error: fabric.GatewayError) -> Phase:
    phase = getattr(error, "phase", "")
    return {
        "evaluate": PHASE_EVALUATE,
        "endorse": PHASE_ENDORSE,
        "submit": PHASE_SUBMIT,
        "commit": PHASE_COMMIT,
    }.get(phase, ledger_pb2.TRANSACTION_PHASE_UNSPECIFIED)  # e.g. the event stream


def _map_gateway_error(exc: fabric.GatewayError, timeout: float | None = None) -> TransactionError:
    """A Gateway failure as the proto says it must look."""
    phase = _phase_of(exc)
    tx_id = exc.tx_id or ""
    if isinstance(exc, fabric.GatewayTimeout):
        return _timeout_error(phase, tx_id, timeout)
    endorsers = [EndorserRefusal(d.address, d.msp_id, d.message) for d in exc.details]
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        error = TxUnavailable(
            f"the gateway peer is unreachable ({exc.phase}): {exc.message}",
            retry_after=1.0,
            reason="PEER_UNAVAILABLE",
        )
        error.with_failure(TxFailure(phase=phase, tx_id=tx_id, endorsers=tuple(endorsers)))
        return error
    if phase in (PHASE_ENDORSE, PHASE_EVALUATE):
        return refusal_error(phase, tx_id, endorsers, f"{exc.phase} failed: {exc.message}")
    reason = exc.phase.upper().replace(" ", "_") + "_FAILED"
    return TxAborted(f"{exc.phase} failed: {exc.message}", reason=reason).with_failure(
        TxFailure(phase=phase, tx_id=tx_id, endorsers=tuple(endorsers))
    )


class FabricBackend:
    """A Fabric network through its Gateway peer, as one enrolled identity.

    Transactions go step by step (endorse → submit → commit status) rather than through
    ``Contract.submit`` so an already-anchored result can skip the orderer and an async
    submit can return after the orderer took it; MVCC/phantom conflicts are retried
    here, at most ``max_attempts`` rounds.
    """

    kind = "fabric"

    def __init__(self, gateway: fabric.Gateway, channel: str, settings: FabricSettings) -> None:
        self.gateway = gateway
        self.channel = channel
        self.network = gateway.network(channel)
        self._settings = settings
        # Fabric's CommitStatus waits for transactions it has not seen: whether an
        # uncommitted tx is pending or unknown is only known for the ones sent from here
        # (bounded: async submits whose status nobody asks for must not pile up)
        self._submitted: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> FabricBackend:
        f = settings.fabric
        missing = [
            name
            for name in ("peer_address", "msp_id", "certificate_path", "private_key_path")
            if not getattr(f, name)
        ]
        if missing:
            raise RuntimeError(
                "backend=fabric needs LEDGERLENS_LEDGER_FABRIC__"
                + ", LEDGERLENS_LEDGER_FABRIC__".join(m.upper() for m in missing)
            )
        identity = fabric.load_identity(f.msp_id, f.certificate_path)
        signer = fabric.load_signer(f.private_key_path)
        channel = fabric.connect(
            f.peer_address,
            tls_root_certificates=_read(f.tls_root_certificates_path, "TLS root certificates"),
            client_certificate=_read(f.tls_client_certificate_path, "TLS client certificate"),
            client_key=_read(f.tls_client_key_path, "TLS client key"),
            server_name_override=f.tls_server_name_override,
        )
        gateway = fabric.Gateway(
            channel,
            identity,
            signer,
            timeouts=fabric.Timeouts(
                evaluate=f.evaluate_timeout_seconds,
                endorse=f.endorse_timeout_seconds,
                submit=f.submit_timeout_seconds,
                commit_status=f.commit_timeout_seconds,
            ),
            retry=fabric.RetryPolicy(max_attempts=f.max_attempts),
        )
        return cls(gateway, settings.channel, f)

    def has_chaincode(self, name: str) -> bool:
        return True  # the peer knows; an unknown chaincode is its refusal

    def _remember_submitted(self, tx_id: str) -> None:
        self._submitted[tx_id] = None
        while len(self._submitted) > _MAX_REMEMBERED_SUBMITS:
            self._submitted.popitem(last=False)

    def _timeout_for(self, exc: fabric.GatewayError) -> float:
        s = self._settings
        return {
            "evaluate": s.evaluate_timeout_seconds,
            "endorse": s.endorse_timeout_seconds,
            "submit": s.submit_timeout_seconds,
            "commit": s.commit_timeout_seconds,
        }.get(getattr(exc, "phase", ""), s.endorse_timeout_seconds)

    async def submit(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes],
        *,
        transient: Mapping[str, bytes] | None = None,
        endorsing_organizations: Sequence[str] = (),
        wait: bool = True,
        skip_when: SkipWhen | None = None,
    ) -> Submitted:
        contract = self.network.contract(chaincode)
        attempt = 0
        while True:
            attempt += 1
            proposal = contract.new_proposal(
                function,
                list(args),
                transient=transient,
                endorsing_organizations=endorsing_organizations,
            )
            try:
                transaction = await proposal.endorse()
                result = bytes(transaction.result)
                if skip_when is not None and skip_when(result):
                    return Submitted(
                        proposal.tx_id,
                        result,
                        CommitInfo(proposal.tx_id, "unknown"),
                        attempt,
                        False,
                    )
                commit = await transaction.submit()
                self._remember_submitted(commit.tx_id)
                if not wait:
                    return Submitted(
                        commit.tx_id, result, CommitInfo(commit.tx_id, "pending"), attempt
                    )
                status = await commit.status()
            except fabric.GatewayError as exc:
                error = _map_gateway_error(exc, self._timeout_for(exc))
                if error.failure is not None:
                    error.with_failure(
                        TxFailure(
                            phase=error.failure.phase,
                            tx_id=error.failure.tx_id or proposal.tx_id,
                            endorsers=error.failure.endorsers,
                            attempts=attempt,
                        )
                    )
                raise error from exc
            assert status is not None  # wait=True always yields a status
            info = self._info(status)
            self._submitted.pop(info.tx_id, None)
            if info.state == "valid":
                return Submitted(info.tx_id, result, info, attempt)
            if info.validation_code in RETRYABLE_CODES and attempt < self._settings.max_attempts:
                log.info("tx %s: %s, retrying (%d)", info.tx_id, info.validation_code, attempt)
                continue
            raise _invalidated(info.tx_id, info.validation_code, info.block_number, attempt)

    @staticmethod
    def _info(status: fabric.CommitStatus) -> CommitInfo:
        return CommitInfo(
            status.tx_id,
            "valid" if status.successful else "invalid",
            status.validation_code_name,
            status.block_number,
            None,
        )

    async def evaluate(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes],
        *,
        transient: Mapping[str, bytes] | None = None,
    ) -> bytes:
        try:
            return await self.network.contract(chaincode).evaluate(
                function, list(args), transient=transient
            )
        except fabric.GatewayError as exc:
            raise _map_gateway_error(exc, self._settings.evaluate_timeout_seconds) from exc

    async def commit_status(
        self, tx_id: str, *, wait: bool = False, wait_seconds: float | None = None
    ) -> CommitInfo:
        commit = self.network.commit_for(tx_id)
        limit = wait_seconds if wait_seconds is not None else self._settings.commit_timeout_seconds
        try:
            status = await commit.status(wait=wait, deadline=limit)
        except fabric.GatewayError as exc:
            raise _map_gateway_error(exc, limit) from exc
        if status is None:
            return CommitInfo(tx_id, "pending" if tx_id in self._submitted else "unknown")
        self._submitted.pop(tx_id, None)
        return self._info(status)

    async def events(
        self,
        chaincode: str,
        *,
        start_block: int | None = None,
        after: EventPosition | None = None,
        event_names: Collection[str] = (),
    ) -> AsyncIterator[BackendEvent]:
        names = frozenset(event_names)
        stream = self.network.chaincode_events(
            chaincode,
            start_block=start_block,
            after=fabric.Checkpoint(after.block_number, after.tx_id) if after else None,
        )
        try:
            async with stream:
                async for event in stream:
                    if names and event.name not in names:
                        continue
                    yield BackendEvent(
                        event.block_number,
                        event.tx_id,
                        event.chaincode,
                        event.name,
                        event.payload,
                        None,
                    )
        except fabric.GatewayError as exc:
            raise _map_gateway_error(exc) from exc

    async def ready(self) -> bool:
        # connects if idle; a peer that does not answer within the check is not ready
        try:
            await asyncio.wait_for(self.gateway.channel.channel_ready(), _READY_WAIT)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        await self.gateway.channel.close(None)


async def create_backend(settings: Settings, engine: AsyncEngine) -> LedgerBackend:
    """The backend ``settings.backend`` names (the dev ledger lives in ``engine``)."""
    if settings.backend == "fabric":
        return FabricBackend.from_settings(settings)
    return await DevBackend.open(engine, settings)
