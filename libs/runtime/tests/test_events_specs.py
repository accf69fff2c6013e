"""Stream/consumer declarations: conventions, backoff, and infra/nats kept in sync."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ledgerlens.runtime.events import (
    CONSUMERS,
    STREAMS,
    ConsumerSpec,
    EventBus,
    Subjects,
    dead_letter_subject,
)
from ledgerlens.runtime.events.infra import expected_files, infra_drift, write_infra
from ledgerlens.runtime.testing import EventNames

INFRA = Path(__file__).resolve().parents[3] / "infra" / "nats"
SUBJECT = re.compile(r"^ledgerlens\.[a-z]+(\.[a-z_]+)+\.v\d+$")


def test_infra_nats_matches_the_declarations_in_code() -> None:
    assert INFRA.is_dir(), INFRA
    drift = infra_drift(INFRA)
    assert drift == [], (
        "infra/nats drifted from ledgerlens.runtime.events; "
        "run: .venv/bin/python -m ledgerlens.runtime.events.infra"
    )


def test_drift_is_detected(tmp_path: Path) -> None:
    write_infra(tmp_path)
    assert infra_drift(tmp_path) == []
    ledger = tmp_path / "streams" / "LEDGER.json"
    config = json.loads(ledger.read_text())
    config["duplicate_window"] = 1
    ledger.write_text(json.dumps(config))
    (tmp_path / "streams" / "EXTRA.json").write_text("{}")
    (tmp_path / "streams" / "IDENTITY.json").unlink()
    assert infra_drift(tmp_path) == [
        "missing streams/IDENTITY.json",
        "not declared in code: streams/EXTRA.json",
        "differs: streams/LEDGER.json",
    ]


def test_platform_subjects_follow_the_convention() -> None:
    subjects = [v for k, v in vars(Subjects).items() if k.isupper()]
    assert subjects
    for subject in subjects:
        assert SUBJECT.match(subject), subject
        assert any(subject.startswith(s.subjects[0][:-1]) for s in STREAMS.values()), subject
    for consumer in CONSUMERS:
        assert consumer.filter_subject in subjects
        assert consumer.stream in STREAMS


def test_dead_letter_subjects_land_in_the_deadletter_stream() -> None:
    dlq = dead_letter_subject(Subjects.LEDGER_ANCHOR_COMMITTED)
    assert dlq == "ledgerlens.deadletter.ledger.anchor.committed.v1"
    assert dlq.startswith(STREAMS["DEADLETTER"].subjects[0][:-1])
    with pytest.raises(ValueError, match="no domain"):
        dead_letter_subject("ledgerlens")


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    spec = ConsumerSpec(
        stream="S", durable="d", filter_subject="x", backoff_base_seconds=0.5, backoff_max_seconds=5
    )
    assert [spec.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert spec.backoff(10_000) == 5.0
    with pytest.raises(ValueError, match="max_deliver"):
        ConsumerSpec(stream="S", durable="d", filter_subject="x", max_deliver=0)


@pytest.mark.integration
async def test_infra_files_are_accepted_by_jetstream(
    event_bus: EventBus, event_names: EventNames
) -> None:
    """The JSON in infra/nats is what a server takes (applied here under isolated names)."""
    for relative, content in expected_files().items():
        config = json.loads(content)
        if relative.startswith("streams/"):
            config["name"] = event_names.stream_name(config["name"])
            config["subjects"] = [event_names.subject(s) for s in config["subjects"]]
            reply = await event_bus.connection.request(
                f"$JS.API.STREAM.CREATE.{config['name']}", json.dumps(config).encode(), timeout=5
            )
            assert "error" not in json.loads(reply.data), (relative, reply.data)
    for relative, content in expected_files().items():
        if relative.startswith("consumers/"):
            config = json.loads(content)
            stream = event_names.stream_name(relative.split("/")[1])
            config["filter_subject"] = event_names.subject(config["filter_subject"])
            request = {"stream_name": stream, "config": config}
            reply = await event_bus.connection.request(
                f"$JS.API.CONSUMER.CREATE.{stream}.{config['name']}.{config['filter_subject']}",
                json.dumps(request).encode(),
                timeout=5,
            )
            assert "error" not in json.loads(reply.data), (relative, reply.data)
    info = await event_bus.manager.stream_info(event_names.stream_name("LEDGER"))
    assert info.config.duplicate_window == STREAMS["LEDGER"].duplicate_window_seconds
    assert info.state.consumer_count == sum(c.stream == "LEDGER" for c in CONSUMERS)
