"""``ledgerlens ingest`` against real identity and ingestion services on real sockets.

Both services run in the test's event loop; ingestion verifies identity's tokens through
identity's JWKS endpoint, as deployed. The CLI runs in-process through typer's
``CliRunner`` in a worker thread with its own event loop, as it would in a shell. The
corpus is a handful of small files because the real model embeds every chunk.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from _cli_support import Cli, assert_one_line_error, cli_env, logged_in
from _ingestion_support import run_ingestion_in

from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.runtime.net import free_port
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.identity.app import RunningIdentity
from ledgerlens.services.ingestion.app import RunningIngestion
from ledgerlens.services.ingestion.settings import Settings as IngestionSettings

pytestmark = pytest.mark.integration

EIP_DRAFT = """\
---
title: Blob fee market for rollups
author: Ada Lovelace (@ada)
status: Draft
tags: [core, fees]
created: 2024-03-01
---
# Abstract

Rollups post their data as blobs that are pruned after a few weeks. Blob gas has a
fee market of its own, separate from execution gas, with a target of three blobs.

# Motivation

Execution gas prices spike during congestion; rollups should not pay for that.
"""

ROLLUPS = """\
---
title: How optimistic rollups settle
---
# Settlement

An optimistic rollup posts state roots and waits out a challenge window of seven
days. A fraud proof during the window reverts the faulty state root.
"""

NOTES = "Validators attest to the head of the chain every slot, twelve seconds apart.\n"

PAGE = """\
<html><head><title>Staking withdrawals</title></head>
<body><h1>Withdrawals</h1>
<p>Partial withdrawals sweep the balance above 32 ETH to the withdrawal address.</p>
</body></html>
"""


@pytest.fixture
async def ingestion(
    identity: RunningIdentity,
    nats_url: str,
    event_names: EventNames,
    cached_embedder: CachingEmbedder,
    tmp_path: Path,
) -> AsyncIterator[RunningIngestion]:
    settings = IngestionSettings.model_validate(
        {
            # its own file: sqlite_url is identity's database
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'ingestion.db'}",
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_path / "ingestion-data"),
            "shutdown_grace_seconds": 5.0,
            "auth": {"jwks_url": f"{identity.http_url}/.well-known/jwks.json"},
        }
    )
    async with run_ingestion_in(event_names, settings, cached_embedder) as running:
        yield running


async def _login(
    identity: RunningIdentity, ingestion_target: str, tmp_path: Path, *scopes: str
) -> Cli:
    return await logged_in(
        identity, tmp_path / "config", scopes, key_name="ingester", ingestion=ingestion_target
    )


@pytest.fixture
async def cli(identity: RunningIdentity, ingestion: RunningIngestion, tmp_path: Path) -> Cli:
    return await _login(identity, ingestion.grpc_address, tmp_path, "ingest:write", "ingest:read")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "guides").mkdir(parents=True)
    (root / "eip-draft.md").write_text(EIP_DRAFT)
    (root / "guides" / "rollups.markdown").write_text(ROLLUPS)
    (root / "notes.txt").write_text(NOTES)
    (root / "page.html").write_text(PAGE)
    (root / "spec.docx").write_bytes(b"PK\x03\x04 not a supported type")
    (root / "empty.md").write_bytes(b"")
    (root / "gone.md").symlink_to(root / "nowhere.md")  # listed, but cannot be read
    return root


def _summary(stdout: str) -> dict[str, str]:
    """The summary table's rows: label -> value."""
    rows: dict[str, str] = {}
    for line in stdout.split("Failures")[0].splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) == 2:
            rows[parts[0]] = parts[1]
    return rows


def _failure_rows(stdout: str) -> list[str]:
    _, _, table = stdout.partition("Failures")
    return [line for line in table.splitlines() if line.strip()]


async def _documents(ingestion: RunningIngestion, cli: Cli, prefix: str) -> list[Any]:
    token = (await cli("token")).stdout.strip()
    async with grpc.aio.insecure_channel(ingestion.grpc_address) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        listed = await stub.ListDocuments(
            ingestion_pb2.ListDocumentsRequest(
                filter=ingestion_pb2.DocumentFilter(source_url_prefix=prefix), page_size=100
            ),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    return list(listed.documents)


async def test_ingest_a_directory_then_again_unchanged_then_one_changed(
    cli: Cli, ingestion: RunningIngestion, corpus: Path
) -> None:
    first = await cli("ingest", str(corpus), "--chain", "Ethereum", "--concurrency", "3")
    assert first.exit_code == 1, first.output
    assert "Traceback" not in first.output
    summary = _summary(first.stdout)
    assert summary["documents"] == "6"
    assert summary["ingested"] == "4"
    assert summary["new version"] == "0"
    assert summary["unchanged"] == "0"
    assert summary["failed"] == "2"
    assert summary["skipped"] == "1"
    assert int(summary["chunks"]) >= 4
    assert summary["throughput"].endswith("chunks/s")

    failures = _failure_rows(first.stdout)
    empty = next(row for row in failures if str(corpus / "empty.md") in row)
    assert "INVALID_ARGUMENT" in empty
    assert re.search(r"\scontent\s", empty), empty
    gone = next(row for row in failures if str(corpus / "gone.md") in row)
    assert "UNREADABLE" in gone
    assert "spec.docx" not in first.stdout

    documents = await _documents(ingestion, cli, corpus.as_uri())
    by_url = {d.provenance.source_url: d for d in documents}
    assert set(by_url) == {
        (corpus / name).as_uri()
        for name in ("eip-draft.md", "guides/rollups.markdown", "notes.txt", "page.html")
    }
    eip = by_url[(corpus / "eip-draft.md").as_uri()]
    assert eip.metadata.chain == "ethereum"  # the option wins over inference, lower-cased
    assert eip.metadata.title == "Blob fee market for rollups"
    assert {"core", "fees"} <= set(eip.metadata.tags)  # no --tag: front matter's stay
    assert eip.content_type == "text/markdown"
    assert by_url[(corpus / "page.html").as_uri()].content_type == "text/html"

    (corpus / "empty.md").unlink()
    (corpus / "gone.md").unlink()
    second = await cli("ingest", str(corpus))
    assert second.exit_code == 0, second.output
    summary = _summary(second.stdout)
    assert (summary["unchanged"], summary["ingested"], summary["failed"]) == ("4", "0", "0")
    assert summary["chunks"] == "0"
    assert "Failures" not in second.stdout
    assert second.stderr == ""

    (corpus / "notes.txt").write_text(NOTES + "\nA missed slot leaves a gap in the chain.\n")
    third = await cli("ingest", str(corpus / "notes.txt"), str(corpus / "guides"))
    assert third.exit_code == 0, third.output
    summary = _summary(third.stdout)
    assert (summary["new version"], summary["unchanged"]) == ("1", "1")


async def test_source_prefix_metadata_options_and_no_recursion(
    cli: Cli, ingestion: RunningIngestion, corpus: Path
) -> None:
    prefix = "https://docs.example.org/kb"
    result = await cli(
        "ingest", str(corpus), "--no-recursive", "--source-prefix", prefix + "/",
        "--doc-type", "forum", "--tag", "Imported", "--tag", "cli",
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # empty.md and gone.md
    summary = _summary(result.stdout)
    assert (summary["documents"], summary["ingested"], summary["failed"]) == ("5", "3", "2")

    documents = await _documents(ingestion, cli, prefix)
    by_url = {d.provenance.source_url: d for d in documents}
    assert set(by_url) == {f"{prefix}/{n}" for n in ("eip-draft.md", "notes.txt", "page.html")}
    for document in documents:
        assert document.metadata.doc_type == 4  # DOC_TYPE_FORUM
        assert sorted(document.metadata.tags) == ["cli", "imported"]  # replace front matter's


async def test_nothing_to_ingest_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "only.docx").write_bytes(b"x")
    cli = Cli(_env_for(tmp_path / "config", "127.0.0.1:1", "127.0.0.1:1"))
    nothing = await cli("ingest", str(tmp_path / "only.docx"))
    assert_one_line_error(nothing, 2, "no files to ingest", "1 skipped")
    missing = await cli("ingest", str(tmp_path / "missing"))
    assert_one_line_error(missing, 2, "no such file or directory", "missing")


async def test_an_unreachable_ingestion_service_is_one_line_exit_2(
    identity: RunningIdentity, corpus: Path, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{free_port()}"
    cli = await _login(identity, target, tmp_path, "ingest:write")
    result = await cli("ingest", str(corpus / "notes.txt"))
    assert_one_line_error(result, 2, "cannot reach ingestion", target)


async def test_a_token_without_ingest_write_is_permission_denied(
    identity: RunningIdentity, ingestion: RunningIngestion, corpus: Path, tmp_path: Path
) -> None:
    cli = await _login(identity, ingestion.grpc_address, tmp_path, "search:read")
    result = await cli("ingest", str(corpus / "notes.txt"))
    assert_one_line_error(result, 1, "PERMISSION_DENIED")


def _env_for(config_dir: Path, identity: str, ingestion: str) -> dict[str, str]:
    return cli_env(config_dir, identity, ingestion=ingestion)
