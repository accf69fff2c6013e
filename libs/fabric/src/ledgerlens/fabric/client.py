"""Gateway → Network → Contract, and the step-by-step transaction objects.

The flow is the official clients' (proposal → endorse → sign prepared transaction →
submit → commit status), with each step an object so a caller can stop between steps:
sign offline (the gateway has no key), submit now and ask the commit status later, or
keep the commit request to poll again after a restart. ``Contract.submit`` chains the
steps and, beyond the official clients, retries the whole round on retryable
validation codes (MVCC and phantom read conflicts).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from fabric_protos.gateway import gateway_pb2, gateway_pb2_grpc
from fabric_protos.peer import proposal_pb2, transaction_pb2

from ledgerlens.fabric import errors, protocol
from ledgerlens.fabric.events import (
    ChaincodeEvent,
    ChaincodeEventStream,
    Checkpoint,
    ReconnectPolicy,
    backoff_retrying,
)
from ledgerlens.fabric.identity import Identity, Signer, digest

__all__ = [
    "ChaincodeEvent",
    "ChaincodeEventStream",
    "Checkpoint",
    "Commit",
    "CommitStatus",
    "Contract",
    "Gateway",
    "Network",
    "Proposal",
    "ReconnectPolicy",
    "RetryPolicy",
    "SubmitResult",
    "Timeouts",
    "Transaction",
]

T = TypeVar("T")

_RETRYABLE_CODES = frozenset(
    {transaction_pb2.MVCC_READ_CONFLICT, transaction_pb2.PHANTOM_READ_CONFLICT}
)


@dataclass(frozen=True)
class Timeouts:
    """Deadline of each phase, in seconds. Commit status waits for a block to be cut
    and validated, so it gets the longest."""

    evaluate: float = 5.0
    endorse: float = 15.0
    submit: float = 5.0
    commit_status: float = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """How ``Contract.submit`` retries a transaction the peers invalidated with a
    retryable code: a fresh proposal each time (a tx id is single-use), at most
    ``max_attempts`` rounds, exponential backoff with jitter between them."""

    max_attempts: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    retry_on: frozenset[int] = _RETRYABLE_CODES

    @classmethod
    def never(cls) -> RetryPolicy:
        return cls(max_attempts=1)


@dataclass(frozen=True)
class CommitStatus:
    """The validation outcome of a committed transaction."""

    tx_id: str
    validation_code: int
    block_number: int

    @property
    def validation_code_name(self) -> str:
        return errors.validation_code_name(self.validation_code)

    @property
    def successful(self) -> bool:
        return bool(self.validation_code == transaction_pb2.VALID)


@dataclass(frozen=True)
class SubmitResult:
    """A committed transaction: the chaincode's result and where it landed."""

    result: bytes
    tx_id: str
    block_number: int
    status: CommitStatus
    attempts: int = 1


async def _call(
    phase: str,
    error_type: type[errors.GatewayError],
    timeout_type: type[errors.GatewayTimeout],
    tx_id: str | None,
    call: Awaitable[T],
) -> T:
    """Maps a failed RPC to the phase's exception, keeping the peers' error details."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise timeout_type(
                f"the {phase} deadline expired: {exc.details()}", phase=phase, tx_id=tx_id
            ) from exc
        raise error_type.from_rpc_error(exc, tx_id=tx_id) from exc


def _require_signature(signature: bytes, what: str) -> None:
    if not signature:
        raise ValueError(
            f"the {what} is not signed: the gateway has no signer, so sign its digest() "
            "and use with_signature()"
        )


class Gateway:
    """A connection to a Fabric Gateway peer as one client identity.

    ``signer=None`` means offline signing: every step object comes back unsigned and
    the caller signs ``digest()`` and calls ``with_signature``. The gateway does not own
    ``channel``; close it yourself (or use ``async with`` on the gateway, which does).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        identity: Identity,
        signer: Signer | None = None,
        *,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        reconnect: ReconnectPolicy | None = None,
    ) -> None:
        self.channel = channel
        self.identity = identity
        self.signer = signer
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.reconnect = reconnect or ReconnectPolicy()
        self.stub = gateway_pb2_grpc.GatewayStub(channel)
        self._creator = identity.serialized()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close(None)

    @property
    def creator(self) -> bytes:
        """The serialised identity every request carries."""
        return self._creator

    def sign(self, message: bytes) -> bytes:
        """The signer's signature over SHA-256(``message``), or b"" without a signer."""
        return self.signer.sign(digest(message)) if self.signer is not None else b""

    def network(self, name: str) -> Network:
        return Network(self, name)

    def commit_for(self, channel: str, tx_id: str) -> Commit:
        """A commit-status request for a transaction submitted earlier (maybe by another
        process), signed if the gateway has a signer."""
        request = protocol.commit_status_request(channel, tx_id, self._creator)
        return Commit(
            self,
            tx_id,
            gateway_pb2.SignedCommitStatusRequest(request=request, signature=self.sign(request)),
        )

    # Rebuilding step objects from bytes: the other half of offline signing, where the
    # bytes travel to the key holder and back.
    def proposal_from_bytes(self, data: bytes) -> Proposal:
        """A :class:`Proposal` from ``Proposal.bytes()`` (keeps any signature)."""
        return Proposal(self, gateway_pb2.ProposedTransaction.FromString(data))

    def transaction_from_bytes(self, data: bytes, channel: str) -> Transaction:
        """A :class:`Transaction` from ``Transaction.bytes()`` (keeps any signature)."""
        return Transaction(self, channel, gateway_pb2.PreparedTransaction.FromString(data))

    def commit_from_bytes(self, data: bytes) -> Commit:
        """A :class:`Commit` from ``Commit.bytes()`` (keeps any signature)."""
        signed = gateway_pb2.SignedCommitStatusRequest.FromString(data)
        request = gateway_pb2.CommitStatusRequest.FromString(signed.request)
        return Commit(self, request.transaction_id, signed)


class Network:
    """One channel of the Fabric network, as seen through the gateway."""

    def __init__(self, gateway: Gateway, name: str) -> None:
        self.gateway = gateway
        self.name = name

    def contract(self, chaincode: str) -> Contract:
        return Contract(self, chaincode)

    def commit_for(self, tx_id: str) -> Commit:
        return self.gateway.commit_for(self.name, tx_id)

    def chaincode_events(
        self,
        chaincode: str,
        *,
        start_block: int | None = None,
        after: Checkpoint | None = None,
        reconnect: ReconnectPolicy | None = None,
    ) -> ChaincodeEventStream:
        """The chaincode's events, block by block, as an async iterator.

        Starts at ``start_block``, or just after the event ``after`` points at (a
        checkpoint saved from an earlier stream), or else at the next block committed.
        When the peer goes away (restart, network blip) the stream reconnects from its
        last checkpoint under ``reconnect``, so no event is lost or delivered twice.
        """
        if start_block is not None and after is not None:
            raise ValueError("give start_block or after (a checkpoint), not both")
        gateway = self.gateway
        if gateway.signer is None:
            raise ValueError("chaincode events need a gateway with a signer")
        position = (
            after
            if after is not None
            else (Checkpoint(start_block) if start_block is not None else None)
        )

        def open_stream(checkpoint: Checkpoint | None) -> Any:
            request = protocol.chaincode_events_request(
                self.name,
                chaincode,
                gateway.creator,
                start_block=checkpoint.block_number if checkpoint else None,
                after_tx_id=checkpoint.tx_id if checkpoint else "",
            )
            signed = gateway_pb2.SignedChaincodeEventsRequest(
                request=request, signature=gateway.sign(request)
            )
            return gateway.stub.ChaincodeEvents(signed)

        return ChaincodeEventStream(open_stream, position, reconnect or gateway.reconnect)


class Contract:
    """A chaincode on a channel: evaluate (query), submit (transact), or step by step."""

    def __init__(self, network: Network, chaincode: str) -> None:
        self.network = network
        self.gateway = network.gateway
        self.chaincode = chaincode

    def new_proposal(
        self,
        function: str,
        args: Sequence[bytes | str] = (),
        *,
        transient: Mapping[str, bytes] | None = None,
        endorsing_organizations: Sequence[str] = (),
    ) -> Proposal:
        """A proposal to run ``function(*args)``, signed if the gateway has a signer.

        ``transient`` data reaches the chaincode but is not recorded on the ledger;
        ``endorsing_organizations`` (MSP ids) pins who endorses, as private data needs.
        """
        tx_id, proposal_bytes = protocol.build_proposal(
            channel=self.network.name,
            chaincode=self.chaincode,
            function=function,
            args=args,
            creator=self.gateway.creator,
            transient=transient,
        )
        proposed = gateway_pb2.ProposedTransaction(
            transaction_id=tx_id,
            proposal=proposal_pb2.SignedProposal(
                proposal_bytes=proposal_bytes,
                signature=self.gateway.sign(proposal_bytes),
            ),
            endorsing_organizations=list(endorsing_organizations),
        )
        return Proposal(self.gateway, proposed)

    async def evaluate(
        self,
        function: str,
        args: Sequence[bytes | str] = (),
        *,
        transient: Mapping[str, bytes] | None = None,
        target_organizations: Sequence[str] = (),
    ) -> bytes:
        """Runs ``function`` on one peer without ordering it; returns its result."""
        proposal = self.new_proposal(
            function, args, transient=transient, endorsing_organizations=target_organizations
        )
        return await proposal.evaluate()

    async def submit(
        self,
        function: str,
        args: Sequence[bytes | str] = (),
        *,
        transient: Mapping[str, bytes] | None = None,
        endorsing_organizations: Sequence[str] = (),
        retry: RetryPolicy | None = None,
    ) -> SubmitResult:
        """Endorses, submits and waits for the commit; raises :class:`CommitError` if
        the transaction is invalidated with a non-retryable code or the retries run out
        (its ``attempts`` says how many rounds were made)."""
        if self.gateway.signer is None:
            raise ValueError("submit needs a gateway with a signer; sign step by step instead")
        policy = retry or self.gateway.retry
        retrying = backoff_retrying(
            policy.max_attempts,
            policy.initial_backoff,
            policy.max_backoff,
            lambda e: isinstance(e, errors.CommitError) and e.validation_code in policy.retry_on,
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    result = await self._submit_once(
                        function, args, transient, endorsing_organizations
                    )
                    return SubmitResult(
                        result=result[0],
                        tx_id=result[1].tx_id,
                        block_number=result[1].block_number,
                        status=result[1],
                        attempts=attempts,
                    )
        except errors.CommitError as exc:
            raise errors.CommitError(
                exc.tx_id or "", exc.validation_code, exc.block_number, attempts
            ) from exc
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def _submit_once(
        self,
        function: str,
        args: Sequence[bytes | str],
        transient: Mapping[str, bytes] | None,
        endorsing_organizations: Sequence[str],
    ) -> tuple[bytes, CommitStatus]:
        proposal = self.new_proposal(
            function, args, transient=transient, endorsing_organizations=endorsing_organizations
        )
        transaction = await proposal.endorse()
        commit = await transaction.submit()
        status = await commit.status()
        assert status is not None  # wait=True always yields a status
        if not status.successful:
            raise errors.CommitError(status.tx_id, status.validation_code, status.block_number)
        return transaction.result, status


class Proposal:
    """A transaction proposal: evaluate it, or endorse it into a :class:`Transaction`."""

    def __init__(self, gateway: Gateway, proposed: Any) -> None:
        self.gateway = gateway
        self._proposed = proposed  # gateway_pb2.ProposedTransaction
        self._contents = protocol.read_proposal(proposed.proposal.proposal_bytes)

    @property
    def tx_id(self) -> str:
        return str(self._proposed.transaction_id)

    @property
    def channel(self) -> str:
        return self._contents.channel

    @property
    def signature(self) -> builtins.bytes:
        return bytes(self._proposed.proposal.signature)

    def bytes(self) -> builtins.bytes:
        """Serialised ``gateway.ProposedTransaction`` (for :meth:`Gateway.proposal_from_bytes`)."""
        return builtins.bytes(self._proposed.SerializeToString())

    def digest(self) -> builtins.bytes:
        """What to sign: SHA-256 of the proposal bytes."""
        return digest(self._proposed.proposal.proposal_bytes)

    def with_signature(self, signature: builtins.bytes) -> Proposal:
        proposed = gateway_pb2.ProposedTransaction()
        proposed.CopyFrom(self._proposed)
        proposed.proposal.signature = signature
        return Proposal(self.gateway, proposed)

    async def evaluate(self, *, deadline: float | None = None) -> builtins.bytes:
        _require_signature(self.signature, "proposal")
        request = gateway_pb2.EvaluateRequest(
            transaction_id=self.tx_id,
            channel_id=self.channel,
            proposed_transaction=self._proposed.proposal,
            target_organizations=list(self._proposed.endorsing_organizations),
        )
        response = await _call(
            "evaluate",
            errors.EvaluateError,
            errors.EvaluateTimeout,
            self.tx_id,
            self.gateway.stub.Evaluate(request, timeout=deadline or self.gateway.timeouts.evaluate),
        )
        return bytes(response.result.payload)

    async def endorse(self, *, deadline: float | None = None) -> Transaction:
        """Collects endorsements; returns the prepared transaction (signed if the
        gateway has a signer)."""
        _require_signature(self.signature, "proposal")
        request = gateway_pb2.EndorseRequest(
            transaction_id=self.tx_id,
            channel_id=self.channel,
            proposed_transaction=self._proposed.proposal,
            endorsing_organizations=list(self._proposed.endorsing_organizations),
        )
        response = await _call(
            "endorse",
            errors.EndorseError,
            errors.EndorseTimeout,
            self.tx_id,
            self.gateway.stub.Endorse(request, timeout=deadline or self.gateway.timeouts.endorse),
        )
        envelope = response.prepared_transaction
        envelope.signature = self.gateway.sign(envelope.payload)
        prepared = gateway_pb2.PreparedTransaction(transaction_id=self.tx_id, envelope=envelope)
        return Transaction(self.gateway, self.channel, prepared)


class Transaction:
    """An endorsed transaction, ready to be signed and submitted for ordering."""

    def __init__(self, gateway: Gateway, channel: str, prepared: Any) -> None:
        self.gateway = gateway
        self.channel = channel
        self._prepared = prepared  # gateway_pb2.PreparedTransaction
        self.result = protocol.transaction_result(prepared.envelope)

    @property
    def tx_id(self) -> str:
        return str(self._prepared.transaction_id)

    @property
    def signature(self) -> builtins.bytes:
        return bytes(self._prepared.envelope.signature)

    def bytes(self) -> builtins.bytes:
        """Serialised ``gateway.PreparedTransaction``."""
        return builtins.bytes(self._prepared.SerializeToString())

    def digest(self) -> builtins.bytes:
        """What to sign: SHA-256 of the envelope payload."""
        return digest(self._prepared.envelope.payload)

    def with_signature(self, signature: builtins.bytes) -> Transaction:
        prepared = gateway_pb2.PreparedTransaction()
        prepared.CopyFrom(self._prepared)
        prepared.envelope.signature = signature
        return Transaction(self.gateway, self.channel, prepared)

    def commit(self) -> Commit:
        """The commit-status request for this transaction (signed if possible); built
        before submitting so the status can be asked for even if the caller restarts."""
        return self.gateway.commit_for(self.channel, self.tx_id)

    async def submit(self, *, deadline: float | None = None) -> Commit:
        """Sends the transaction to be ordered; returns without waiting for the commit."""
        _require_signature(self.signature, "transaction")
        commit = self.commit()
        request = gateway_pb2.SubmitRequest(
            transaction_id=self.tx_id,
            channel_id=self.channel,
            prepared_transaction=self._prepared.envelope,
        )
        await _call(
            "submit",
            errors.SubmitError,
            errors.SubmitTimeout,
            self.tx_id,
            self.gateway.stub.Submit(request, timeout=deadline or self.gateway.timeouts.submit),
        )
        return commit


@dataclass
class Commit:
    """A submitted transaction's signed commit-status request; ask it any number of times."""

    gateway: Gateway
    tx_id: str
    _signed: Any = field(repr=False)  # gateway_pb2.SignedCommitStatusRequest

    def bytes(self) -> builtins.bytes:
        """Serialised ``gateway.SignedCommitStatusRequest``."""
        return builtins.bytes(self._signed.SerializeToString())

    def digest(self) -> builtins.bytes:
        return digest(self._signed.request)

    @property
    def signature(self) -> builtins.bytes:
        return bytes(self._signed.signature)

    def with_signature(self, signature: builtins.bytes) -> Commit:
        signed = gateway_pb2.SignedCommitStatusRequest(
            request=self._signed.request, signature=signature
        )
        return Commit(self.gateway, self.tx_id, signed)

    async def status(
        self, *, wait: bool = True, deadline: float | None = None, poll: float = 0.05
    ) -> CommitStatus | None:
        """The validation code and block of the transaction.

        The Gateway answers only once the transaction is committed, so ``wait=True``
        blocks up to the commit-status deadline (then :class:`CommitStatusTimeout`,
        phase "commit"); ``wait=False`` gives it only ``poll`` seconds and returns None
        if the transaction is not committed yet.
        """
        _require_signature(self.signature, "commit status request")
        limit = (deadline or self.gateway.timeouts.commit_status) if wait else poll
        try:
            response = await _call(
                "commit",
                errors.CommitStatusError,
                errors.CommitStatusTimeout,
                self.tx_id,
                self.gateway.stub.CommitStatus(self._signed, timeout=limit),
            )
        except errors.CommitStatusTimeout:
            if wait:
                raise
            return None
        return CommitStatus(self.tx_id, int(response.result), int(response.block_number))
