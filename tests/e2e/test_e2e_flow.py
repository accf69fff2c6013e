"""The platform end to end: five services as real processes, real sockets, real NATS.

A key with the needed scopes ingests an EIP subset through ingestion's ``IngestStream``
(what ``ledgerlens ingest`` uses); once every chunk is searchable, searches with filters
are checked against the documents' own front matter, an answer's citations against the
chunks retrieval returns, the anchors against the ledger, the answer's tokens against
the usage accounting and its audit record against the ledger. Then the ``ledgerlens``
CLI, as a subprocess, does the same round trip on one more file.

Why a subset: embedding the whole corpus (950 EIPs, about 16,000 chunks) takes about 15
minutes on two cores, and proves nothing more about the wiring than 30 documents do.
The subset is chosen so each filter has something to separate: EIPs by Vitalik Buterin
(@vbuterin) and by others, from 2015 to 2024; Core, Networking, Interface and Meta EIPs;
two "moved" stubs without a ``created`` date; and one non-EIP document (the corpus
README, ingested as DOC_TYPE_OTHER). All are small except eip-1559, the one the answer
and the anchor checks are about.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from _platform import (
    CORPUS_DIR,
    EIP_DIR,
    ApiKey,
    Platform,
    ingest_files,
    searchable_chunk_ids,
    wait_anchored,
    wait_until,
)
from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.common.v1 import common_pb2
from ledgerlens.inference.v1 import inference_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2

# the first test also waits for the platform and the ingest (about 1-2 minutes here)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.usefixtures("corpus"),
]


SUBSET = [
    # by Vitalik Buterin (alone or with others)
    "eip-1559.md",
    "eip-155.md",
    "eip-158.md",
    "eip-1014.md",
    "eip-2930.md",
    "eip-4488.md",
    "eip-7668.md",
    "eip-3198.md",
    "eip-6780.md",
    # Core, by others
    "eip-2718.md",
    "eip-3855.md",
    "eip-3651.md",
    "eip-3541.md",
    "eip-4345.md",
    "eip-5133.md",
    "eip-3554.md",
    "eip-7514.md",
    "eip-2681.md",
    "eip-3607.md",
    # Networking
    "eip-7639.md",
    "eip-868.md",
    # Interface
    "eip-1803.md",
    "eip-3091.md",
    "eip-6.md",
    # Meta
    "eip-1588.md",
    "eip-2070.md",
    "eip-606.md",
    "eip-608.md",
    # moved to the ERC repository: no created date, no author
    "eip-20.md",
    "eip-165.md",
]
#: ingested by the CLI test only
CLI_FILE = "eip-7516.md"
SOURCE_PREFIX = "https://eips.ethereum.org/EIPS/"
README_URL = "https://corpus.example/README.md"
FLOW_SCOPES = [
    "ingest:write",
    "ingest:read",
    "search:read",
    "inference:invoke",
    "usage:read",
    "ledger:read",
]
INGEST_SECONDS = 420.0  # 30 documents embed in about a minute on a quiet machine
HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- the documents' own metadata, read from their front matter (the ground truth) -------


@dataclass(frozen=True)
class FrontMatter:
    authors: str  # the author line as written
    created: date | None
    tags: frozenset[str]  # category, type and status, lower case


def front_matter(path: Path) -> FrontMatter:
    head = path.read_text(encoding="utf-8").split("---", 2)[1]
    fields = {}
    for line in head.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    created = fields.get("created")
    tags = {
        fields[key].lower().replace(" ", "-")
        for key in ("category", "type", "status")
        if key in fields
    }
    return FrontMatter(
        authors=fields.get("author", ""),
        created=date.fromisoformat(created) if created else None,
        tags=frozenset(tags),
    )


def by_vbuterin(name: str) -> bool:
    return "@vbuterin" in front_matter(EIP_DIR / name).authors


def created_in(name: str, after: date | None = None, before: date | None = None) -> bool:
    created = front_matter(EIP_DIR / name).created
    if created is None:
        return False  # no published_at: excluded whenever a date bound is set
    return (after is None or created >= after) and (before is None or created < before)


def timestamp(day: date) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime(day.year, day.month, day.day, tzinfo=UTC))
    return stamp


# -- the ingested subset -----------------------------------------------------------------


@dataclass
class Corpus:
    key: ApiKey
    token: str
    #: file name -> its IngestDocumentResponse (README.md included)
    documents: dict[str, ingestion_pb2.IngestDocumentResponse]

    def name_of(self, document_id: str) -> str:
        for name, document in self.documents.items():
            if document.document_id == document_id:
                return name
        raise AssertionError(f"{document_id} is not a document of the subset")


async def _ingest_subset(platform: Platform, token: str) -> dict[str, Any]:
    async with platform.client("ingestion", token) as ingestion:
        streamed = await ingest_files(
            ingestion.stub, [EIP_DIR / name for name in SUBSET], source_prefix=SOURCE_PREFIX
        )
        readme = await ingestion.stub.IngestDocument(
            ingestion_pb2.IngestDocumentRequest(
                source_url=README_URL,
                content=(CORPUS_DIR / "README.md").read_bytes(),
                content_type="text/markdown",
                metadata=common_pb2.DocumentMetadata(doc_type=common_pb2.DOC_TYPE_OTHER),
            )
        )
    return {"streamed": streamed, "readme": readme}


async def _until_searchable(
    platform: Platform, token: str, documents: dict[str, ingestion_pb2.IngestDocumentResponse]
) -> dict[str, list[str]]:
    """Each document's searchable chunk ids, once every chunk of every one is searchable."""
    found: dict[str, list[str]] = {}
    async with platform.client("retrieval", token) as retrieval:

        async def all_searchable() -> bool:
            for name, document in documents.items():
                if len(found.get(name, ())) != document.chunk_count:
                    found[name] = await searchable_chunk_ids(
                        retrieval.stub, document.document_id, "overview"
                    )
            return all(len(found[n]) == d.chunk_count for n, d in documents.items())

        await wait_until(all_searchable, within=120, interval=1.0, what="every chunk searchable")
    return found


@pytest.fixture(scope="module")
def corpus(platform: Platform) -> Corpus:
    key = platform.create_key(FLOW_SCOPES, tenant="flow", name="e2e flow")
    token = platform.token(key)
    ingested = platform.run(_ingest_subset(platform, token), timeout=INGEST_SECONDS)
    documents: dict[str, ingestion_pb2.IngestDocumentResponse] = {}
    for path, response in ingested["streamed"].items():
        assert response.WhichOneof("outcome") == "result", (path.name, response.error)
        documents[path.name] = response.result
    documents["README.md"] = ingested["readme"]
    return Corpus(key, token, documents)


@pytest.fixture(scope="module")
def searchable(platform: Platform, corpus: Corpus) -> dict[str, list[str]]:
    return platform.run(_until_searchable(platform, corpus.token, corpus.documents), timeout=180)


# -- ingestion -> retrieval --------------------------------------------------------------


def test_every_document_acknowledged_is_searchable_exactly_once(
    corpus: Corpus, searchable: dict[str, list[str]]
) -> None:
    assert set(corpus.documents) == {*SUBSET, "README.md"}
    for name, document in corpus.documents.items():
        assert document.status == ingestion_pb2.INGEST_STATUS_INGESTED, name
        assert document.version == 1
        assert HEX64.match(document.sha256), document.sha256
        assert document.chunk_count >= 1
        chunk_ids = searchable[name]
        assert len(chunk_ids) == len(set(chunk_ids)) == document.chunk_count, name
    every_chunk = [chunk for chunks in searchable.values() for chunk in chunks]
    assert len(every_chunk) == len(set(every_chunk))  # no chunk belongs to two documents
    # ingestion hashes the normalised text; an EIP (UTF-8, LF, NFC, no BOM) is its bytes
    eip_1559 = corpus.documents["eip-1559.md"]
    assert eip_1559.sha256 == hashlib.sha256((EIP_DIR / "eip-1559.md").read_bytes()).hexdigest()


async def test_ingesting_the_same_content_again_changes_nothing(
    platform: Platform, corpus: Corpus, searchable: dict[str, list[str]]
) -> None:
    async with platform.client("ingestion", corpus.token) as ingestion:
        again = await ingest_files(
            ingestion.stub, [EIP_DIR / "eip-1559.md"], source_prefix=SOURCE_PREFIX
        )
    (response,) = again.values()
    first = corpus.documents["eip-1559.md"]
    assert response.result.status == ingestion_pb2.INGEST_STATUS_UNCHANGED
    assert (response.result.document_id, response.result.version) == (first.document_id, 1)
    async with platform.client("retrieval", corpus.token) as retrieval:
        chunks = await searchable_chunk_ids(retrieval.stub, first.document_id, "base fee")
    assert sorted(chunks) == sorted(searchable["eip-1559.md"])


# -- search with filters -----------------------------------------------------------------

QUERY = "fee market change: the base fee per gas is burned"


async def _search(
    platform: Platform, token: str, query: str, **filter_fields: Any
) -> list[retrieval_pb2.SearchResult]:
    """The results of a hybrid search (top 50) under the filter ``filter_fields``."""
    return await _search_with(platform, token, query, retrieval_pb2.SearchFilter(**filter_fields))


async def _search_with(
    platform: Platform,
    token: str,
    query: str,
    search_filter: retrieval_pb2.SearchFilter,
    *,
    top_k: int = 50,
    fusion: int = retrieval_pb2.FUSION_MODE_UNSPECIFIED,
) -> list[retrieval_pb2.SearchResult]:
    async with platform.client("retrieval", token) as retrieval:
        response = await retrieval.stub.Search(
            retrieval_pb2.SearchRequest(
                query=query, filter=search_filter, top_k=top_k, fusion=fusion
            )
        )
    ranks = [result.rank for result in response.results]
    assert ranks == list(range(1, len(ranks) + 1))
    return list(response.results)


async def _documents_passing(platform: Platform, corpus: Corpus, **filter_fields: Any) -> set[str]:
    """The documents with a chunk that passes the filter: a dense-only search scores every
    chunk the filter lets through, so with top_k 100 and fewer passing chunks than that,
    this is the whole set the filter selects."""
    results = await _search_with(
        platform,
        corpus.token,
        "overview",
        retrieval_pb2.SearchFilter(**filter_fields),
        top_k=100,
        fusion=retrieval_pb2.FUSION_MODE_DENSE,
    )
    assert len(results) < 100, "too many passing chunks to see them all"
    return {corpus.name_of(result.chunk.provenance.document_id) for result in results}


async def test_search_without_filter_finds_the_fee_market_eip(
    platform: Platform, corpus: Corpus, searchable: dict[str, list[str]]
) -> None:
    results = await _search(platform, corpus.token, QUERY)
    top = [corpus.name_of(result.chunk.provenance.document_id) for result in results[:3]]
    assert "eip-1559.md" in top
    hit = results[top.index("eip-1559.md")].chunk
    assert hit.provenance.source_url == SOURCE_PREFIX + "eip-1559.md"
    assert hit.provenance.sha256 == corpus.documents["eip-1559.md"].sha256
    assert hit.metadata.doc_type == common_pb2.DOC_TYPE_EIP


async def test_search_filters_author_and_date_range(
    platform: Platform, corpus: Corpus, searchable: dict[str, list[str]]
) -> None:
    since = date(2019, 1, 1)
    results = await _search(
        platform, corpus.token, QUERY, authors=["vbuterin"], published_after=timestamp(since)
    )
    names = {corpus.name_of(r.chunk.provenance.document_id) for r in results}
    allowed = {n for n in SUBSET if by_vbuterin(n) and created_in(n, after=since)}
    assert "eip-1559.md" in names
    assert names <= allowed, names - allowed
    for result in results:
        assert any("@vbuterin" in author for author in result.chunk.metadata.authors)
        assert result.chunk.metadata.published_at.ToDatetime(tzinfo=UTC).date() >= since

    # the upper bound is exclusive, and documents without a date never pass a bound
    before = date(2017, 1, 1)
    older = await _search(platform, corpus.token, QUERY, published_before=timestamp(before))
    older_names = {corpus.name_of(r.chunk.provenance.document_id) for r in older}
    assert older_names, "some subset EIPs are from 2015-2016"
    assert older_names <= {n for n in SUBSET if created_in(n, before=before)}
    assert not older_names & {"eip-1559.md", "eip-20.md", "eip-165.md", "README.md"}


async def test_search_filters_or_within_a_field_and_across_fields(
    platform: Platform, corpus: Corpus, searchable: dict[str, list[str]]
) -> None:
    # values of one field: OR; fields: AND (here with a date bound, few enough chunks
    # pass to see every document the filter selects)
    before = date(2017, 7, 1)
    either = await _documents_passing(
        platform, corpus, authors=["vbuterin", "@axic"], published_before=timestamp(before)
    )
    axic = {n for n in SUBSET if "@axic" in front_matter(EIP_DIR / n).authors}
    expected = {n for n in SUBSET if (by_vbuterin(n) or n in axic) and created_in(n, before=before)}
    assert either == expected
    assert either & axic, "an EIP by @axic"
    assert either - axic, "an EIP by @vbuterin"

    networking = await _documents_passing(platform, corpus, tags=["networking"])
    assert networking == {n for n in SUBSET if "networking" in front_matter(EIP_DIR / n).tags}
    assert len(networking) == 2
    # no Networking EIP of the subset is by Vitalik Buterin
    assert not await _documents_passing(platform, corpus, tags=["networking"], authors=["vbuterin"])

    prefix = SOURCE_PREFIX + "eip-15"
    prefixed = await _documents_passing(platform, corpus, source_url_prefix=prefix)
    assert prefixed == {n for n in SUBSET if n.startswith("eip-15")}


async def test_search_filters_doc_type(
    platform: Platform, corpus: Corpus, searchable: dict[str, list[str]]
) -> None:
    query = "test and benchmark corpus of Ethereum Improvement Proposals"
    readme_id = corpus.documents["README.md"].document_id
    unfiltered = await _search(platform, corpus.token, query)
    assert readme_id in {r.chunk.provenance.document_id for r in unfiltered[:5]}
    eips = await _search(platform, corpus.token, query, doc_types=[common_pb2.DOC_TYPE_EIP])
    assert eips
    assert readme_id not in {r.chunk.provenance.document_id for r in eips}
    assert {r.chunk.metadata.doc_type for r in eips} == {common_pb2.DOC_TYPE_EIP}
    other = await _search(platform, corpus.token, query, doc_types=[common_pb2.DOC_TYPE_OTHER])
    assert {r.chunk.provenance.document_id for r in other} == {readme_id}


# -- answer, usage and the answer's audit record ----------------------------------------


async def test_answer_is_cited_accounted_and_audited_on_the_ledger(
    platform: Platform, corpus: Corpus, searchable: dict[str, list[str]]
) -> None:
    # a key of its own, so its usage is exactly this one answer
    key = platform.create_key(
        ["inference:invoke", "usage:read", "search:read", "ledger:read"], tenant="flow"
    )
    token = await asyncio.to_thread(platform.token, key)
    async with platform.client("inference", token, default_timeout=60) as inference:
        answer = await inference.stub.Answer(
            inference_pb2.AnswerRequest(
                query="How is the base fee burned?",
                filter=retrieval_pb2.SearchFilter(doc_types=[common_pb2.DOC_TYPE_EIP]),
            )
        )
    assert answer.grounded
    assert answer.citations
    assert answer.completion_id
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    cited_documents = set()
    async with platform.client("retrieval", token) as retrieval:
        for citation in answer.citations:
            assert f"[{citation.number}]" in answer.answer
            chunk = (
                await retrieval.stub.GetChunk(
                    retrieval_pb2.GetChunkRequest(chunk_id=citation.chunk_id)
                )
            ).chunk
            assert citation.quote
            assert citation.quote in chunk.text
            assert citation.provenance.document_id == chunk.provenance.document_id
            assert citation.provenance.sha256 == chunk.provenance.sha256
            assert chunk.metadata.doc_type == common_pb2.DOC_TYPE_EIP
            cited_documents.add(corpus.name_of(chunk.provenance.document_id))
    assert "eip-1559.md" in cited_documents

    async with platform.client("inference", token) as inference:
        usage = await inference.stub.GetUsage(
            inference_pb2.GetUsageRequest(api_key_id=key.client_id)
        )
    assert [row.api_key_id for row in usage.rows] == [key.client_id]
    assert usage.rows[0].model == answer.model
    assert usage.total.requests == 1
    assert usage.total.prompt_tokens == answer.usage.prompt_tokens
    assert usage.total.completion_tokens == answer.usage.completion_tokens
    assert usage.total.tenant_id == "flow"

    # inference.completion.recorded -> the ledger anchors the answer's audit record
    async with platform.client("ledger", token) as ledger:

        async def audit() -> ledger_pb2.GetAuditRecordResponse | None:
            try:
                return await ledger.stub.GetAuditRecord(
                    ledger_pb2.GetAuditRecordRequest(request_id=answer.completion_id)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return None

        anchored = await wait_until(audit, within=60, what="the answer's audit record")
    record = anchored.record
    assert record.request_id == answer.completion_id
    assert record.answer_sha256 == hashlib.sha256(answer.answer.encode()).hexdigest()
    assert HEX64.match(record.prompt_sha256)
    assert sorted(record.cited_chunk_ids) == sorted({c.chunk_id for c in answer.citations})
    assert (record.tenant_id, record.api_key_id, record.model) == (
        "flow",
        key.client_id,
        answer.model,
    )
    assert HEX64.match(anchored.anchor.tx_id)
    assert anchored.anchor.channel
    assert anchored.anchor.HasField("committed_at")


# -- anchors -----------------------------------------------------------------------------


async def test_documents_are_anchored_once_and_ingestion_learns_the_anchor(
    platform: Platform, corpus: Corpus, searchable: dict[str, list[str]]
) -> None:
    eip = corpus.documents["eip-1559.md"]
    async with platform.client("ledger", corpus.token) as ledger:
        verified = await wait_anchored(
            ledger.stub, eip.sha256, document_id=eip.document_id, version=1
        )
        (record,) = verified.records
        assert (record.document_id, record.version, record.sha256) == (
            eip.document_id,
            1,
            eip.sha256,
        )
        assert record.source_url == SOURCE_PREFIX + "eip-1559.md"
        anchor = record.anchor
        assert HEX64.match(anchor.tx_id)
        assert anchor.block_number >= 1
        assert anchor.channel
        assert anchor.HasField("committed_at")
        # every other document of the subset is anchored exactly once, too
        for name, document in corpus.documents.items():
            found = await wait_anchored(ledger.stub, document.sha256, within=60)
            mine = [r for r in found.records if r.document_id == document.document_id]
            assert len(mine) == 1, (name, list(found.records))
        history = await ledger.stub.GetAnchorHistory(
            ledger_pb2.GetAnchorHistoryRequest(document_id=eip.document_id)
        )
        assert [(r.version, r.anchor.tx_id) for r in history.records] == [(1, anchor.tx_id)]
        # other content is not anchored: not an error, an answer
        tampered = (EIP_DIR / "eip-1559.md").read_bytes() + b"\n"
        unknown = await ledger.stub.VerifyDocument(
            ledger_pb2.VerifyDocumentRequest(sha256=hashlib.sha256(tampered).hexdigest())
        )
        assert not unknown.anchored
        assert not unknown.records

    # ledger.anchor.committed flows back: ingestion's provenance carries the same anchor
    async with platform.client("ingestion", corpus.token) as ingestion:

        async def anchored_in_ingestion() -> ingestion_pb2.GetDocumentResponse | None:
            got = await ingestion.stub.GetDocument(
                ingestion_pb2.GetDocumentRequest(document_id=eip.document_id)
            )
            return got if got.document.provenance.anchor.tx_id else None

        document = (await wait_until(anchored_in_ingestion, within=60, what="anchor")).document
    assert document.provenance.anchor.tx_id == anchor.tx_id
    assert document.provenance.anchor.block_number == anchor.block_number


# -- the CLI, as a person runs it --------------------------------------------------------


@dataclass
class Cli:
    env: dict[str, str]
    executable: str

    def __call__(
        self, *args: str, env_secret: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``ledgerlens ARGS``; ``env_secret`` goes in LEDGERLENS_CLIENT_SECRET (not argv)."""
        env = (
            self.env if env_secret is None else {**self.env, "LEDGERLENS_CLIENT_SECRET": env_secret}
        )
        return subprocess.run(
            [self.executable, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture
def cli(platform: Platform, tmp_path: Path) -> Cli:
    executable = Path(sys.executable).with_name("ledgerlens")
    assert executable.is_file(), f"{executable}: the ledgerlens CLI is not installed"
    return Cli(platform.cli_env(tmp_path / "config"), str(executable))


def test_cli_login_ingest_search_ask_verify_usage(
    platform: Platform, corpus: Corpus, searchable: dict[str, list[str]], cli: Cli
) -> None:
    key = platform.create_key(
        ["ingest:write", "search:read", "inference:invoke", "usage:read", "ledger:read"],
        tenant="flow-cli",
    )
    path = EIP_DIR / CLI_FILE

    # not logged in yet: no answer (exit 2), and the one line says what to do
    before = cli("verify", str(path))
    assert before.returncode == 2, before
    assert "ledgerlens login" in before.stderr, before.stderr

    login = cli("login", "--client-id", key.client_id, env_secret=key.client_secret)
    assert login.returncode == 0, login.stderr
    assert f"Logged in as {key.client_id} (tenant flow-cli" in login.stdout
    assert key.client_secret not in login.stdout + login.stderr

    # logged in, not ingested yet: a normal "not anchored" answer (exit 1)
    not_yet = cli("verify", str(path))
    assert not_yet.returncode == 1, not_yet

    ingest = cli("ingest", str(path), "--source-prefix", "https://eips.ethereum.org/EIPS")
    assert ingest.returncode == 0, ingest.stdout + ingest.stderr
    summary = dict(
        re.findall(r"^\s*(documents|ingested|failed|unchanged)\s+(\d+)\s*$", ingest.stdout, re.M)
    )
    assert summary == {"documents": "1", "ingested": "1", "unchanged": "0", "failed": "0"}, (
        ingest.stdout
    )

    # searchable soon after the acknowledgement
    url = "https://eips.ethereum.org/EIPS/" + CLI_FILE
    for _ in range(60):
        search = cli(
            "search", "BLOBBASEFEE opcode returns the blob base fee", "--doc-type", "eip", "--json"
        )
        assert search.returncode == 0, search.stderr
        results = json.loads(search.stdout)["results"]
        if any(r["chunk"]["provenance"]["sourceUrl"] == url for r in results):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{url} never became searchable through the CLI")
    for result in results:
        assert result["chunk"]["metadata"]["docType"] == "DOC_TYPE_EIP"

    ask = cli("ask", "What does the BLOBBASEFEE opcode return?", "--doc-type", "eip")
    assert ask.returncode == 0, ask.stderr
    assert "[1]" in ask.stdout, ask.stdout
    assert "Sources" in ask.stdout, ask.stdout
    completion = re.search(r"completion (\S+)", ask.stdout)
    assert completion, ask.stdout
    tokens = re.search(r"usage: (\d+) tokens \((\d+) prompt \+ (\d+) completion", ask.stdout)
    assert tokens, ask.stdout
    # only the file the CLI ingested speaks of BLOBBASEFEE: it is the source cited
    assert url in ask.stdout, ask.stdout

    for _ in range(60):
        verify = cli("verify", str(path))
        if verify.returncode == 0:
            break
        assert verify.returncode == 1, verify.stderr  # not anchored yet, a normal answer
        time.sleep(0.5)
    else:
        raise AssertionError(f"{CLI_FILE} never anchored: {verify.stdout}{verify.stderr}")
    assert hashlib.sha256(path.read_bytes()).hexdigest()[:12] in verify.stdout, verify.stdout
    assert url in verify.stdout, verify.stdout

    usage = cli("usage", "--json")
    assert usage.returncode == 0, usage.stderr
    rows = json.loads(usage.stdout)
    assert [row["apiKeyId"] for row in rows["rows"]] == [key.client_id]
    assert int(rows["total"]["requests"]) == 1
    assert int(rows["total"]["promptTokens"]) == int(tokens.group(2))
    assert int(rows["total"]["completionTokens"]) == int(tokens.group(3))

    table = cli("usage")
    assert table.returncode == 0, table.stderr
    assert key.client_id in table.stdout, table.stdout
