"""The RAG pipeline: packing to the token budget, [n] -> chunk citations with verbatim
quotes, retrieval failures, and (integration) a real retrieval service fed by real
ingestion over gRPC, answered by the local extractive provider."""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from _inference_rag_support import corpus_services
from pydantic import SecretStr

from ledgerlens.common.v1 import common_pb2
from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.clients import (
    ServiceClient,
    retrieval_client,
    service_token_provider,
    static_token,
)
from ledgerlens.runtime.errors import InvalidArgument, Unavailable
from ledgerlens.runtime.settings import ServiceSettings
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.inference import templates
from ledgerlens.services.inference.model import ChatParams, Deadline
from ledgerlens.services.inference.providers import extractive
from ledgerlens.services.inference.rag import (
    DEFAULT_TOP_K,
    Prepared,
    Rag,
    quote_for,
    retrieval_search,
)
from ledgerlens.services.inference.tokens import default_counter


def words(text: str) -> int:
    """A deterministic stand-in tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def result(
    n: int, text: str, *, title: str = "EIP-1559: Fee market change", anchored: bool = True
) -> retrieval_pb2.SearchResult:
    provenance = common_pb2.Provenance(
        document_id=f"doc-{n}", version=1, source_url=f"https://eips.example/{n}", sha256="ab" * 32
    )
    if anchored:
        provenance.anchor.tx_id = f"tx-{n}"
    chunk = retrieval_pb2.Chunk(
        chunk_id=f"doc-{n}:1:0",
        text=text,
        heading_path=[title, "Specification"],
        provenance=provenance,
        metadata=common_pb2.DocumentMetadata(title=title),
    )
    return retrieval_pb2.SearchResult(chunk=chunk, score=1.0 / n, rank=n)


class FakeSearch:
    def __init__(self, results: Sequence[retrieval_pb2.SearchResult]) -> None:
        self.results = list(results)
        self.calls: list[tuple[str, retrieval_pb2.SearchFilter | None, int, Deadline | None]] = []

    async def __call__(
        self,
        query: str,
        filter: retrieval_pb2.SearchFilter | None,
        top_k: int,
        *,
        deadline: Deadline | None = None,
    ) -> list[retrieval_pb2.SearchResult]:
        self.calls.append((query, filter, top_k, deadline))
        return self.results[:top_k]


FEE = result(
    1,
    "The base fee per gas is burned by the protocol. Miners only keep the priority fee. "
    "The base fee is adjusted up or down by at most 12.5% per block.",
)
SIZE = result(2, "Blocks target 15 million gas and may use up to 30 million gas.")
BLOB = result(3, "Blob transactions carry data that is pruned after about 18 days.", anchored=False)


# ------------------------------------------------------------------------ packing


def passage_lengths(n: int, size: int) -> list[retrieval_pb2.SearchResult]:
    return [result(i, " ".join(f"w{i}x{j}" for j in range(size))) for i in range(1, n + 1)]


@pytest.mark.parametrize("budget", [170, 260, 401, 2000])
async def test_packing_keeps_whole_passages_in_score_order_within_the_budget(
    budget: int,
) -> None:
    results = passage_lengths(8, 50)
    rag = Rag(FakeSearch(results), words, prompt_token_budget=budget)
    prepared = await rag.prepare("how is the base fee burned", top_k=8)
    assert prepared.prompt_tokens <= budget
    assert prepared.prompt_tokens == rag.prompt_tokens(prepared.messages)
    packed = [p.result for p in prepared.passages]
    assert packed == results[: len(packed)]  # a best-ranked prefix
    assert all(p.text == p.chunk.text for p in prepared.passages)  # whole passages
    assert [p.number for p in prepared.passages] == list(range(1, len(packed) + 1))
    assert prepared.by_number == {p.number: p.result for p in prepared.passages}
    if len(packed) < len(results):  # the next one would not have fitted
        bigger = prepared.template.render(
            "how is the base fee burned", [r.chunk.text for r in results[: len(packed) + 1]]
        )
        assert rag.prompt_tokens(bigger) > budget
    else:
        assert budget == 2000


async def test_packing_with_the_local_tokenizer_respects_the_budget() -> None:
    count = default_counter().count
    results = passage_lengths(10, 80)
    rag = Rag(FakeSearch(results), count, prompt_token_budget=1200)
    prepared = await rag.prepare("base fee", top_k=10)
    assert 0 < len(prepared.passages) < 10
    assert rag.prompt_tokens(prepared.messages) == prepared.prompt_tokens <= 1200


async def test_a_best_passage_too_large_alone_is_cut_at_a_word_boundary() -> None:
    huge = result(1, " ".join(f"word{j}" for j in range(2000)))
    rag = Rag(FakeSearch([huge, SIZE]), words, prompt_token_budget=500)
    prepared = await rag.prepare("q", top_k=2)
    (only,) = prepared.passages
    assert only.truncated
    assert huge.chunk.text.startswith(only.text)
    assert huge.chunk.text[len(only.text)] == " "
    assert 400 < prepared.prompt_tokens <= 500


async def test_a_budget_below_the_bare_prompt_packs_nothing() -> None:
    rag = Rag(FakeSearch([FEE]), words, prompt_token_budget=20)
    prepared = await rag.prepare("how is the base fee burned")
    assert prepared.passages == ()
    assert prepared.retrieved == 1


async def test_prepare_passes_filter_top_k_and_deadline_to_retrieval() -> None:
    search = FakeSearch([FEE, SIZE])
    rag = Rag(search, words)
    chosen = retrieval_pb2.SearchFilter(chains=["ethereum"])
    deadline = Deadline.after(5)
    prepared = await rag.prepare(" base fee ", chosen, 0, "answer@1", deadline=deadline)
    assert search.calls == [("base fee", chosen, DEFAULT_TOP_K, deadline)]
    assert prepared.template_ref == "answer@1"
    assert [m.role for m in prepared.messages] == ["system", "user"]
    assert extractive.format_passages([(1, FEE.chunk.text), (2, SIZE.chunk.text)]) in (
        prepared.messages[1].content
    )


@pytest.mark.parametrize(
    ("query", "top_k", "template", "field"),
    [("", 0, "", "query"), ("x" * 2001, 0, "", "query"), ("q", 51, "", "top_k"),
     ("q", -1, "", "top_k"), ("q", 0, "answer@7", "template")],
)  # fmt: skip
async def test_invalid_requests_fail_before_retrieval(
    query: str, top_k: int, template: str, field: str
) -> None:
    search = FakeSearch([FEE])
    with pytest.raises(InvalidArgument) as caught:
        await Rag(search, words).prepare(query, None, top_k, template)
    assert field in [f for f, _ in caught.value.violations]
    assert search.calls == []


async def test_zero_results_prepare_the_no_passages_answer() -> None:
    prepared = await Rag(FakeSearch([]), words).prepare("how is the base fee burned")
    assert prepared.passages == ()
    assert prepared.no_passages_answer == templates.get("answer").no_passages
    assert prepared.template.is_no_answer(prepared.no_passages_answer)


# ---------------------------------------------------------------------- citations


async def prepared_for(*results: retrieval_pb2.SearchResult) -> tuple[Rag, Prepared]:
    rag = Rag(FakeSearch(results), words)
    return rag, await rag.prepare("how is the base fee burned", top_k=len(results))


async def test_citations_map_each_distinct_marker_to_its_chunk_in_first_appearance_order() -> None:
    rag, prepared = await prepared_for(FEE, SIZE, BLOB)
    answer = (
        "Blocks target 15 million gas [2]. The base fee per gas is burned by the protocol [1]. "
        "Miners only keep the priority fee. [1] Blob data is pruned [3][2]."
    )
    citations, grounded = rag.citations(answer, prepared)
    assert grounded
    assert [c.number for c in citations] == [2, 1, 3]
    by_number = {c.number: c for c in citations}
    fee = by_number[1]
    assert fee.chunk_id == FEE.chunk.chunk_id
    assert fee.provenance == FEE.chunk.provenance
    assert fee.provenance.anchor.tx_id == "tx-1"
    assert list(fee.heading_path) == ["EIP-1559: Fee market change", "Specification"]
    assert fee.title == "EIP-1559: Fee market change"
    # both sentences attributed to [1] occur in the chunk: the quote spans them, verbatim
    assert fee.quote == (
        "The base fee per gas is burned by the protocol. Miners only keep the priority fee."
    )
    assert by_number[2].quote == "Blocks target 15 million gas"
    assert not by_number[3].HasField("provenance") or by_number[3].provenance.document_id
    for citation in citations:
        chunk = prepared.by_number[citation.number].chunk
        assert citation.quote in chunk.text


async def test_a_paraphrase_is_quoted_by_the_best_matching_chunk_sentence() -> None:
    rag, prepared = await prepared_for(FEE, SIZE)
    citations, grounded = rag.citations("It changes by 12.5% per block at most [1].", prepared)
    assert grounded
    assert citations[0].quote == ("The base fee is adjusted up or down by at most 12.5% per block.")


async def test_markers_without_a_passage_are_dropped_and_the_text_is_kept() -> None:
    rag, prepared = await prepared_for(FEE, SIZE)
    citations, grounded = rag.citations("Gas is burned [7]. Blocks target gas [0, 2].", prepared)
    assert [c.number for c in citations] == [2]
    assert grounded
    citations, grounded = rag.citations("Gas is burned [7].", prepared)
    assert citations == []
    assert not grounded


async def test_no_answer_and_uncited_answers_are_not_grounded() -> None:
    rag, prepared = await prepared_for(FEE)
    assert rag.citations(prepared.template.no_answer, prepared) == ([], False)
    assert rag.citations("The base fee is burned.", prepared) == ([], False)
    citations, grounded = rag.citations(
        f"{prepared.template.no_answer} The closest is [1].", prepared
    )
    assert len(citations) == 1
    assert not grounded


def test_quotes_are_verbatim_even_across_different_whitespace_and_quote_marks() -> None:
    text = "Intro line.\n\nThe `BASE_FEE`   is  burned\nentirely. Other text."
    assert quote_for(text, ['Passage 1 says: "The `BASE_FEE` is burned entirely."']) == (
        "The `BASE_FEE`   is  burned\nentirely."
    )
    assert quote_for(text, []) == "Intro line."
    assert quote_for(text, [], "what is burned") == "The `BASE_FEE`   is  burned\nentirely."


# ------------------------------------------------------------------ retrieval errors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
async def test_retrieval_down_is_unavailable_with_a_clear_message() -> None:
    async with retrieval_client(f"127.0.0.1:{free_port()}", retry=None) as client:
        rag = Rag(retrieval_search(client, default_timeout=2.0), words)
        with pytest.raises(Unavailable, match="retrieval") as caught:
            await rag.prepare("how is the base fee burned")
    assert caught.value.reason in {"RETRIEVAL_UNAVAILABLE", "RETRIEVAL_TIMEOUT"}


# -------------------------------------------------------------------- integration


@pytest.mark.integration
@pytest.mark.slow
async def test_extractive_answers_over_a_real_retrieval_service_cite_chunks_that_hold_the_quote(
    nats_url: str, event_names: EventNames, cached_embedder: CachingEmbedder, tmp_path: Path
) -> None:
    issuer = DevTokenIssuer()
    # inference calls retrieval with its own service token (search:read), as deployed
    async with corpus_services(nats_url, event_names, cached_embedder, tmp_path, issuer) as corpus:
        inference_settings = ServiceSettings(
            service_name="inference", service_token=SecretStr(corpus.service_token)
        )
        async with retrieval_client(
            corpus.retrieval_address, token_provider=service_token_provider(inference_settings)
        ) as client:
            await _answer_over(client, corpus.retrieval_address, issuer)


async def _answer_over(
    client: ServiceClient[Any], retrieval_address: str, issuer: DevTokenIssuer
) -> None:
    rag = Rag(retrieval_search(client), default_counter().count, prompt_token_budget=2500)
    provider = extractive_provider()

    prepared = await rag.prepare("how is the base fee burned", top_k=6)
    assert prepared.passages
    assert prepared.prompt_tokens <= 2500
    answer = await answer_with(provider, prepared)
    citations, grounded = rag.citations(answer, prepared)
    assert grounded, answer
    assert citations
    numbers = [int(n) for n in re.findall(r"\[(\d+)\]", answer)]
    assert [c.number for c in citations] == list(dict.fromkeys(numbers))
    for citation in citations:
        chunk = prepared.by_number[citation.number].chunk
        assert citation.chunk_id == chunk.chunk_id
        assert citation.quote
        assert citation.quote in chunk.text
        # the extractive answerer quotes whole sentences: the quote is the cited one
        assert citation.quote in answer
        assert citation.provenance.document_id
        assert citation.provenance.source_url.startswith("https://eips.ethereum.org/EIPS/")
        assert re.fullmatch(r"[0-9a-f]{64}", citation.provenance.sha256)
        assert citation.title
        assert list(citation.heading_path)
    assert any("eip-1559" in c.provenance.source_url for c in citations)

    unrelated = await rag.prepare("what is the best recipe for sourdough bread", top_k=6)
    answer = await answer_with(provider, unrelated)
    citations, grounded = rag.citations(answer, unrelated)
    assert unrelated.passages  # retrieval always finds something; it does not answer
    assert answer == unrelated.template.no_answer
    assert citations == []

    # retrieval's own validation reaches the caller; a refused service token does not
    with pytest.raises(InvalidArgument) as caught:
        await rag.prepare("base fee", retrieval_pb2.SearchFilter(contract_addresses=["0x1"]))
    assert any(f.startswith("filter.") for f, _ in caught.value.violations)
    wrong = static_token(issuer.issue("inference", ["inference:invoke"], ttl=60))
    async with retrieval_client(retrieval_address, token_provider=wrong) as refused:
        with pytest.raises(Unavailable) as down:
            await Rag(retrieval_search(refused), words).prepare("base fee")
    assert down.value.reason == "RETRIEVAL_AUTH"
    assert not grounded, answer


def extractive_provider() -> extractive.ExtractiveProvider:
    return extractive.ExtractiveProvider()


async def answer_with(provider: extractive.ExtractiveProvider, prepared: Prepared) -> str:
    model = provider.models[0]
    completion = await provider.chat(
        ChatParams(model=model, messages=prepared.messages, temperature=0), Deadline.after(30)
    )
    return completion.text


class _RecordingStub:
    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def Search(
        self,
        request: retrieval_pb2.SearchRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC stub's signature
    ) -> retrieval_pb2.SearchResponse:
        self.timeouts.append(timeout)
        return retrieval_pb2.SearchResponse()


async def test_retrieval_is_bounded_by_the_default_timeout_and_the_callers_deadline() -> None:
    stub = _RecordingStub()
    search = retrieval_search(stub, default_timeout=10.0)  # type: ignore[arg-type]
    await search("q", None, 3, deadline=Deadline())  # a call without a deadline
    await search("q", None, 3, deadline=Deadline.after(2.0))
    await search("q", None, 3, deadline=Deadline.after(60.0))
    await search("q", None, 3)
    assert stub.timeouts[0] == 10.0
    assert stub.timeouts[1] is not None
    assert 1.5 < stub.timeouts[1] <= 2.0
    assert stub.timeouts[2:] == [10.0, 10.0]
