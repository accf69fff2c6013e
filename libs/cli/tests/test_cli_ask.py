"""``ledgerlens ask`` and ``ledgerlens usage`` against real services on real sockets.

Identity issues the CLI's tokens; ingestion stores a few EIPs from the shared corpus and
retrieval indexes them (``corpus_services`` of the inference tests, whose retrieval
trusts a dev token issuer), and inference answers with its default, the local extractive
provider, calling retrieval with that issuer's service token (``search:read``). The CLI
runs in-process through typer's ``CliRunner`` in a worker thread. Ctrl-C and paging use a small
stand-in inference server instead, and the interrupt runs ``ledgerlens`` as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from _cli_support import Cli, assert_one_line_error, cli_env, logged_in
from _inference_rag_support import corpus_services
from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.cli.config import Credentials, CredentialStore
from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.inference.v1 import inference_pb2, inference_pb2_grpc
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.clients import retrieval_client, static_token
from ledgerlens.runtime.net import free_port
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.identity.app import RunningIdentity
from ledgerlens.services.inference.app import REVOKED_CONSUMER, RunningInference, run_inference
from ledgerlens.services.inference.settings import Settings as InferenceSettings
from ledgerlens.services.retrieval.app import RunningRetrieval

pytestmark = pytest.mark.integration

QUESTION = "how is the base fee burned"
ASKER_SCOPES = ("inference:invoke", "usage:read")


def _jwks(identity: RunningIdentity) -> dict[str, Any]:
    return {"jwks_url": f"{identity.http_url}/.well-known/jwks.json"}


@asynccontextmanager
async def _inference(
    identity: RunningIdentity,
    nats_url: str,
    event_names: EventNames,
    tmp_path: Path,
    *,
    retrieval_target: str = "127.0.0.1:9",
    service_token: str | None = None,
) -> AsyncIterator[RunningInference]:
    """Inference with its default providers (the local extractive answerer), verifying
    identity's tokens, in this test's event namespace."""
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'inference.db'}",
        "nats_url": nats_url,
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "data_dir": str(tmp_path / "inference-data"),
        "shutdown_grace_seconds": 2.0,
        "outbox_poll_seconds": 0.2,
        "auth": _jwks(identity),
        "rag": {"retrieval_target": retrieval_target},
    }
    if service_token is not None:
        values["service_token"] = service_token
    async with run_inference(
        InferenceSettings.model_validate(values),
        streams=event_names.platform_streams(),
        revoked_consumer=event_names.consumer(REVOKED_CONSUMER),
        subject=event_names.subject,
    ) as running:
        yield running


class Stack:
    def __init__(self, retrieval: RunningRetrieval, inference: RunningInference, token: str):
        self.retrieval = retrieval
        self.inference = inference
        self.search_token = token


@pytest.fixture
async def stack(
    identity: RunningIdentity,
    nats_url: str,
    event_names: EventNames,
    cached_embedder: CachingEmbedder,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    async with (
        corpus_services(
            nats_url, event_names, cached_embedder, tmp_path, DevTokenIssuer()
        ) as corpus,
        _inference(
            identity,
            nats_url,
            event_names,
            tmp_path,
            retrieval_target=corpus.retrieval_address,
            service_token=corpus.service_token,
        ) as inference,
    ):
        yield Stack(corpus.retrieval, inference, corpus.service_token)


def _flat(text: str) -> str:
    return " ".join(text.split())


async def _chunk_text(stack: Stack, chunk_id: str) -> str:
    async with retrieval_client(
        stack.retrieval.grpc_address, token_provider=static_token(stack.search_token)
    ) as client:
        found = await client.stub.GetChunk(retrieval_pb2.GetChunkRequest(chunk_id=chunk_id))
    return found.chunk.text


@pytest.mark.slow
async def test_ask_streams_a_cited_answer_then_usage_counts_it(
    identity: RunningIdentity, stack: Stack, tmp_path: Path
) -> None:
    cli = await logged_in(
        identity,
        tmp_path / "config",
        ASKER_SCOPES,
        key_name="asker",
        inference=stack.inference.grpc_address,
    )
    key_id = json.loads((tmp_path / "config" / "credentials.json").read_text())["client_id"]

    shown = await cli("ask", QUESTION, "-k", "6", "--doc-type", "eip")
    assert shown.exit_code == 0, shown.output
    assert shown.stderr == ""
    out = shown.stdout
    flat = _flat(out)

    # usage after exactly one ask: one request of this key, with tokens
    used = await cli("usage", "--json", "--key", key_id)
    assert used.exit_code == 0, used.output
    report = json.loads(used.stdout)
    assert int(report["total"]["requests"]) == 1
    assert int(report["total"]["promptTokens"]) > 0
    (row,) = report["rows"]
    assert row["apiKeyId"] == key_id
    assert int(row["requests"]) == 1
    assert row["model"] == "extractive"
    table = await cli("usage", "--granularity", "hour")
    assert table.exit_code == 0, table.output
    assert key_id in table.stdout
    assert re.search(r"^\s*total\s+1\s+\d+\s+\d+\s+\d+\s+0\.000000\s*$", table.stdout, re.M), (
        table.stdout
    )

    # the same question as JSON: the AnswerResponse of the stream
    as_json = await cli("ask", QUESTION, "-k", "6", "--doc-type", "eip", "--json")
    assert as_json.exit_code == 0, as_json.output
    answer = json.loads(as_json.stdout)
    assert answer["grounded"] is True
    assert answer["model"] == "extractive"
    assert answer["template"].startswith("answer@")
    assert int(answer["usage"]["totalTokens"]) > 0
    citations = answer["citations"]
    assert citations
    numbers = [int(n) for n in re.findall(r"\[(\d+)\]", answer["answer"])]
    assert [c["number"] for c in citations] == list(dict.fromkeys(numbers))

    # the plain run printed that answer, then each numbered source with its quote
    assert _flat(answer["answer"]) in flat
    assert "Sources" in out
    for citation in citations:
        quote = citation["quote"]
        assert _flat(quote) in _flat(await _chunk_text(stack, citation["chunkId"]))
        provenance = citation["provenance"]
        assert re.search(rf"^\[{citation['number']}\] ", out, re.M), out
        assert _flat(citation["title"]) in flat
        assert _flat(quote)[:80] in flat  # the quote (a snippet when long)
        assert provenance["sourceUrl"] in flat
        assert provenance["sha256"][:12] in flat
        assert f"v{provenance['version']}" in flat
    assert any("eip-1559" in c["provenance"]["sourceUrl"] for c in citations)
    assert re.search(r"^usage: \d+ tokens \(\d+ prompt \+ \d+ completion", out, re.M), out
    assert "$0.000000" in out
    assert "template answer@" in out
    assert "not grounded" not in out

    # a question the passages do not answer: said so, no sources, still exit 0
    unrelated = await cli("ask", "what is the best recipe for sourdough bread")
    assert unrelated.exit_code == 0, unrelated.output
    assert "note: not grounded" in unrelated.stdout
    assert "Sources" not in unrelated.stdout


async def test_a_missing_scope_is_one_line_exit_1(
    identity: RunningIdentity, nats_url: str, event_names: EventNames, tmp_path: Path
) -> None:
    async with _inference(identity, nats_url, event_names, tmp_path) as inference:
        searcher = await logged_in(
            identity,
            tmp_path / "searcher",
            ["search:read", "usage:read"],
            key_name="searcher",
            inference=inference.grpc_address,
        )
        refused = await searcher("ask", QUESTION)
        assert_one_line_error(refused, 1, "PERMISSION_DENIED", "inference:invoke")

        invoker = await logged_in(
            identity,
            tmp_path / "invoker",
            ["inference:invoke"],
            key_name="invoker",
            inference=inference.grpc_address,
        )
        refused = await invoker("usage")
        assert_one_line_error(refused, 1, "PERMISSION_DENIED", "usage:read")
        bad = await invoker("ask", QUESTION, "--template", "answer@999")
        assert_one_line_error(bad, 1, "INVALID_ARGUMENT", "template")


async def test_an_unreachable_inference_service_is_one_line_exit_2(
    identity: RunningIdentity, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{free_port()}"
    cli = await logged_in(
        identity, tmp_path / "config", ASKER_SCOPES, key_name="asker", inference=target
    )
    for args in (("ask", QUESTION), ("usage",)):
        result = await cli(*args)
        assert_one_line_error(result, 2, f"cannot reach inference at {target}", "UNAVAILABLE")
    bad_date = await cli("ask", QUESTION, "--since", "yesterday")
    assert bad_date.exit_code == 2
    assert "Traceback" not in bad_date.output


# -- a stand-in inference server: Ctrl-C mid-stream, paging ----------------------------


PARTIAL = "The base fee is"


class StandIn(inference_pb2_grpc.InferenceServiceServicer):
    """Streams a partial answer and then nothing; serves usage in three pages."""

    def __init__(self) -> None:
        self.page_tokens: list[str] = []

    async def AnswerStream(
        self, request: inference_pb2.AnswerStreamRequest, context: Any
    ) -> AsyncIterator[inference_pb2.AnswerStreamResponse]:
        yield inference_pb2.AnswerStreamResponse(delta=PARTIAL)
        await asyncio.sleep(60)

    async def GetUsage(
        self, request: inference_pb2.GetUsageRequest, context: Any
    ) -> inference_pb2.GetUsageResponse:
        self.page_tokens.append(request.page_token)
        page = int(request.page_token or "0")
        start = Timestamp(seconds=1_767_225_600 + page * 86_400)  # 2026-01-01 + page days
        end = Timestamp(seconds=start.seconds + 86_400)
        row = inference_pb2.UsageRow(
            period_start=start,
            period_end=end,
            tenant_id="acme",
            api_key_id=f"llk_{page:016x}",
            model="gpt-standin",
            requests=1,
            prompt_tokens=100,
            completion_tokens=20,
            cost_micro_usd=27,
        )
        total = inference_pb2.UsageRow(
            requests=3, prompt_tokens=300, completion_tokens=60, cost_micro_usd=81
        )
        following = str(page + 1) if page < 2 else ""
        return inference_pb2.GetUsageResponse(rows=[row], total=total, next_page_token=following)


@pytest.fixture
async def standin() -> AsyncIterator[tuple[str, StandIn]]:
    server = grpc.aio.server()
    servicer = StandIn()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


def _offline_login(config_dir: Path) -> None:
    """Cached credentials with a token far from expiry (the stand-in checks none)."""
    CredentialStore(config_dir / "credentials.json").save(
        Credentials(
            client_id="llk_0000000000000000",
            client_secret="lls_unused",
            access_token="not-a-real-token",
            expires_at=time.time() + 3600,
        )
    )


async def test_usage_pages_through_every_page_and_prints_the_totals(
    standin: tuple[str, StandIn], tmp_path: Path
) -> None:
    target, servicer = standin
    _offline_login(tmp_path / "config")
    cli = Cli(cli_env(tmp_path / "config", "127.0.0.1:9", inference=target))
    shown = await cli("usage", "--since", "2026-01-01")
    assert shown.exit_code == 0, shown.output
    assert servicer.page_tokens == ["", "1", "2"]
    for day in ("2026-01-01", "2026-01-02", "2026-01-03"):
        assert day in shown.stdout
    assert re.search(r"^\s*total\s+3\s+300\s+60\s+360\s+0\.000081\s*$", shown.stdout, re.M), (
        shown.stdout
    )
    as_json = await cli("usage", "--json")
    report = json.loads(as_json.stdout)
    assert len(report["rows"]) == 3
    assert report["nextPageToken"] == ""
    assert int(report["total"]["costMicroUsd"]) == 81


async def test_ctrl_c_mid_stream_exits_130_without_a_traceback(
    standin: tuple[str, StandIn], tmp_path: Path
) -> None:
    target, _ = standin
    _offline_login(tmp_path / "config")
    env = {
        **os.environ,
        **cli_env(tmp_path / "config", "127.0.0.1:9", inference=target),
        "PYTHONUNBUFFERED": "1",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledgerlens.cli",
        "ask",
        QUESTION,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    seen = b""
    async with asyncio.timeout(60):
        while PARTIAL.encode() not in seen:
            chunk = await process.stdout.read(256)
            assert chunk, "the CLI ended before printing the partial answer"
            seen += chunk
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        rest, stderr = await process.communicate()
    assert process.returncode == 130, (seen + rest, stderr)
    assert b"Traceback" not in stderr
    assert stderr.decode().strip() == "interrupted"
    assert (seen + rest).decode().startswith(PARTIAL)
