"""The retrieval service over real gRPC and real NATS, on each backend: indexing from
ingestion's events, search with filters and fusion, streaming, batches, GetChunk,
retirement and deletion, restart, and request validation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from _retrieval_support import Doc, Harness, ts
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ledgerlens.common.v1 import common_pb2
from ledgerlens.events.v1 import events_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.events import Subjects

pytestmark = pytest.mark.integration

FEES = [
    "The base fee per gas is adjusted every block depending on how full the parent block was.",
    "Transactions specify a max fee per gas and a max priority fee that goes to the miner.",
    "The base fee is burned, removing ether from circulation instead of paying validators.",
]
TOKENS = [
    "A fungible token contract exposes transfer, approve and transferFrom functions.",
    "The allowance mapping records how many tokens a spender may move for an owner.",
    "Events Transfer and Approval must be emitted so wallets can track balances.",
]
NFT = [
    "Each non-fungible token has a unique tokenId and a single owner at any time.",
    "Royalty information lets marketplaces pay creators a share of each secondary sale.",
]
BLOBS = [
    "Blob-carrying transactions attach large data that is pruned after a few weeks.",
    "KZG commitments bind the blob data so that rollups can prove availability cheaply.",
]
ADDRESS = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"


def corpus() -> list[Doc]:
    return [
        Doc("doc_fees", 1, FEES, tags=["core"], published=ts(2019, 4, 13), title="Fee market"),
        Doc(
            "doc_erc20",
            1,
            TOKENS,
            tags=["erc", "token"],
            authors=["Fabian Vogelsteller <fabian@ethereum.org>", "Vitalik Buterin (@vbuterin)"],
            contracts=[ADDRESS],
            published=ts(2015, 11, 19),
            title="Token standard",
        ),
        Doc(
            "doc_nft",
            1,
            NFT,
            chain="polygon",
            tags=["erc", "nft"],
            doc_type=common_pb2.DOC_TYPE_WHITEPAPER,
            published=ts(2021, 6, 1),
            source_url="https://papers.example.com/nft",
            title="NFT royalties",
        ),
        Doc("doc_blobs", 1, BLOBS, tags=["core"], published=None, title="Blob transactions"),
    ]


async def load(harness: Harness, docs: list[Doc]) -> int:
    for doc in docs:
        await harness.publish_doc(doc)
    total = sum(len(d.texts) for d in docs)
    await harness.wait_count(total)
    return total


def code_of(error: grpc.aio.AioRpcError) -> grpc.StatusCode:
    return error.code()


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    fields = []
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return fields


async def test_indexed_chunks_are_found_with_their_provenance(retrieval: Harness) -> None:
    await load(retrieval, corpus())
    response = await retrieval.search("how is the base fee adjusted between blocks", top_k=3)
    assert response.fusion == retrieval_pb2.FUSION_MODE_RRF
    assert response.took_micros > 0
    top = response.results[0]
    assert top.chunk.chunk_id == "doc_fees:1:0"
    assert [r.rank for r in response.results] == [1, 2, 3]
    assert top.HasField("dense_score")
    assert top.HasField("keyword_score")
    assert -1.0 <= top.dense_score <= 1.0
    assert top.keyword_score > 0
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    chunk = top.chunk
    assert chunk.text == FEES[0]
    assert list(chunk.heading_path) == ["Fee market", "Part 0"]
    assert (chunk.char_start, chunk.char_end) == (0, len(FEES[0]))
    assert (chunk.provenance.document_id, chunk.provenance.version) == ("doc_fees", 1)
    assert chunk.provenance.source_url == "https://docs.example.org/doc_fees"
    assert len(chunk.provenance.sha256) == 64
    assert not chunk.provenance.HasField("anchor")
    assert chunk.metadata.title == "Fee market"


FILTERS: list[tuple[dict[str, Any], set[str]]] = [
    ({"chains": ["Polygon"]}, {"doc_nft"}),
    ({"tags": ["core"]}, {"doc_fees", "doc_blobs"}),
    ({"tags": ["nft", "token"]}, {"doc_nft", "doc_erc20"}),
    ({"authors": ["vitalik buterin"]}, {"doc_erc20"}),
    ({"authors": ["@VBUTERIN"]}, {"doc_erc20"}),
    ({"authors": ["Fabian Vogelsteller <fabian@ethereum.org>"]}, {"doc_erc20"}),
    ({"contract_addresses": [ADDRESS.lower()]}, {"doc_erc20"}),
    ({"doc_types": [common_pb2.DOC_TYPE_WHITEPAPER]}, {"doc_nft"}),
    ({"published_after": ts(2019, 4, 13)}, {"doc_fees", "doc_nft"}),  # inclusive
    ({"published_before": ts(2019, 4, 13)}, {"doc_erc20"}),  # exclusive, undated excluded
    ({"published_after": ts(2016), "published_before": ts(2020)}, {"doc_fees"}),
    ({"source_url_prefix": "https://papers.example.com/"}, {"doc_nft"}),
    ({"source_urls": ["https://docs.example.org/doc_blobs"]}, {"doc_blobs"}),
    ({"document_ids": ["doc_fees", "doc_nft"]}, {"doc_fees", "doc_nft"}),
    ({"tags": ["core"], "chains": ["ethereum"], "published_after": ts(2000)}, {"doc_fees"}),
    ({"tags": ["nft"], "chains": ["ethereum"]}, set()),
]


@pytest.mark.parametrize("fusion", [1, 2, 3, 4])
async def test_filters_never_return_a_chunk_that_fails_them(
    retrieval: Harness, fusion: int
) -> None:
    await load(retrieval, corpus())
    for fields, allowed in FILTERS:
        flt = retrieval_pb2.SearchFilter(**fields)
        # a query about everything, so that unfiltered every document would come back
        response = await retrieval.search(
            "token fee blob transactions royalty data contract",
            filter=flt,
            top_k=100,
            fusion=fusion,
        )
        found = {r.chunk.provenance.document_id for r in response.results}
        assert found <= allowed, (fields, found)
        if fusion != retrieval_pb2.FUSION_MODE_KEYWORD:  # dense ranks every allowed chunk
            assert found == allowed, (fields, found)


async def test_a_redelivered_event_does_not_duplicate_chunks(retrieval: Harness) -> None:
    docs = corpus()
    total = await load(retrieval, docs)
    # the same event again under another message id: JetStream stores and delivers it
    await retrieval.publish_doc(docs[0])
    await retrieval.publish_doc(docs[1])
    marker = Doc("doc_marker", 1, ["a marker published after the duplicates"])
    await retrieval.publish_doc(marker)
    await retrieval.wait_count(total + 1)
    response = await retrieval.search("base fee burned ether", top_k=100)
    ids = [r.chunk.chunk_id for r in response.results]
    assert len(ids) == len(set(ids)) == total + 1


async def test_retired_and_deleted_versions_never_come_back(retrieval: Harness) -> None:
    await load(retrieval, corpus())
    v2 = Doc("doc_fees", 2, ["The base fee now targets half of the block gas limit."])
    await retrieval.publish_doc(v2)
    await retrieval.retire("doc_fees", 1)
    await retrieval.wait_count(len(TOKENS) + len(NFT) + len(BLOBS) + 1)
    response = await retrieval.search(
        "base fee per gas", filter=retrieval_pb2.SearchFilter(document_ids=["doc_fees"]), top_k=100
    )
    assert {r.chunk.chunk_id for r in response.results} == {"doc_fees:2:0"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await retrieval.stub.GetChunk(
            retrieval_pb2.GetChunkRequest(chunk_id="doc_fees:1:0"), metadata=retrieval.metadata
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # a late redelivery of the retired version's chunks is not indexed again
    await retrieval.publish_doc(corpus()[0])
    await retrieval.delete("doc_nft", [1])
    marker = Doc("doc_marker", 1, ["published after the late redelivery"])
    await retrieval.publish_doc(marker)
    await retrieval.wait_count(len(TOKENS) + len(BLOBS) + 2)
    response = await retrieval.search("base fee royalty token", top_k=100)
    found = {r.chunk.chunk_id for r in response.results}
    assert not any(cid.startswith(("doc_fees:1:", "doc_nft:")) for cid in found)

    # chunks of a version retired before they arrive are never indexed
    await retrieval.retire("doc_blobs", 7)
    await retrieval.publish_doc(Doc("doc_blobs", 7, ["a version retired before its chunks"]))
    await retrieval.publish_doc(Doc("doc_marker2", 1, ["another marker"]))
    await retrieval.wait_count(len(TOKENS) + len(BLOBS) + 3)
    response = await retrieval.search("a version retired before its chunks", top_k=100)
    assert "doc_blobs:7:0" not in {r.chunk.chunk_id for r in response.results}


async def test_restart_keeps_the_index(
    start_retrieval: Callable[..., Any], backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ledgerlens.services.retrieval")
    async with start_retrieval() as first:
        total = await load(first, corpus())
        await first.retire("doc_nft", 1)
        await first.wait_count(total - len(NFT))
        before = await first.search("tokens and fees", top_k=20)
        before_dense = await first.search(
            "tokens and fees", top_k=20, fusion=retrieval_pb2.FUSION_MODE_DENSE
        )
        anchor = common_pb2.LedgerAnchor(tx_id="ab" * 32, block_number=7, channel="ledgerlens")
        await first.publish(
            Subjects.LEDGER_ANCHOR_COMMITTED,
            events_pb2.AnchorCommitted(
                document_id="doc_fees", version=1, sha256=corpus()[0].sha256, anchor=anchor
            ),
        )

        async def anchored() -> bool:
            got = await first.stub.GetChunk(
                retrieval_pb2.GetChunkRequest(chunk_id="doc_fees:1:0"), metadata=first.metadata
            )
            return bool(got.chunk.provenance.anchor.tx_id)

        await first.wait_for(anchored)
    async with start_retrieval() as second:
        assert await second.indexed() == total - len(NFT)
        if backend == "local":  # the graph came from its snapshot, not a rebuild
            assert "loaded HNSW snapshot of 8 chunks" in caplog.text
        after = await second.search("tokens and fees", top_k=20)
        # BM25 statistics may shift when tantivy merges segments (deleted chunks stop
        # counting), so the hybrid order may too; the chunks and the dense order may not
        assert {r.chunk.chunk_id for r in after.results} == {
            r.chunk.chunk_id for r in before.results
        }
        after_dense = await second.search(
            "tokens and fees", top_k=20, fusion=retrieval_pb2.FUSION_MODE_DENSE
        )
        assert [r.chunk.chunk_id for r in after_dense.results] == [
            r.chunk.chunk_id for r in before_dense.results
        ]
        fees = await second.search(
            "base fee", filter=retrieval_pb2.SearchFilter(document_ids=["doc_fees"]), top_k=1
        )
        assert fees.results[0].chunk.provenance.anchor.tx_id == "ab" * 32
        assert fees.results[0].chunk.provenance.anchor.block_number == 7
        # the retired version stays retired across the restart
        await second.publish_doc(corpus()[2])
        await second.publish_doc(Doc("doc_marker", 1, ["after restart"]))
        await second.wait_count(total - len(NFT) + 1)


async def test_search_stream_batch_and_get_chunk(retrieval: Harness) -> None:
    await load(retrieval, corpus())
    request = retrieval_pb2.SearchRequest(query="token allowance for a spender", top_k=5)
    unary = await retrieval.stub.Search(request, metadata=retrieval.metadata)
    streamed = [
        m.result
        async for m in retrieval.stub.SearchStream(
            retrieval_pb2.SearchStreamRequest(search=request), metadata=retrieval.metadata
        )
    ]
    assert [r.chunk.chunk_id for r in streamed] == [r.chunk.chunk_id for r in unary.results]
    assert [r.rank for r in streamed] == list(range(1, 6))

    queries = ["blob data availability", "royalties for creators", "base fee burned"]
    batch = await retrieval.stub.BatchSearch(
        retrieval_pb2.BatchSearchRequest(
            searches=[retrieval_pb2.SearchRequest(query=q, top_k=2) for q in queries]
        ),
        metadata=retrieval.metadata,
    )
    tops = [r.results[0].chunk.provenance.document_id for r in batch.responses]
    assert tops == ["doc_blobs", "doc_nft", "doc_fees"]

    got = await retrieval.stub.GetChunk(
        retrieval_pb2.GetChunkRequest(chunk_id="doc_erc20:1:1"), metadata=retrieval.metadata
    )
    assert got.chunk.text == TOKENS[1]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await retrieval.stub.GetChunk(
            retrieval_pb2.GetChunkRequest(chunk_id="doc_nope:1:0"), metadata=retrieval.metadata
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_fusion_modes_and_min_score(retrieval: Harness) -> None:
    await load(retrieval, corpus())
    query = "transferFrom approve"
    dense = await retrieval.search(query, fusion=retrieval_pb2.FUSION_MODE_DENSE, top_k=10)
    assert all(r.HasField("dense_score") and not r.HasField("keyword_score") for r in dense.results)
    assert [r.score for r in dense.results] == [r.dense_score for r in dense.results]
    keyword = await retrieval.search(query, fusion=retrieval_pb2.FUSION_MODE_KEYWORD, top_k=10)
    # BM25 matches only chunks with the words (stemmed: "approve" also finds "Approval")
    assert keyword.results[0].chunk.chunk_id == "doc_erc20:1:0"
    assert {r.chunk.chunk_id for r in keyword.results} == {"doc_erc20:1:0", "doc_erc20:1:2"}
    weighted = await retrieval.search(
        query, fusion=retrieval_pb2.FUSION_MODE_WEIGHTED, dense_weight=0.0, top_k=3
    )
    assert weighted.results[0].chunk.chunk_id == "doc_erc20:1:0"
    assert weighted.results[0].score == pytest.approx(1.0)
    threshold = dense.results[2].score
    cut = await retrieval.search(
        query, fusion=retrieval_pb2.FUSION_MODE_DENSE, min_score=threshold, top_k=10
    )
    assert len(cut.results) == 3
    assert all(r.score >= threshold for r in cut.results)


def _with_unknown_field(message: Any, number: int) -> Any:
    # a field this contract does not have, as a newer client would send it (varint 1)
    key, tag = number << 3, bytearray()
    while key >= 0x80:  # the tag as a protobuf varint
        tag.append((key & 0x7F) | 0x80)
        key >>= 7
    tag.append(key)
    raw = message.SerializeToString() + bytes(tag) + b"\x01"
    return type(message).FromString(raw)


async def test_invalid_requests_are_invalid_argument_naming_the_field(
    retrieval: Harness,
) -> None:
    unknown_filter = _with_unknown_field(retrieval_pb2.SearchFilter(chains=["ethereum"]), 99)
    cases: list[tuple[retrieval_pb2.SearchRequest, str]] = [
        (retrieval_pb2.SearchRequest(query="   "), "query"),
        (retrieval_pb2.SearchRequest(query="x" * 2001), "query"),
        (retrieval_pb2.SearchRequest(query="fees", top_k=101), "top_k"),
        (retrieval_pb2.SearchRequest(query="fees", top_k=-1), "top_k"),
        (retrieval_pb2.SearchRequest(query="fees", filter=unknown_filter), "filter"),
        (_with_unknown_field(retrieval_pb2.SearchRequest(query="fees"), 42), "(request)"),
        (
            retrieval_pb2.SearchRequest(
                query="fees",
                filter=retrieval_pb2.SearchFilter(
                    published_after=ts(2021), published_before=ts(2020)
                ),
            ),
            "filter.published_before",
        ),
        (
            retrieval_pb2.SearchRequest(
                query="fees",
                filter=retrieval_pb2.SearchFilter(
                    published_after=timestamp_pb2.Timestamp(seconds=10**12)
                ),
            ),
            "filter.published_after",
        ),
        (
            retrieval_pb2.SearchRequest(
                query="fees",
                filter=retrieval_pb2.SearchFilter(contract_addresses=[ADDRESS.replace("a", "A")]),
            ),
            "filter.contract_addresses[0]",
        ),
        (
            retrieval_pb2.SearchRequest(
                query="fees", filter=retrieval_pb2.SearchFilter(doc_types=[0])
            ),
            "filter.doc_types[0]",
        ),
        (retrieval_pb2.SearchRequest(query="fees", dense_weight=0.3), "dense_weight"),
        (
            retrieval_pb2.SearchRequest(
                query="fees", fusion=retrieval_pb2.FUSION_MODE_WEIGHTED, dense_weight=1.5
            ),
            "dense_weight",
        ),
        (retrieval_pb2.SearchRequest(query="fees", min_score=float("nan")), "min_score"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await retrieval.stub.Search(request, metadata=retrieval.metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in violations(caught.value), (field, caught.value.details())
        assert (
            field.split("[")[0].split(".")[-1] in (caught.value.details() or "")
            or field == "(request)"
        )

    # the stream fails before any result; a batch names the search at fault
    received = []
    stream = retrieval.stub.SearchStream(
        retrieval_pb2.SearchStreamRequest(search=retrieval_pb2.SearchRequest(query="")),
        metadata=retrieval.metadata,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        received += [message async for message in stream]
    assert received == []
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_batch = retrieval_pb2.BatchSearchRequest(
        searches=[
            retrieval_pb2.SearchRequest(query="fees"),
            retrieval_pb2.SearchRequest(query="fees", top_k=500),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await retrieval.stub.BatchSearch(bad_batch, metadata=retrieval.metadata)
    assert "searches[1].top_k" in violations(caught.value)
    too_many = retrieval_pb2.BatchSearchRequest(
        searches=[retrieval_pb2.SearchRequest(query="fees")] * 65
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await retrieval.stub.BatchSearch(too_many, metadata=retrieval.metadata)
    assert "searches" in violations(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await retrieval.stub.Search(
            retrieval_pb2.SearchRequest(query="fees"),
            metadata=(("authorization", "Bearer not-a-token"),),
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
