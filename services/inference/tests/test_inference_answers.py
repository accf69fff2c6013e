"""Answer, AnswerStream and Embed through the inference service's gRPC API, in front of
a REAL retrieval service (fed by real ingestion with a few EIPs) and the default local
extractive provider, plus an OpenAI-compatible stand-in for remote embeddings.

Starting retrieval, ingestion and the index takes seconds, so the whole stack is started
once for this module (one event loop for the module; each test uses its own questions,
inputs or API key, so none depends on another's state)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import pytest_asyncio
from _inference_rag_support import Corpus, corpus_services
from _openai_standin import OpenAIStandIn

from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.events.v1 import events_pb2
from ledgerlens.inference.v1 import inference_pb2, inference_pb2_grpc
from ledgerlens.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.events import CONSUMERS, EventBus
from ledgerlens.runtime.events.bus import EventContext
from ledgerlens.runtime.events.specs import Subjects
from ledgerlens.runtime.testing import EventNames, delete_streams
from ledgerlens.services.inference.app import REVOKED_CONSUMER, run_inference
from ledgerlens.services.inference.settings import Settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
]

QUESTION = "how is the base fee burned"
UNRELATED = "what is the best recipe for sourdough bread"
REMOTE_EMBED = "remote/text-embed-standin"
#: the stand-in embedding model's price: micro-USD per 1k tokens
EMBED_PRICE = 20_000


class Recorded:
    """CompletionRecorded events of the module's namespace, by completion id."""

    def __init__(self) -> None:
        self.events: dict[str, events_pb2.CompletionRecorded] = {}
        self._arrived = asyncio.Condition()

    async def __call__(self, event: events_pb2.CompletionRecorded, _ctx: EventContext) -> None:
        async with self._arrived:
            self.events[event.completion_id] = event
            self._arrived.notify_all()

    async def get(self, completion_id: str, within: float = 10.0) -> events_pb2.CompletionRecorded:
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: completion_id in self.events), within
            )
            return self.events[completion_id]


@dataclass
class Stack:
    corpus: Corpus
    stub: inference_pb2_grpc.InferenceServiceStub
    retrieval: retrieval_pb2_grpc.RetrievalServiceStub
    standin: OpenAIStandIn
    issuer: DevTokenIssuer
    recorded: Recorded

    def auth(self, key: str = "llk_answers") -> Any:
        token = self.issuer.issue(key, ["inference:invoke", "usage:read"], tenant="acme", ttl=3600)
        return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def embed_standin() -> Iterator[OpenAIStandIn]:
    with OpenAIStandIn(embedding_dimensions=8) as standin:
        yield standin


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    nats_url: str,
    cached_embedder: CachingEmbedder,
    tmp_path_factory: pytest.TempPathFactory,
    embed_standin: OpenAIStandIn,
) -> AsyncIterator[Stack]:
    names = EventNames(secrets.token_hex(4))
    tmp: Path = tmp_path_factory.mktemp("answers")
    issuer = DevTokenIssuer()
    try:
        async with corpus_services(nats_url, names, cached_embedder, tmp, issuer) as corpus:
            settings = Settings.model_validate(
                {
                    "database_url": f"sqlite+aiosqlite:///{tmp}/inference.db",
                    "nats_url": nats_url,
                    "host": "127.0.0.1",
                    "grpc_port": 0,
                    "http_port": 0,
                    "data_dir": str(tmp / "inference"),
                    "shutdown_grace_seconds": 2.0,
                    "outbox_poll_seconds": 0.2,
                    "auth": {"static_jwks": json.dumps(issuer.jwks()), "issuer": issuer.issuer},
                    "service_token": corpus.service_token,
                    "rag": {"retrieval_target": corpus.retrieval_address},
                    # the default local provider and aliases, plus a remote embedder
                    "providers": [
                        {
                            "name": "local",
                            "kind": "extractive",
                            "models": ["extractive", "all-MiniLM-L6-v2"],
                        },
                        {
                            "name": "remote",
                            "kind": "openai",
                            "base_url": embed_standin.base_url,
                            "api_key": "sk-test",
                            "models": ["text-embed-standin"],
                            "prices": {"text-embed-standin": {"input_per_1k": EMBED_PRICE}},
                        },
                    ],
                }
            )
            recorded = Recorded()
            bus = await EventBus.connect(nats_url, f"test-{names.token}")
            async with (
                run_inference(
                    settings,
                    embedder=cached_embedder,
                    streams=names.platform_streams(),
                    revoked_consumer=names.consumer(REVOKED_CONSUMER),
                    subject=names.subject,
                ) as running,
                grpc.aio.insecure_channel(running.grpc_address) as channel,
                grpc.aio.insecure_channel(corpus.retrieval_address) as retrieval_channel,
            ):
                spec = next(
                    c
                    for c in CONSUMERS
                    if c.filter_subject == Subjects.INFERENCE_COMPLETION_RECORDED
                )
                await bus.subscribe(names.consumer(spec), events_pb2.CompletionRecorded, recorded)
                try:
                    yield Stack(
                        corpus,
                        inference_pb2_grpc.InferenceServiceStub(channel),
                        retrieval_pb2_grpc.RetrievalServiceStub(retrieval_channel),
                        embed_standin,
                        issuer,
                        recorded,
                    )
                finally:
                    await bus.close(grace_seconds=2.0)
    finally:
        await delete_streams(nats_url, names)


async def get_chunk(stack: Stack, chunk_id: str) -> retrieval_pb2.Chunk:
    token = stack.issuer.issue("tester", ["search:read"], ttl=600)
    response = await stack.retrieval.GetChunk(
        retrieval_pb2.GetChunkRequest(chunk_id=chunk_id),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    return response.chunk


async def answer_stream(
    stack: Stack, request: inference_pb2.AnswerRequest, metadata: Any
) -> list[inference_pb2.AnswerStreamResponse]:
    call = stack.stub.AnswerStream(
        inference_pb2.AnswerStreamRequest(answer=request), metadata=metadata
    )
    return [event async for event in call]


async def test_answer_and_stream_are_grounded_cite_chunks_holding_the_quote_and_agree(
    stack: Stack,
) -> None:
    metadata = stack.auth()
    request = inference_pb2.AnswerRequest(query=QUESTION, top_k=6)
    answer = await stack.stub.Answer(request, metadata=metadata, timeout=30)

    assert answer.grounded, answer.answer
    assert answer.citations
    assert (answer.provider, answer.model) == ("local", "extractive")
    assert answer.template == "answer@1"
    numbers = [int(n) for n in re.findall(r"\[(\d+)\]", answer.answer)]
    assert [c.number for c in answer.citations] == list(dict.fromkeys(numbers))
    for citation in answer.citations:
        chunk = await get_chunk(stack, citation.chunk_id)  # retrieval's own copy
        assert citation.quote
        assert citation.quote in chunk.text
        assert citation.quote in answer.answer  # the extractive answerer quotes
        assert citation.provenance == chunk.provenance
        assert citation.provenance.source_url.startswith("https://eips.ethereum.org/EIPS/")
    assert any("eip-1559" in c.provenance.source_url for c in answer.citations)
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.completion_tokens > 0
    assert answer.usage.estimated  # the local provider reports none: counted locally
    assert answer.usage.cost_micro_usd == 0  # local providers have no price

    events = await answer_stream(stack, request, metadata)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-3:] == ["citations", "usage", "final"]
    assert set(kinds[:-3]) == {"delta"}
    assert "".join(e.delta for e in events[:-3]) == answer.answer
    citations, usage, final = events[-3].citations, events[-2].usage, events[-1].final
    assert citations.grounded
    assert list(citations.citations) == list(answer.citations)
    assert usage == answer.usage
    assert final.template == answer.template == "answer@1"
    assert (final.provider, final.model) == (answer.provider, answer.model)
    assert final.completion_id
    assert final.completion_id != answer.completion_id
    assert not final.cached


async def test_an_unrelated_question_is_not_grounded(stack: Stack) -> None:
    request = inference_pb2.AnswerRequest(query=UNRELATED, top_k=6)
    answer = await stack.stub.Answer(request, metadata=stack.auth(), timeout=30)
    assert not answer.grounded
    assert list(answer.citations) == []
    assert answer.answer == "The passages do not answer the question."


async def test_the_answers_event_carries_cited_chunk_ids_and_hashes_only(stack: Stack) -> None:
    request = inference_pb2.AnswerRequest(query=QUESTION, top_k=4)
    answer = await stack.stub.Answer(request, metadata=stack.auth("llk_audit"), timeout=30)
    assert answer.citations

    event = await stack.recorded.get(answer.completion_id)
    assert event.kind == events_pb2.COMPLETION_KIND_ANSWER
    assert (event.tenant_id, event.api_key_id) == ("acme", "llk_audit")
    assert list(event.cited_chunk_ids) == [c.chunk_id for c in answer.citations]
    assert re.fullmatch(r"[0-9a-f]{64}", event.prompt_sha256)
    assert re.fullmatch(r"[0-9a-f]{64}", event.answer_sha256)
    assert event.prompt_tokens == answer.usage.prompt_tokens
    assert event.completion_tokens == answer.usage.completion_tokens
    payload = event.SerializeToString()
    assert QUESTION.encode() not in payload
    for citation in answer.citations:  # neither the answer nor a passage
        assert citation.quote.encode() not in payload


async def test_local_embeddings_are_384_dims_normalised_and_cached(stack: Stack) -> None:
    inputs = ["The base fee is burned.", "Blocks target 15 million gas."]
    metadata = stack.auth("llk_embed_local")
    first = await stack.stub.Embed(inference_pb2.EmbedRequest(inputs=inputs), metadata=metadata)
    assert first.dimensions == 384
    assert first.model == "all-MiniLM-L6-v2"
    assert [e.index for e in first.embeddings] == [0, 1]
    for embedding in first.embeddings:
        assert len(embedding.values) == 384
        assert math.sqrt(sum(v * v for v in embedding.values)) == pytest.approx(1.0, abs=1e-4)
    assert first.usage.prompt_tokens > 0
    assert first.usage.completion_tokens == 0

    again = await stack.stub.Embed(inference_pb2.EmbedRequest(inputs=inputs), metadata=metadata)
    assert [list(e.values) for e in again.embeddings] == [list(e.values) for e in first.embeddings]
    assert again.usage.total_tokens == 0  # every vector from the cache: nothing embedded


async def test_remote_embeddings_report_the_providers_usage_and_cost_and_are_cached(
    stack: Stack,
) -> None:
    standin, metadata = stack.standin, stack.auth("llk_embed_remote")
    before = standin.calls("embeddings")
    inputs = ["alpha beta gamma", "delta epsilon"]
    first = await stack.stub.Embed(
        inference_pb2.EmbedRequest(model=REMOTE_EMBED, inputs=inputs), metadata=metadata
    )
    assert first.dimensions == 8
    assert first.model == "text-embed-standin"
    assert first.usage.prompt_tokens == 5  # the stand-in counts words
    assert not first.usage.estimated
    assert first.usage.cost_micro_usd == 5 * EMBED_PRICE // 1000
    assert standin.calls("embeddings") == before + 1

    # one cached input, one new: only the new one reaches the provider, in input order
    mixed = await stack.stub.Embed(
        inference_pb2.EmbedRequest(model=REMOTE_EMBED, inputs=["zeta eta", inputs[1]]),
        metadata=metadata,
    )
    assert standin.calls("embeddings") == before + 2
    assert standin.requests[-1].body["input"] == ["zeta eta"]
    assert list(mixed.embeddings[1].values) == list(first.embeddings[1].values)
    assert mixed.usage.prompt_tokens == 2

    cached = await stack.stub.Embed(
        inference_pb2.EmbedRequest(model=REMOTE_EMBED, inputs=inputs), metadata=metadata
    )
    assert standin.calls("embeddings") == before + 2
    assert [list(e.values) for e in cached.embeddings] == [list(e.values) for e in first.embeddings]
    assert cached.usage.cost_micro_usd == 0
