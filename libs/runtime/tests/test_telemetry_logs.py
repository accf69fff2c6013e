"""JSON logs with trace ids, and redaction of secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ledgerlens.runtime.settings import ServiceSettings
from ledgerlens.runtime.telemetry import configure_logging, inject_trace_metadata


@pytest.fixture
def log_stream(span_exporter: InMemorySpanExporter) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(
        ServiceSettings(service_name="ingestion", log_level="DEBUG"), stream=stream
    )
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """This test's records (services another test left running in the process log too)."""
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [record for record in records if record["logger"] == "ledgerlens.test"]


def test_one_json_object_per_line_with_trace_and_span_ids(log_stream: io.StringIO) -> None:
    log = logging.getLogger("ledgerlens.test")
    with trace.get_tracer("t").start_as_current_span("work") as span:
        log.info("stored %d chunks", 3, extra={"document_id": "d1"})
    log.warning("outside\nany span")
    inside, outside = _lines(log_stream)
    ctx = span.get_span_context()
    assert inside["message"] == "stored 3 chunks"
    assert inside["level"] == "INFO"
    assert inside["logger"] == "ledgerlens.test"
    assert inside["service"] == "ingestion"
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert inside["document_id"] == "d1"
    assert "timestamp" in inside
    assert outside["message"] == "outside\nany span"
    assert outside["trace_id"] is None


def test_secrets_are_redacted(log_stream: io.StringIO) -> None:
    jwt_like = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    logging.getLogger("ledgerlens.test").warning(
        "call failed for Bearer %s",
        jwt_like,
        extra={
            "authorization": f"Bearer {jwt_like}",
            "api_key": "llk_secret_value",
            "request": {"headers": {"X-Api-Key": "k-123", "accept": "json"}},
            "metadata": [("authorization", "Bearer abc.def.ghi"), ("x-trace", "1")],
            "note": f"forwarded {jwt_like}",
        },
    )
    (entry,) = _lines(log_stream)
    text = json.dumps(entry)
    for secret in (jwt_like, "llk_secret_value", "k-123", "abc.def.ghi"):
        assert secret not in text
    assert entry["authorization"] == "[REDACTED]"
    assert entry["request"]["headers"]["accept"] == "json"
    assert entry["metadata"][1] == ["x-trace", "1"]
    assert entry["message"] == "call failed for [REDACTED]"


def test_trace_context_is_injected_into_metadata(span_exporter: InMemorySpanExporter) -> None:
    with trace.get_tracer("t").start_as_current_span("client") as span:
        metadata = dict(inject_trace_metadata())
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert metadata["traceparent"].split("-")[1] == trace_id
