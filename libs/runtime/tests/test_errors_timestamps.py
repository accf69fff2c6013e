"""Timestamps a client sends outside what a datetime holds are its mistake: the helpers
turn them into INVALID_ARGUMENT naming the field, never an exception the servicer leaks
as INTERNAL."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2  # type: ignore[import-untyped]

from ledgerlens.events.v1 import events_pb2
from ledgerlens.runtime.errors import (
    TIMESTAMP_RANGE,
    InvalidArgument,
    Violations,
    timestamp_field,
    timestamp_value,
)

OUT_OF_RANGE = [
    timestamp_pb2.Timestamp(seconds=-(2**63)),  # before year 1
    timestamp_pb2.Timestamp(seconds=253402300800),  # year 10000
    timestamp_pb2.Timestamp(seconds=0, nanos=-1),
    timestamp_pb2.Timestamp(seconds=0, nanos=1_000_000_000),
]


def test_in_range_is_an_aware_utc_datetime() -> None:
    stamp = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5_000)
    value = timestamp_value(stamp, "at")
    assert value == datetime(2023, 11, 14, 22, 13, 20, 5, tzinfo=UTC)


@pytest.mark.parametrize("stamp", OUT_OF_RANGE, ids=["year0", "year10000", "nanos-", "nanos+"])
def test_out_of_range_is_invalid_argument_naming_the_field(
    stamp: timestamp_pb2.Timestamp,
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        timestamp_value(stamp, "record.completed_at")
    assert caught.value.violations == [("record.completed_at", TIMESTAMP_RANGE)]
    status = caught.value.to_status_proto()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad) for detail in status.details)
    assert [v.field for v in bad.field_violations] == ["record.completed_at"]


def test_field_helpers_on_a_message() -> None:
    event = events_pb2.DocumentIngested()
    assert timestamp_field(event.provenance, "ingested_at") is None  # unset: no value
    event.provenance.ingested_at.CopyFrom(OUT_OF_RANGE[0])
    with pytest.raises(InvalidArgument):
        timestamp_field(event.provenance, "ingested_at", "provenance.ingested_at")

    # collected with the request's other problems, so a client learns them all at once
    v = Violations()
    assert v.timestamp(event.provenance, "ingested_at", "provenance.ingested_at") is None
    v.add("provenance.sha256", "must be 64 hex digits")
    with pytest.raises(InvalidArgument) as caught:
        v.raise_if_any("event")
    assert [field for field, _ in caught.value.violations] == [
        "provenance.ingested_at",
        "provenance.sha256",
    ]
