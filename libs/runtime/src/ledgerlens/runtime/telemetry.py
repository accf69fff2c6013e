"""Tracing (OpenTelemetry) and structured JSON logs with trace ids.

``configure_tracing`` installs the process's ``TracerProvider`` (``service.name``
resource, parent-based ratio sampler). Spans are exported over OTLP/gRPC only when
``otlp_endpoint`` is set; otherwise trace ids still exist (for logs and propagation)
but nothing leaves the process. Tests pass ``exporters=[InMemorySpanExporter()]``.

``configure_logging`` writes one JSON object per line to stderr with ``timestamp``,
``level``, ``logger``, ``message``, ``service``, ``trace_id``, ``span_id`` (and
``rpc_method`` inside an RPC), and redacts secrets: extra fields whose name looks like
a credential (authorization, token, api key, secret, password, cookie) and bearer
tokens / JWTs inside the message.

Context crosses gRPC metadata with :func:`inject_trace_metadata` (clients) and
:func:`extract_trace_context` (the server interceptor); the event bus uses
``opentelemetry.propagate`` on NATS headers directly.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes
from pythonjsonlogger.json import JsonFormatter

from ledgerlens.runtime.calls import call_var
from ledgerlens.runtime.settings import ServiceSettings

__all__ = [
    "RedactingFilter",
    "configure_logging",
    "configure_tracing",
    "extract_trace_context",
    "inject_trace_metadata",
    "tracing_exported",
]


_provider: TracerProvider | None = None


class _ExportingSampler(Sampler):
    """Samples as configured once spans are exported somewhere; before that, drops all.

    Hand-written because the SDK has no "off until an exporter exists" switch: a
    recorded span nobody exports costs ~25 µs per RPC for nothing, while a dropped
    span still carries (and propagates) the trace id that logs show.
    """

    def __init__(self, ratio: float) -> None:
        self._delegate = ParentBased(TraceIdRatioBased(ratio))
        self.exporting = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if self.exporting:
            return self._delegate.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        return _DROP

    def get_description(self) -> str:
        inner = self._delegate.get_description()  # type: ignore[no-untyped-call]
        return f"ExportingSampler({inner}, on={self.exporting})"


_DROP = SamplingResult(Decision.DROP)


_sampler: _ExportingSampler | None = None


def configure_tracing(
    settings: ServiceSettings, *, exporters: Sequence[SpanExporter] = ()
) -> TracerProvider:
    """Install the global tracer provider (once per process) and return it.

    Spans are sampled (``trace_sample_ratio``, parent-based) only while something
    exports them: the OTLP exporter when ``otlp_endpoint`` is set, or ``exporters``.
    OpenTelemetry allows one global provider per process, so a second call returns the
    first provider, only adding ``exporters`` (each behind a ``SimpleSpanProcessor``,
    which exports synchronously: meant for tests).
    """
    global _provider, _sampler
    if _provider is None:
        _sampler = _ExportingSampler(settings.trace_sample_ratio)
        provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: settings.service_name}), sampler=_sampler
        )
        if settings.otlp_endpoint:
            # imported lazily: the exporter pulls in grpc channel machinery at import
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )

            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))
            )
            _sampler.exporting = True
        trace.set_tracer_provider(provider)
        _provider = provider
    for exporter in exporters:
        _provider.add_span_processor(SimpleSpanProcessor(exporter))
        if _sampler is not None:
            _sampler.exporting = True
    return _provider


def tracing_exported() -> bool:
    """Whether spans are exported anywhere (OTLP or a test exporter) in this process."""
    return _sampler is not None and _sampler.exporting


def shutdown_tracing() -> None:
    """Flush and stop exporters (call at process exit)."""
    if _provider is not None:
        _provider.shutdown()


# -- propagation over gRPC metadata ----------------------------------------------------


class _MetadataGetter(Getter[Sequence[tuple[str, Any]]]):
    """Reads W3C headers straight from gRPC metadata tuples, without building a dict."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        for k, v in carrier:
            if k == key:
                return [v if isinstance(v, str) else v.decode("latin-1")]
        return None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


def extract_trace_context(metadata: Sequence[tuple[str, Any]] | None) -> Context | None:
    """The trace context a caller sent in ``metadata`` (``None`` when there is none)."""
    if not metadata:
        return None
    return propagate.extract(metadata, getter=_GETTER)


def inject_trace_metadata(context: Context | None = None) -> list[tuple[str, str]]:
    """Metadata tuples carrying the current (or given) trace context to a callee."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return list(carrier.items())


# -- logging -----------------------------------------------------------------------------

_SECRET_KEY = re.compile(
    r"authorization|token|api[_-]?key|apikey|secret|password|passwd|cookie|credential",
    re.IGNORECASE,
)
_SECRET_TEXT = re.compile(
    r"(?i:bearer)\s+[\w\-.~+/=]+|eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*",
)
REDACTED = "[REDACTED]"
# attributes every LogRecord has; anything else on a record came from ``extra=``
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return _SECRET_TEXT.sub(REDACTED, value)
    if isinstance(value, Mapping):
        return {str(k): _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_item(v) for v in value]
    return value


def _redact_item(value: Any) -> Any:
    # a (key, value) pair, like gRPC metadata or HTTP headers
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return (value[0], _redact_value(value[0], value[1]))
    return _redact_value("", value)


class RedactingFilter(logging.Filter):
    """Masks credentials in extra fields and bearer tokens / JWTs in the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRS:
                setattr(record, key, _redact_value(key, value))
        message = record.getMessage()
        if "earer" in message or "eyJ" in message:
            redacted = _SECRET_TEXT.sub(REDACTED, message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


class _ContextFilter(logging.Filter):
    """Adds ``service``, ``trace_id``, ``span_id`` and ``rpc_method`` to every record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        else:
            record.trace_id = record.span_id = None
        call = call_var.get()
        if call is not None:
            record.rpc_method = call.method
        return True


class _LedgerlensHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so reconfiguring replaces it."""


def configure_logging(
    settings: ServiceSettings,
    *,
    stream: IO[str] | None = None,
    quiet_loggers: Iterable[str] = ("httpx", "httpcore"),
) -> logging.Handler:
    """JSON logs on the root logger at ``settings.log_level``; returns the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LedgerlensHandler)]:
        root.removeHandler(old)
    handler = _LedgerlensHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
        )
    )
    handler.addFilter(_ContextFilter(settings.service_name))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in quiet_loggers:
        # httpx logs every request URL at INFO; keep JWKS fetches out of the way
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
