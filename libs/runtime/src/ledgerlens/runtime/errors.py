"""Domain exceptions and their mapping to gRPC status codes with ``google.rpc`` details.

A servicer raises one of these; the server interceptor turns it into a gRPC status
whose trailing metadata carries a ``google.rpc.Status`` (``grpc-status-details-bin``)
with an ``ErrorInfo`` always, plus ``BadRequest`` field violations, ``RetryInfo``,
``PreconditionFailure`` or ``ResourceInfo`` where they apply. Clients turn such an
error back into the same exception with :func:`from_rpc_error`.

Anything else a servicer raises becomes ``INTERNAL`` with a generic message: the
traceback goes to the log, never to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]  # has .pyi, no py.typed
from grpc_status import rpc_status

__all__ = [
    "ERROR_DOMAIN",
    "TIMESTAMP_RANGE",
    "AlreadyExists",
    "DeadlineExceeded",
    "DomainError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Violations",
    "from_rpc_error",
    "internal_status",
    "timestamp_field",
    "timestamp_value",
    "to_grpc_status",
]

#: ``ErrorInfo.domain`` of every error this runtime produces.
ERROR_DOMAIN = "ledgerlens"
#: the message an unexpected exception is reported with (nothing internal leaks).
INTERNAL_MESSAGE = "internal error"

_log = logging.getLogger(__name__)


class DomainError(Exception):
    """Base of the errors a servicer raises on purpose.

    ``reason`` is a stable UPPER_SNAKE_CASE identifier for programs (``ErrorInfo.reason``;
    defaults to the status code name); ``message`` is for people; ``metadata`` is extra
    machine-readable context (``ErrorInfo.metadata``), never a secret.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.code.name
        self.metadata: dict[str, str] = dict(metadata or {})

    def _extra_details(self) -> list[any_pb2.Any]:
        return []

    def to_status_proto(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        details = [_pack(info), *self._extra_details()]
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class InvalidArgument(DomainError):
    """The request is malformed; ``violations`` are ``(field, description)`` pairs."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations: list[tuple[str, str]] = list(violations)

    def _extra_details(self) -> list[any_pb2.Any]:
        if not self.violations:
            return []
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in self.violations
            ]
        )
        return [_pack(bad)]


class Violations:
    """Collects a request's field violations, so a client learns every problem at once;
    :meth:`raise_if_any` raises them as one :class:`InvalidArgument`.

    Fields are named by their full path (``searches[3].filter.published_before``).
    """

    #: violations spelt out in the message; the details carry all of them
    SUMMARY_LIMIT: ClassVar[int] = 3

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, what: str) -> None:
        """Raise ``INVALID_ARGUMENT`` "invalid <what>: <field>: <problem>; ..." if any."""
        if not self.items:
            return
        shown = self.items[: self.SUMMARY_LIMIT]
        summary = "; ".join(f"{f}: {d}" for f, d in shown)
        rest = len(self.items) - len(shown)
        more = f" (and {rest} more)" if rest else ""
        raise InvalidArgument(f"invalid {what}: {summary}{more}", self.items)

    def timestamp(self, holder: Message, name: str, path: str | None = None) -> datetime | None:
        """``holder.<name>`` (a ``Timestamp``) as an aware UTC datetime; None when unset,
        or, with a violation named ``path``, when out of range (see :func:`timestamp_value`)."""
        if not holder.HasField(name):
            return None
        try:
            return timestamp_value(getattr(holder, name), path or name)
        except InvalidArgument as exc:
            self.items.extend(exc.violations)
            return None


#: what a Timestamp outside the range of a datetime is told
TIMESTAMP_RANGE = "must be a valid timestamp (years 1-9999, nanos 0-999999999)"


def timestamp_value(stamp: timestamp_pb2.Timestamp, path: str) -> datetime:
    """``stamp`` as an aware UTC datetime; ``INVALID_ARGUMENT`` naming ``path`` when it is
    outside what a datetime holds (``ToDatetime`` raises there: a client's bad value, not
    the server's fault, so never INTERNAL)."""
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(
            f"invalid timestamp: {path}: {TIMESTAMP_RANGE}", [(path, TIMESTAMP_RANGE)]
        ) from exc


def timestamp_field(holder: Message, name: str, path: str | None = None) -> datetime | None:
    """``holder.<name>`` through :func:`timestamp_value`; None when unset."""
    return timestamp_value(getattr(holder, name), path or name) if holder.HasField(name) else None


class NotFound(DomainError):
    """The named resource does not exist (``ResourceInfo`` when type/name are given)."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(
        self,
        message: str,
        *,
        resource_type: str = "",
        resource_name: str = "",
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.resource_type = resource_type
        self.resource_name = resource_name

    def _extra_details(self) -> list[any_pb2.Any]:
        if not (self.resource_type or self.resource_name):
            return []
        info = error_details_pb2.ResourceInfo(
            resource_type=self.resource_type, resource_name=self.resource_name
        )
        return [_pack(info)]


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class _Retryable(DomainError):
    """An error the caller may retry after ``retry_after`` seconds (``RetryInfo``)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after

    def _extra_details(self) -> list[any_pb2.Any]:
        if self.retry_after is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(self.retry_after * 1e9))
        return [_pack(error_details_pb2.RetryInfo(retry_delay=delay))]


class ResourceExhausted(_Retryable):
    """A quota or rate limit is hit; ``retry_after`` says when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(_Retryable):
    """A dependency is down or the service is shutting down; retrying may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(DomainError):
    """The caller's deadline ran out before the work could finish (for example, every
    retry and fallback it allowed was spent)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(DomainError):
    """The system is not in the state the call needs; ``violations`` are
    ``(type, subject, description)`` triples (``PreconditionFailure``)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(
        self,
        message: str,
        violations: Sequence[tuple[str, str, str]] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations: list[tuple[str, str, str]] = list(violations)

    def _extra_details(self) -> list[any_pb2.Any]:
        if not self.violations:
            return []
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(type=t, subject=s, description=d)
                for t, s, d in self.violations
            ]
        )
        return [_pack(failure)]


_BY_CODE: dict[grpc.StatusCode, type[DomainError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
    )
}
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_grpc_status(error: DomainError) -> grpc.Status:
    """The ``grpc.Status`` (code, message, ``grpc-status-details-bin``) of ``error``."""
    status: grpc.Status = rpc_status.to_status(error.to_status_proto())
    return status


def internal_status() -> grpc.Status:
    """The status an unexpected exception is reported with: INTERNAL, generic message."""
    proto = status_pb2.Status(
        code=grpc.StatusCode.INTERNAL.value[0],
        message=INTERNAL_MESSAGE,
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))],
    )
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def from_rpc_error(error: grpc.RpcError) -> DomainError | None:
    """The domain error an RPC failed with, rebuilt from its status details.

    Works on ``grpc.aio.AioRpcError`` (and sync ``grpc.Call`` errors). Returns ``None``
    for codes that have no domain error (e.g. ``INTERNAL``, ``DEADLINE_EXCEEDED``).
    """
    code_fn = getattr(error, "code", None)
    if code_fn is None:
        return None
    code: grpc.StatusCode = code_fn()
    cls = _BY_CODE.get(code)
    if cls is None:
        return None
    try:
        proto: status_pb2.Status | None = rpc_status.from_call(cast(grpc.Call, error))
    except ValueError:  # details whose code disagrees with the call's: ignore them
        _log.warning("rpc status details do not match the call's code %s", code.name)
        proto = None
    details_fn = getattr(error, "details", None)
    message: str = (details_fn() if details_fn is not None else None) or ""
    d = _Details()
    if proto is not None:
        message = proto.message or message
        d = _parse_details(proto)
    if cls is InvalidArgument:
        return InvalidArgument(message, d.violations, reason=d.reason, metadata=d.metadata)
    if cls is FailedPrecondition:
        return FailedPrecondition(message, d.preconditions, reason=d.reason, metadata=d.metadata)
    if cls is NotFound:
        return NotFound(
            message,
            resource_type=d.resource_type,
            resource_name=d.resource_name,
            reason=d.reason,
            metadata=d.metadata,
        )
    if issubclass(cls, _Retryable):
        return cls(message, retry_after=d.retry_after, reason=d.reason, metadata=d.metadata)
    return cls(message, reason=d.reason, metadata=d.metadata)


@dataclass
class _Details:
    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)
    preconditions: list[tuple[str, str, str]] = field(default_factory=list)
    retry_after: float | None = None
    resource_type: str = ""
    resource_name: str = ""


def _parse_details(proto: status_pb2.Status) -> _Details:
    found = _Details()
    for detail in proto.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.reason = info.reason
            found.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found.retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            found.preconditions = [(v.type, v.subject, v.description) for v in failure.violations]
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            res = error_details_pb2.ResourceInfo()
            detail.Unpack(res)
            found.resource_type = res.resource_type
            found.resource_name = res.resource_name
    return found
