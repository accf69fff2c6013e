"""The ledger's errors: the runtime's domain errors plus the codes a transaction can fail
with (ABORTED, DEADLINE_EXCEEDED, OUT_OF_RANGE), each able to carry the proto's
``TransactionFailure`` detail.

The runtime's error interceptor turns any :class:`~ledgerlens.runtime.errors.DomainError`
into a status from its ``code`` and ``_extra_details()``; the classes here add the
``TransactionFailure`` (phase, tx id, refusing endorsers, validation code, attempts) to
whatever detail the base class already sends (``BadRequest`` field violations for an
INVALID_ARGUMENT, ``RetryInfo`` for UNAVAILABLE …), so a caller sees which peer refused
without parsing messages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import grpc
from google.protobuf import any_pb2

from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.runtime.errors import (
    AlreadyExists,
    DomainError,
    InvalidArgument,
    NotFound,
    Unavailable,
)

__all__ = [
    "PHASE_COMMIT",
    "PHASE_ENDORSE",
    "PHASE_EVALUATE",
    "PHASE_SUBMIT",
    "Aborted",
    "DeadlineExceeded",
    "EndorserRefusal",
    "OutOfRange",
    "Phase",
    "TransactionError",
    "TxAborted",
    "TxAlreadyExists",
    "TxDeadlineExceeded",
    "TxFailure",
    "TxInvalidArgument",
    "TxNotFound",
    "TxUnavailable",
    "chaincode_status",
    "refusal_error",
]

#: a ``TransactionPhase`` enum value.
Phase: TypeAlias = ledger_pb2.TransactionPhase.ValueType

PHASE_EVALUATE: Final = ledger_pb2.TRANSACTION_PHASE_EVALUATE
PHASE_ENDORSE: Final = ledger_pb2.TRANSACTION_PHASE_ENDORSE
PHASE_SUBMIT: Final = ledger_pb2.TRANSACTION_PHASE_SUBMIT
PHASE_COMMIT: Final = ledger_pb2.TRANSACTION_PHASE_COMMIT

_PHASE_NAMES: Final = {
    PHASE_EVALUATE: "evaluate",
    PHASE_ENDORSE: "endorse",
    PHASE_SUBMIT: "submit",
    PHASE_COMMIT: "commit",
}

# what a peer reports for a chaincode error response: "chaincode response 409, <message>"
_CHAINCODE_RESPONSE = re.compile(r"chaincode response (\d{3}),\s*(.*)", re.DOTALL)


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class OutOfRange(DomainError):
    code = grpc.StatusCode.OUT_OF_RANGE


@dataclass(frozen=True)
class EndorserRefusal:
    address: str
    msp_id: str
    message: str


@dataclass(frozen=True)
class TxFailure:
    """What the proto's ``TransactionFailure`` says."""

    phase: Phase
    tx_id: str = ""
    endorsers: tuple[EndorserRefusal, ...] = field(default=())
    validation_code: str = ""
    attempts: int = 1

    @property
    def phase_name(self) -> str:
        return _PHASE_NAMES.get(self.phase, "unspecified")

    def to_proto(self) -> ledger_pb2.TransactionFailure:
        return ledger_pb2.TransactionFailure(
            phase=self.phase,
            tx_id=self.tx_id,
            endorsers=[
                ledger_pb2.EndorserError(address=e.address, msp_id=e.msp_id, message=e.message)
                for e in self.endorsers
            ],
            validation_code=self.validation_code,
            attempts=self.attempts,
        )


class TransactionError(DomainError):
    """A domain error that also carries a ``TransactionFailure`` detail.

    Combined with a runtime error class by inheritance (``TxInvalidArgument(
    TransactionError, InvalidArgument)``) so both details are sent; the failure is set
    after construction (:meth:`with_failure`) to keep the base classes' constructors.
    """

    failure: TxFailure | None = None

    def with_failure(self, failure: TxFailure) -> TransactionError:
        self.failure = failure
        if failure.tx_id:
            self.metadata.setdefault("tx_id", failure.tx_id)
        self.metadata.setdefault("phase", failure.phase_name)
        return self

    def _extra_details(self) -> list[any_pb2.Any]:
        details = super()._extra_details()
        if self.failure is not None:
            packed = any_pb2.Any()
            packed.Pack(self.failure.to_proto())
            details.append(packed)
        return details


class TxAborted(TransactionError, Aborted):
    pass


class TxDeadlineExceeded(TransactionError, DeadlineExceeded):
    pass


class TxInvalidArgument(TransactionError, InvalidArgument):
    pass


class TxNotFound(TransactionError, NotFound):
    pass


class TxAlreadyExists(TransactionError, AlreadyExists):
    pass


class TxUnavailable(TransactionError, Unavailable):
    pass


def chaincode_status(message: str) -> tuple[int, str] | None:
    """``(status, message)`` of a peer's "chaincode response NNN, message", else None."""
    match = _CHAINCODE_RESPONSE.search(message)
    if match is None:
        return None
    return int(match.group(1)), match.group(2).strip()


def refusal_error(
    phase: Phase,
    tx_id: str,
    endorsers: Sequence[EndorserRefusal],
    fallback: str,
) -> TransactionError:
    """The error of a refused proposal: the contract's own verdict when every refusing
    peer reports the same chaincode status (400 → INVALID_ARGUMENT, 404 → NOT_FOUND,
    409 → ALREADY_EXISTS), else ABORTED. The peers are in the detail either way."""
    failure = TxFailure(phase=phase, tx_id=tx_id, endorsers=tuple(endorsers))
    statuses = {chaincode_status(e.message) for e in endorsers}
    if len(statuses) == 1:
        (parsed,) = statuses
        if parsed is not None:
            status, text = parsed
            error: TransactionError
            if status == 400:
                error = TxInvalidArgument(text, reason="CHAINCODE_BAD_REQUEST")
            elif status == 404:
                error = TxNotFound(text, reason="CHAINCODE_NOT_FOUND")
            elif status == 409:
                error = TxAlreadyExists(text, reason="CHAINCODE_CONFLICT")
            else:
                error = TxAborted(
                    f"{_PHASE_NAMES.get(phase, 'endorse')} refused: {text}",
                    reason="ENDORSEMENT_REFUSED",
                )
            return error.with_failure(failure)
    described = "; ".join(f"{e.address} ({e.msp_id}): {e.message}" for e in endorsers)
    return TxAborted(
        f"{fallback}: {described}" if described else fallback, reason="ENDORSEMENT_REFUSED"
    ).with_failure(failure)
