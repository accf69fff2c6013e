"""``ledgerlens verify`` and ``ledgerlens ledger events`` against real identity and ledger
services on real sockets.

Both services run in the test's event loop: the ledger (dev backend, SQLite in the
test's tmp dir, the test's own NATS streams) verifies identity's tokens through
identity's JWKS endpoint, as deployed. Documents are anchored through the ledger's
``AnchorDocument`` RPC with the token the CLI cached at ``login``. The CLI runs
in-process through typer's ``CliRunner`` in a worker thread with its own event loop,
as it would in a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from _cli_support import Cli, assert_one_line_error, cli_env, logged_in
from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.cli.config import CliConfig, CredentialStore
from ledgerlens.cli.identity import Session
from ledgerlens.cli.ledger import EventsRun, stream_events
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.runtime.clients import ledger_client, static_token
from ledgerlens.runtime.net import free_port
from ledgerlens.runtime.testing import EventNames, eventually
from ledgerlens.services.identity.app import RunningIdentity
from ledgerlens.services.ledger.app import LEDGER_CONSUMERS, RunningLedger, run_ledger
from ledgerlens.services.ledger.settings import Settings as LedgerSettings

pytestmark = pytest.mark.integration

SCOPES = ("ledger:read", "ledger:submit")
#: the CLI's idle timeout in these tests: the events are there at once, so 1 s of quiet
#: means caught up (and keeps the tests quick).
IDLE = "1"
EIP_TEXT = "# EIP-1559\n\nThe base fee is burned.\n"
_EVENT_LINE = re.compile(r"^block (\d+)  tx ([0-9a-f]{64})  (\w+)  (.*)$")
_CHECKPOINT = re.compile(r"checkpoint (\d+:[0-9a-f]*) \(continue with: ledgerlens ledger events")


@pytest.fixture
async def ledger(
    identity: RunningIdentity, nats_url: str, event_names: EventNames, tmp_path: Path
) -> AsyncIterator[RunningLedger]:
    settings = LedgerSettings.model_validate(
        {
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_path / "ledger-data"),
            "shutdown_grace_seconds": 2.0,
            "auth": {"jwks_url": f"{identity.http_url}/.well-known/jwks.json"},
        }
    )
    async with run_ledger(
        settings,
        streams=event_names.platform_streams(),
        consumers=[event_names.consumer(c) for c in LEDGER_CONSUMERS],
    ) as running:
        yield running


@pytest.fixture
async def cli(identity: RunningIdentity, ledger: RunningLedger, tmp_path: Path) -> Cli:
    return await logged_in(
        identity, tmp_path / "config", SCOPES, key_name="auditor", ledger=ledger.grpc_address
    )


async def _anchor(
    ledger: RunningLedger, tmp_path: Path, document_id: str, sha256: str, version: int = 1
) -> ledger_pb2.AnchorRecord:
    """``AnchorDocument`` with the token ``login`` cached."""
    credentials = CredentialStore(tmp_path / "config" / "credentials.json").load()
    assert credentials is not None
    ingested = Timestamp()
    ingested.FromDatetime(datetime(2026, 11, 30, 1, 2, 3, tzinfo=UTC))
    async with ledger_client(
        ledger.grpc_address, token_provider=static_token(credentials.access_token)
    ) as client:
        response = await client.stub.AnchorDocument(
            ledger_pb2.AnchorDocumentRequest(
                document_id=document_id,
                version=version,
                sha256=sha256,
                source_url=f"https://eips.example.org/{document_id}.md",
                ingested_at=ingested,
            ),
            timeout=30,
        )
    assert not response.already_anchored
    assert response.record.anchor.tx_id
    return response.record


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _events(stdout: str) -> list[tuple[int, str, str, str]]:
    """(block, tx id, event name, payload summary) of every event line."""
    found = []
    for line in stdout.splitlines():
        match = _EVENT_LINE.match(line)
        if match:
            found.append((int(match[1]), match[2], match[3], match[4]))
    return found


def _checkpoint(stdout: str) -> str:
    match = _CHECKPOINT.search(stdout)
    assert match is not None, stdout
    return match[1]


# -- verify ------------------------------------------------------------------------------


async def test_verify_an_anchored_file_says_where(
    cli: Cli, ledger: RunningLedger, tmp_path: Path
) -> None:
    path = tmp_path / "eip-1559.md"
    path.write_bytes(EIP_TEXT.encode())
    record = await _anchor(ledger, tmp_path, "doc_eip1559", _sha(path.read_bytes()))
    tx_id = record.anchor.tx_id

    result = await cli("verify", str(path))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith("ANCHORED:")
    assert _sha(EIP_TEXT.encode()) in out
    assert tx_id in out
    assert "doc_eip1559" in out
    assert "https://eips.example.org/doc_eip1559.md" in out
    assert record.anchor.channel
    assert record.anchor.channel in out
    assert re.search(rf"{tx_id}\s+{record.anchor.block_number}\s", out), out

    as_json = await cli("verify", str(path), "--json", "--document-id", "doc_eip1559")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["anchored"] is True
    assert data["sha256"] == _sha(EIP_TEXT.encode())
    assert data["hashed"] == "file bytes"
    assert "caveat" not in data
    [found] = data["records"]
    assert found["documentId"] == "doc_eip1559"
    assert found["version"] == 1
    assert found["anchor"]["txId"] == tx_id
    assert int(found["anchor"]["blockNumber"]) == record.anchor.block_number

    # narrowed to another document or version: not anchored there (exit 1, no error)
    other = await cli("verify", str(path), "--document-id", "doc_other")
    assert other.exit_code == 1, other.output
    assert other.stderr == ""
    assert "NOT ANCHORED" in other.stdout
    assert "as document doc_other" in other.stdout
    later = await cli("verify", str(path), "--document-id", "doc_eip1559", "--version", "2")
    assert later.exit_code == 1, later.output
    assert json.loads((await cli("verify", str(path), "--version", "2", "--json")).stdout) == {
        "file": str(path),
        "sha256": _sha(EIP_TEXT.encode()),
        "hashed": "file bytes",
        "anchored": False,
        "records": [],
    }


async def test_verify_a_file_not_anchored_exits_1(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "unknown.md"
    path.write_bytes(b"# Never ingested\n\nNobody anchored this.\n")
    result = await cli("verify", str(path))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr == ""  # an LF, NFC, UTF-8 Markdown file is its own normalised text
    assert result.stdout.startswith("NOT ANCHORED:")
    assert _sha(path.read_bytes()) in result.stdout

    # bytes that are not ingestion's normalised text: the note says why it cannot match
    crlf = tmp_path / "windows.txt"
    crlf.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    noted = await cli("verify", str(crlf))
    assert noted.exit_code == 1, noted.output
    note = noted.stderr.strip()
    assert note.startswith("note: ")
    assert "CR line ends" in note
    assert "byte order mark" in note
    assert "normalised text" in note
    as_json = await cli("verify", str(crlf), "--json")
    assert as_json.exit_code == 1
    assert "CR line ends" in json.loads(as_json.stdout)["caveat"]


async def test_verify_a_missing_file_is_one_line(cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "nope.md"
    result = await cli("verify", str(missing))
    assert_one_line_error(result, 2, "no such file", str(missing))
    directory = await cli("verify", str(tmp_path))
    assert_one_line_error(directory, 2, "is a directory")


async def test_an_unreachable_ledger_is_one_line_naming_the_address(
    identity: RunningIdentity, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{free_port()}"
    cli = await logged_in(identity, tmp_path / "config", SCOPES, key_name="k", ledger=target)
    path = tmp_path / "a.md"
    path.write_bytes(b"# A\n")
    result = await cli("verify", str(path))
    assert_one_line_error(result, 2, "cannot reach ledger", target, "UNAVAILABLE")
    events = await cli("ledger", "events", "--from", "0")
    assert_one_line_error(events, 2, "cannot reach ledger", target, "UNAVAILABLE")
    # --ledger wins over the environment's target
    other = f"127.0.0.1:{free_port()}"
    flagged = await cli("--ledger", other, "verify", str(path))
    assert_one_line_error(flagged, 2, "cannot reach ledger", other)


async def test_without_ledger_read_is_permission_denied_naming_the_scope(
    identity: RunningIdentity, ledger: RunningLedger, tmp_path: Path
) -> None:
    cli = await logged_in(
        identity, tmp_path / "config", ["search:read"], key_name="s", ledger=ledger.grpc_address
    )
    path = tmp_path / "a.md"
    path.write_bytes(b"# A\n")
    verify = await cli("verify", str(path))
    assert_one_line_error(verify, 2, "PERMISSION_DENIED", "ledger:read")
    events = await cli("ledger", "events", "--from", "0")
    assert_one_line_error(events, 1, "PERMISSION_DENIED", "ledger:read")


async def test_not_logged_in_is_one_line(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    cli = Cli(cli_env(tmp_path / "config", target, ledger=target))
    path = tmp_path / "a.md"
    path.write_bytes(b"# A\n")
    assert_one_line_error(await cli("verify", str(path)), 2, "not logged in", "ledgerlens login")
    events = await cli("ledger", "events")
    assert_one_line_error(events, 1, "not logged in", "ledgerlens login")


# -- ledger events -----------------------------------------------------------------------


async def test_events_list_the_anchors_and_resume_exactly_after_a_checkpoint(
    cli: Cli, ledger: RunningLedger, tmp_path: Path
) -> None:
    first = [
        await _anchor(ledger, tmp_path, f"doc_{i}", _sha(f"text {i}".encode())) for i in range(3)
    ]
    listed = await cli("ledger", "events", "--from", "0", "--idle", IDLE)
    assert listed.exit_code == 0, listed.output
    assert listed.stderr == ""
    events = _events(listed.stdout)
    assert [(tx, name) for _, tx, name, _ in events] == [
        (r.anchor.tx_id, "DocumentAnchored") for r in first
    ]
    assert [block for block, *_ in events] == [r.anchor.block_number for r in first]
    for (_, _, _, summary), record in zip(events, first, strict=True):
        assert summary == f"{record.document_id} v1 sha256 {record.sha256[:12]}"
    checkpoint = _checkpoint(listed.stdout)
    last = first[-1].anchor
    assert checkpoint == f"{last.block_number}:{last.tx_id}"
    assert "3 events; checkpoint" in listed.stdout

    more = [
        await _anchor(ledger, tmp_path, f"doc_more_{i}", _sha(f"more {i}".encode()))
        for i in range(2)
    ]
    resumed = await cli("ledger", "events", "--after", checkpoint, "--idle", IDLE)
    assert resumed.exit_code == 0, resumed.output
    assert [tx for _, tx, _, _ in _events(resumed.stdout)] == [r.anchor.tx_id for r in more]
    assert _checkpoint(resumed.stdout) == f"{more[-1].anchor.block_number}:{more[-1].anchor.tx_id}"

    # --json: one object per event, each with its own checkpoint; then the summary
    as_json = await cli("ledger", "events", "--from", "0", "--idle", IDLE, "--json")
    assert as_json.exit_code == 0, as_json.output
    *objects, summary = [json.loads(line) for line in as_json.stdout.splitlines()]
    everything = first + more
    assert [o["tx_id"] for o in objects] == [r.anchor.tx_id for r in everything]
    assert objects[0]["payload"]["json"]["document_id"] == "doc_0"
    assert objects[0]["event_name"] == "DocumentAnchored"
    assert objects[0]["chaincode"] == "anchoring"
    assert summary == {
        "events": len(everything),
        "checkpoint": objects[-1]["checkpoint"],
        "resume": f"--after {objects[-1]['checkpoint']}",
    }
    # resuming after any event's checkpoint yields exactly the events after it
    after_first = await cli("ledger", "events", "--after", objects[0]["checkpoint"], "--idle", IDLE)
    assert [tx for _, tx, _, _ in _events(after_first.stdout)] == [
        r.anchor.tx_id for r in everything[1:]
    ]

    # only some event names: none of another name
    named = await cli("ledger", "events", "--from", "0", "--name", "AuditAnchored", "--idle", IDLE)
    assert named.exit_code == 0, named.output
    assert _events(named.stdout) == []
    assert "0 events (continue with: ledgerlens ledger events --from 0)" in named.stdout


async def test_events_usage_and_service_errors_are_one_line(cli: Cli) -> None:
    both = await cli("ledger", "events", "--from", "0", "--after", "1:ab")
    assert_one_line_error(both, 2, "--from or --after")
    bad = await cli("ledger", "events", "--after", "yesterday")
    assert_one_line_error(bad, 2, "--after", "yesterday", "BLOCK:TXID")
    beyond = await cli("ledger", "events", "--from", "1000000", "--idle", IDLE)
    assert_one_line_error(beyond, 1, "OUT_OF_RANGE")
    unknown = await cli("ledger", "events", "--from", "0", "--chaincode", "nosuch", "--idle", IDLE)
    assert_one_line_error(unknown, 1, "INVALID_ARGUMENT", "chaincode")


async def test_follow_keeps_streaming_new_events(
    cli: Cli, ledger: RunningLedger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--follow`` does not stop when quiet: an anchor committed later still arrives
    (driven in this loop: a follow never ends by itself, so it is cancelled here)."""
    before = await _anchor(ledger, tmp_path, "doc_before", _sha(b"before"))
    config = CliConfig(ledger_target=ledger.grpc_address, config_dir=tmp_path / "config")
    request = ledger_pb2.StreamEventsRequest(
        after=ledger_pb2.Checkpoint(
            block_number=before.anchor.block_number, tx_id=before.anchor.tx_id
        )
    )
    run = EventsRun()
    task = asyncio.create_task(
        stream_events(Session(config), request, run, follow=True, idle_seconds=0.1, as_json=False)
    )
    try:
        await asyncio.sleep(0.5)  # longer than the idle timeout given: follow ignores it
        assert not task.done()
        assert run.count == 0
        later = await _anchor(ledger, tmp_path, "doc_later", _sha(b"later"))

        async def streamed() -> bool:
            return run.count >= 1

        await eventually(streamed, message="the later event streamed")
        assert run.checkpoint is not None
        assert run.checkpoint.tx_id == later.anchor.tx_id
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    [(_, tx, name, summary)] = _events(capsys.readouterr().out)
    assert (tx, name) == (later.anchor.tx_id, "DocumentAnchored")
    assert summary.startswith("doc_later v1 sha256 ")
