"""What went wrong, in which phase, and at which peer.

The Fabric Gateway reports an endorsement failure as one gRPC status whose details
(``grpc-status-details-bin``: a ``google.rpc.Status`` with Any-packed
``gateway.ErrorDetail`` messages) say which peer refused and why. The official clients
surface those details; so do these exceptions, because "endorsement failed" without the
peer address and message is not something an operator can act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from fabric_protos.gateway import gateway_pb2
from fabric_protos.peer import transaction_pb2
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "ChaincodeEventsError",
    "CommitError",
    "CommitStatusError",
    "CommitStatusTimeout",
    "EndorseError",
    "EndorseTimeout",
    "EvaluateError",
    "EvaluateTimeout",
    "GatewayError",
    "GatewayTimeout",
    "SubmitError",
    "SubmitTimeout",
    "decode_error_details",
    "encode_error_details",
    "validation_code_name",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _status_class() -> Any:
    """``google.rpc.Status`` built from its three-field descriptor in a private pool.

    The library depends on protobuf only (googleapis-common-protos is not a dependency,
    and registering google/rpc/status.proto in the default pool would clash with it
    when it is installed), so the message is declared here rather than imported.
    """
    file = descriptor_pb2.FileDescriptorProto(
        name="ledgerlens_fabric/google_rpc_status.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    message = file.message_type.add(name="Status")
    label = descriptor_pb2.FieldDescriptorProto
    message.field.add(name="code", number=1, type=label.TYPE_INT32, label=label.LABEL_OPTIONAL)
    message.field.add(name="message", number=2, type=label.TYPE_STRING, label=label.LABEL_OPTIONAL)
    message.field.add(
        name="details",
        number=3,
        type=label.TYPE_MESSAGE,
        type_name=".google.protobuf.Any",
        label=label.LABEL_REPEATED,
    )
    pool: Any = descriptor_pool.DescriptorPool()  # untyped in types-protobuf
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))


_Status = _status_class()


def encode_error_details(
    code: grpc.StatusCode, message: str, details: Sequence[Any]
) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying ``details`` (``gateway_pb2.ErrorDetail``) the way the
    Fabric Gateway sends them; used by the test peer."""
    status = _Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def decode_error_details(error: grpc.RpcError) -> tuple[Any, ...]:
    """The ``gateway_pb2.ErrorDetail`` messages in a failed call's trailing metadata."""
    trailing: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = _Status.FromString(value)
            found = []
            for packed in status.details:
                detail = gateway_pb2.ErrorDetail()
                if packed.Unpack(detail):
                    found.append(detail)
            return tuple(found)
    return ()


def validation_code_name(code: int) -> str:
    """``TxValidationCode`` name for a number (``"MVCC_READ_CONFLICT"``)."""
    try:
        return str(transaction_pb2.TxValidationCode.Name(code))
    except ValueError:
        return f"UNKNOWN_VALIDATION_CODE_{code}"


class GatewayError(Exception):
    """A Gateway call failed. ``code`` is the gRPC status code, ``details`` the
    per-peer ``gateway_pb2.ErrorDetail`` messages (address, msp_id, message)."""

    phase = "gateway"

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: Sequence[Any] = (),
        tx_id: str | None = None,
    ) -> None:
        self.message = message
        self.code = code
        self.details = tuple(details)
        self.tx_id = tx_id
        super().__init__(self._describe())

    def _describe(self) -> str:
        text = f"{self.phase} failed"
        if self.tx_id:
            text += f" (tx {self.tx_id})"
        if self.code is not None:
            text += f": {self.code.name}"
        text += f": {self.message}"
        for detail in self.details:
            text += f"\n  - peer {detail.address} ({detail.msp_id}): {detail.message}"
        return text

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, tx_id: str | None = None) -> GatewayError:
        code = error.code() if hasattr(error, "code") else None
        message = error.details() if hasattr(error, "details") else str(error)
        return cls(str(message or ""), code=code, details=decode_error_details(error), tx_id=tx_id)


class EvaluateError(GatewayError):
    phase = "evaluate"


class EndorseError(GatewayError):
    phase = "endorse"


class SubmitError(GatewayError):
    phase = "submit"


class CommitStatusError(GatewayError):
    phase = "commit"


class ChaincodeEventsError(GatewayError):
    phase = "chaincode events"


class GatewayTimeout(GatewayError):
    """The deadline of one phase expired; ``phase`` says which (evaluate, endorse,
    submit, commit). A commit timeout does not mean the transaction failed: it may
    still commit, and its status can be asked again with ``commit_for(tx_id)``."""

    def __init__(self, message: str, *, phase: str, tx_id: str | None = None) -> None:
        self.phase = phase
        super().__init__(message, code=grpc.StatusCode.DEADLINE_EXCEEDED, tx_id=tx_id)


class EvaluateTimeout(GatewayTimeout, EvaluateError):
    pass


class EndorseTimeout(GatewayTimeout, EndorseError):
    pass


class SubmitTimeout(GatewayTimeout, SubmitError):
    pass


class CommitStatusTimeout(GatewayTimeout, CommitStatusError):
    pass


class CommitError(GatewayError):
    """The transaction was ordered but the peers marked it invalid (its writes were not
    applied). ``attempts`` counts the endorse-submit-commit rounds ``submit`` made."""

    phase = "commit"

    def __init__(
        self, tx_id: str, validation_code: int, block_number: int, attempts: int = 1
    ) -> None:
        self.validation_code = validation_code
        self.validation_code_name = validation_code_name(validation_code)
        self.block_number = block_number
        self.attempts = attempts
        super().__init__(
            f"transaction invalidated with {self.validation_code_name} in block "
            f"{block_number} after {attempts} attempt(s)",
            tx_id=tx_id,
        )
