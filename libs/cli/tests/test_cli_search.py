"""``ledgerlens search`` against real identity and retrieval services on real sockets.

Both services run in the test's event loop; retrieval verifies identity's tokens through
identity's JWKS endpoint, as deployed, and is fed the way ingestion feeds it: chunks
embedded by the real model, published as ``ChunksEmbedded`` events (and a ledger
``AnchorCommitted``) on the test's own NATS streams. The CLI runs in-process through
typer's ``CliRunner`` in a worker thread with its own event loop, as it would in a shell.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _cli_support import Cli, assert_one_line_error, cli_env, logged_in
from _retrieval_support import Doc, ts
from google.protobuf.message import Message

from ledgerlens.common.v1 import common_pb2
from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.events.v1 import events_pb2
from ledgerlens.runtime.events import EventBus, Subjects
from ledgerlens.runtime.net import free_port
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.identity.app import RunningIdentity
from ledgerlens.services.retrieval.app import RETRIEVAL_CONSUMERS, RunningRetrieval, run_retrieval
from ledgerlens.services.retrieval.settings import Settings as RetrievalSettings

pytestmark = pytest.mark.integration

FEES = [
    "The base fee per gas is adjusted every block depending on how full the parent block was.",
    "The base fee is burned, removing ether from circulation instead of paying validators.",
]
NFT = [
    "Royalty information lets marketplaces pay creators a fee on each secondary sale.",
    "Each non-fungible token has a unique tokenId and a single [owner] at any time.",
]
BLOBS = ["Blob-carrying transactions pay a blob base fee of their own, pruned after weeks."]
TX_ID = "ab" * 32
TITLES = ("Fee market", "NFT royalties", "Blob transactions")


def corpus() -> list[Doc]:
    return [
        Doc(
            "doc_fees",
            1,
            FEES,
            tags=["core"],
            published=ts(2019, 4, 13),
            title="Fee market",
            source_url="https://eips.example.org/EIPS/eip-1559.md",
        ),
        Doc(
            "doc_nft",
            1,
            NFT,
            chain="polygon",
            tags=["nft"],
            authors=["Zach Burks (@vexycats)"],
            doc_type=common_pb2.DOC_TYPE_WHITEPAPER,
            published=ts(2021, 6, 1),
            source_url="https://papers.example.com/nft",
            title="NFT royalties",
        ),
        Doc("doc_blobs", 1, BLOBS, tags=["core"], published=None, title="Blob transactions"),
    ]


async def _wait_for(check: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {seconds}s")
        await asyncio.sleep(0.05)


@pytest.fixture
async def retrieval(
    identity: RunningIdentity,
    nats_url: str,
    event_names: EventNames,
    event_bus: EventBus,
    cached_embedder: CachingEmbedder,
    tmp_path: Path,
) -> AsyncIterator[RunningRetrieval]:
    """Retrieval, verifying identity's tokens, with :func:`corpus` indexed (and the fee
    document anchored on the ledger)."""
    settings = RetrievalSettings.model_validate(
        {
            # its own file: sqlite_url is identity's database
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'retrieval.db'}",
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_path / "retrieval-data"),
            "shutdown_grace_seconds": 5.0,
            "auth": {"jwks_url": f"{identity.http_url}/.well-known/jwks.json"},
        }
    )
    async with run_retrieval(
        settings,
        embedder=cached_embedder,
        streams=event_names.platform_streams(),
        consumers=[event_names.consumer(c) for c in RETRIEVAL_CONSUMERS],
    ) as running:

        async def publish(subject: str, message: Message) -> None:
            await event_bus.publish(event_names.subject(subject), message, uuid.uuid4().hex)

        docs = corpus()
        for doc in docs:
            await publish(Subjects.INGESTION_CHUNKS_EMBEDDED, await doc.event(cached_embedder))
        fees = docs[0]
        anchor = common_pb2.LedgerAnchor(tx_id=TX_ID, block_number=7, channel="ledgerlens")
        await publish(
            Subjects.LEDGER_ANCHOR_COMMITTED,
            events_pb2.AnchorCommitted(
                document_id=fees.document_id, version=1, sha256=fees.sha256, anchor=anchor
            ),
        )
        total = sum(len(d.texts) for d in docs)

        async def ready() -> bool:
            indexed = await running.indexer.backend.count()
            return (
                indexed == total
                and running.indexer.state.anchor(("doc_fees", 1), fees.sha256) is not None
            )

        await _wait_for(ready)
        yield running


async def _login(
    identity: RunningIdentity, retrieval_target: str, tmp_path: Path, *scopes: str
) -> Cli:
    return await logged_in(
        identity, tmp_path / "config", scopes, key_name="searcher", retrieval=retrieval_target
    )


@pytest.fixture
async def cli(identity: RunningIdentity, retrieval: RunningRetrieval, tmp_path: Path) -> Cli:
    return await _login(identity, retrieval.grpc_address, tmp_path, "search:read")


def _rows(stdout: str) -> list[str]:
    """The table's result rows: rank then score (a cell's wrapped lines have neither)."""
    return [line for line in stdout.splitlines() if re.match(r"\s*\d+\s+-?\d+\.\d{4}\s", line)]


async def test_table_lists_what_passes_the_filter_with_its_provenance(cli: Cli) -> None:
    query = "who pays the fee"  # about every document
    unfiltered = await cli("search", query, "-k", "20")
    assert unfiltered.exit_code == 0, unfiltered.output
    for title in TITLES:
        assert title in unfiltered.stdout

    result = await cli(
        "search", query, "--chain", "ethereum", "--tag", "core", "--since", "2019-01-01"
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    assert "NFT royalties" not in out  # polygon, nft
    assert "Blob transactions" not in out  # no published date: a date bound excludes it
    rows = _rows(out)
    assert len(rows) == len(FEES), out
    assert rows[0].split()[0] == "1"
    assert all("Fee market" in row for row in rows)
    assert "Fee market > Part 0" in out
    assert "Fee market > Part 1" in out
    assert "https://eips.example.org/EIPS/eip-1559.md" in out
    assert f"v1 · sha256 {corpus()[0].sha256[:12]}" in out
    assert corpus()[0].sha256 not in out  # short, not the whole digest
    assert f"anchor tx {TX_ID} (block 7)" in out
    assert "base fee" in out  # the snippet

    # a repeated option's values OR; --since is inclusive, --until exclusive
    either = await cli("search", query, "--tag", "nft", "--tag", "core", "-k", "20")
    assert either.exit_code == 0, either.output
    for title in TITLES:
        assert title in either.stdout
    on_the_day = await cli("search", query, "--since", "2021-06-01", "--until", "2021-06-02")
    assert on_the_day.exit_code == 0, on_the_day.output
    assert "NFT royalties" in on_the_day.stdout
    assert "Fee market" not in on_the_day.stdout
    before_the_day = await cli("search", query, "--until", "2021-06-01T00:00:00Z", "-k", "20")
    assert "NFT royalties" not in before_the_day.stdout
    assert "Fee market" in before_the_day.stdout

    # chunk text is printed as text, never as rich markup
    owner = await cli("search", "unique tokenId single owner", "--chain", "polygon", "-k", "1")
    assert "[owner]" in owner.stdout

    nothing = await cli("search", query, "--author", "nobody at all")
    assert nothing.exit_code == 0, nothing.output
    assert "No results" in nothing.stdout


async def test_json_prints_the_response(
    cli: Cli, identity: RunningIdentity, retrieval: RunningRetrieval, tmp_path: Path
) -> None:
    # --retrieval wins over the environment's target
    cli.env["LEDGERLENS_RETRIEVAL_TARGET"] = f"127.0.0.1:{free_port()}"
    result = await cli(
        "--retrieval", retrieval.grpc_address, "search", "royalties for creators", "--json",
        "--doc-type", "whitepaper", "--doc-type", "forum", "--author", "zach burks (@vexycats)",
        "--source-prefix", "https://papers.example.com/", "-k", "5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert data["fusion"] == "FUSION_MODE_RRF"
    results = data["results"]
    assert [r["rank"] for r in results] == [1, 2]
    assert {r["chunk"]["provenance"]["documentId"] for r in results} == {"doc_nft"}
    top = results[0]["chunk"]
    assert top["text"] == NFT[0]
    assert top["metadata"]["title"] == "NFT royalties"
    assert top["metadata"]["docType"] == "DOC_TYPE_WHITEPAPER"
    assert top["provenance"]["sourceUrl"] == "https://papers.example.com/nft"
    assert len(top["provenance"]["sha256"]) == 64
    assert "anchor" not in top["provenance"]

    weighted = await cli(
        "--retrieval", retrieval.grpc_address, "search", "base fee", "--json",
        "--dense-weight", "0.25", "-k", "1",
    )  # fmt: skip
    assert weighted.exit_code == 0, weighted.output
    data = json.loads(weighted.stdout)
    assert data["fusion"] == "FUSION_MODE_WEIGHTED"
    assert len(data["results"]) == 1
    anchored = data["results"][0]["chunk"]["provenance"]
    assert anchored["documentId"] == "doc_fees"
    assert anchored["anchor"]["txId"] == TX_ID


async def test_a_bad_date_is_a_usage_error_before_any_call(tmp_path: Path) -> None:
    # not logged in and nothing listening: any attempt at a call would fail otherwise
    target = f"127.0.0.1:{free_port()}"
    cli = Cli(_env_for(tmp_path / "config", target, target))
    since = await cli("search", "fees", "--since", "2021-13-01")
    assert since.exit_code == 2, since.output
    assert "Traceback" not in since.output
    assert since.stdout == ""
    assert "--since" in since.stderr
    assert "2021-13-01" in since.stderr
    assert "not a date" in since.stderr
    assert "not logged in" not in since.stderr
    assert "cannot reach" not in since.stderr
    until = await cli("search", "fees", "--until", "last tuesday")
    assert until.exit_code == 2, until.output
    assert "--until" in until.stderr
    assert "not a date" in until.stderr


async def test_invalid_arguments_are_the_services_one_line_message(cli: Cli) -> None:
    too_many = await cli("search", "fees", "-k", "101")
    line = assert_one_line_error(too_many, 1, "INVALID_ARGUMENT", "top_k")
    assert line.startswith("error: ")
    backwards = await cli("search", "fees", "--since", "2022-01-01", "--until", "2021-01-01")
    assert_one_line_error(backwards, 1, "INVALID_ARGUMENT", "filter.published_before")
    weight = await cli("search", "fees", "--fusion", "dense", "--dense-weight", "0.5")
    assert_one_line_error(weight, 1, "INVALID_ARGUMENT", "dense_weight")


async def test_without_search_read_is_permission_denied(
    identity: RunningIdentity, retrieval: RunningRetrieval, tmp_path: Path
) -> None:
    cli = await _login(identity, retrieval.grpc_address, tmp_path, "ingest:read")
    result = await cli("search", "fees")
    assert_one_line_error(result, 1, "PERMISSION_DENIED")


async def test_an_unreachable_retrieval_service_is_one_clear_line(
    identity: RunningIdentity, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{free_port()}"
    cli = await _login(identity, target, tmp_path, "search:read")
    result = await cli("search", "fees")
    # as for ingest: no service to talk to is the invocation's problem, exit code 2
    assert_one_line_error(result, 2, "cannot reach retrieval", target, "UNAVAILABLE")


async def test_not_logged_in_is_one_line(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    result = await Cli(_env_for(tmp_path / "config", target, target))("search", "fees")
    assert_one_line_error(result, 1, "not logged in", "ledgerlens login")


def _env_for(config_dir: Path, identity: str, retrieval: str) -> dict[str, str]:
    return cli_env(config_dir, identity, retrieval=retrieval)
