"""LocalEmbedder with the real bundled all-MiniLM-L6-v2 (loaded once, by the plugin fixture)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ledgerlens.embedding import (
    Embedder,
    EmbeddingError,
    EmbeddingSettings,
    LocalEmbedder,
    create_embedder,
)

pytestmark = pytest.mark.slow

QUERY = "EIP-1559 base fee burn"
RELATED = (
    "Ethereum's London upgrade changed the fee market: every block has a base fee per "
    "gas that is burned, and users add a priority tip for the validator."
)
UNRELATED = "Whisk the eggs with sugar, fold in the flour and bake the cake for forty minutes."


def _cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b))


def test_is_an_embedder(local_embedder: LocalEmbedder) -> None:
    assert isinstance(local_embedder, Embedder)
    assert local_embedder.model == "all-MiniLM-L6-v2"
    assert local_embedder.dimensions == 384
    assert local_embedder.max_tokens == 254


async def test_vectors_are_normalised_and_deterministic(local_embedder: LocalEmbedder) -> None:
    texts = [QUERY, RELATED, UNRELATED, "", "🙂"]
    first = await local_embedder.embed(texts)
    second = await local_embedder.embed(texts)
    assert len(first) == len(texts)
    for vector in first:
        assert len(vector) == 384
        assert all(isinstance(x, float) for x in vector)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(first, second, atol=1e-6)


async def test_empty_input_gives_nothing(local_embedder: LocalEmbedder) -> None:
    assert await local_embedder.embed([]) == []


async def test_one_text_is_not_a_list_of_characters(local_embedder: LocalEmbedder) -> None:
    with pytest.raises(TypeError):
        await local_embedder.embed(QUERY)


async def test_batched_equals_one_by_one(local_embedder: LocalEmbedder) -> None:
    # More texts than a batch, of very different lengths, so batches are padded.
    texts = [f"{i}: " + " ".join([RELATED] * (i % 5)) + f" block {i}" for i in range(150)]
    batched = await local_embedder.embed(texts)
    assert len(batched) == len(texts)
    for i in range(0, len(texts), 13):
        (single,) = await local_embedder.embed([texts[i]])
        np.testing.assert_allclose(batched[i], single, atol=1e-4)


async def test_related_text_scores_higher(local_embedder: LocalEmbedder) -> None:
    query, related, unrelated = await local_embedder.embed([QUERY, RELATED, UNRELATED])
    assert _cosine(query, related) > _cosine(query, unrelated) + 0.2


async def test_text_longer_than_max_tokens_is_cut_there(local_embedder: LocalEmbedder) -> None:
    words = [f"validator{i % 7} attests slot {i} of epoch {i // 32}." for i in range(400)]
    text = " ".join(words)
    spans = local_embedder.tokenizer.spans(text)
    assert len(spans) > 3 * local_embedder.max_tokens
    # what the model reads of a long text: exactly its first max_tokens tokens
    head = text[: spans[local_embedder.max_tokens - 1][1]]
    one_more = text[: spans[local_embedder.max_tokens][1]]
    full, head_vector, one_more_vector = await local_embedder.embed([text, head, one_more])
    np.testing.assert_allclose(full, head_vector, atol=1e-5)
    np.testing.assert_allclose(full, one_more_vector, atol=1e-5)
    shorter = text[: spans[local_embedder.max_tokens - 2][1]]
    (shorter_vector,) = await local_embedder.embed([shorter])
    assert not np.allclose(full, shorter_vector, atol=1e-5)


async def test_does_not_block_the_event_loop(local_embedder: LocalEmbedder) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await local_embedder.embed([RELATED * 3] * 128)
    stop.set()
    await task
    assert ticks > 5


async def test_concurrent_callers_get_their_own_vectors(local_embedder: LocalEmbedder) -> None:
    texts = [QUERY, RELATED, UNRELATED]
    expected = await local_embedder.embed(texts)
    results = await asyncio.gather(*(local_embedder.embed([t]) for t in texts * 3))
    for i, (vector,) in enumerate(results):
        np.testing.assert_allclose(vector, expected[i % 3], atol=1e-4)


def test_serves_any_event_loop(local_embedder: LocalEmbedder) -> None:
    """The session fixture is used from many loops: each test's, and a thread's own."""
    results: list[list[list[float]]] = []

    def in_thread() -> None:
        results.append(asyncio.run(local_embedder.embed([QUERY])))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(timeout=60)
    results.append(asyncio.run(local_embedder.embed([QUERY])))
    assert len(results) == 2
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)


async def test_closed_embedder_refuses(local_embedder: LocalEmbedder) -> None:
    model = local_embedder._model  # a second model would take seconds to load
    other = LocalEmbedder(model, ThreadPoolExecutor(max_workers=1), batch_size=2)
    assert len(await other.embed([QUERY, RELATED, UNRELATED])) == 3
    await other.aclose()
    with pytest.raises(EmbeddingError, match="closed"):
        await other.embed([QUERY])


def test_configuration_must_match_the_model(local_embedder: LocalEmbedder) -> None:
    model = local_embedder._model
    with pytest.raises(EmbeddingError, match="768"):
        LocalEmbedder(model, ThreadPoolExecutor(max_workers=1), dimensions=768)
    with pytest.raises(EmbeddingError, match="max_tokens 510"):
        LocalEmbedder(model, ThreadPoolExecutor(max_workers=1), max_tokens=510)
    smaller = LocalEmbedder(model, ThreadPoolExecutor(max_workers=1), max_tokens=200)
    assert smaller.max_tokens == 200
    smaller.close()


async def test_create_embedder_local() -> None:
    embedder = await create_embedder(EmbeddingSettings(batch_size=8))
    try:
        assert isinstance(embedder, LocalEmbedder)
        assert embedder.batch_size == 8
        (vector,) = await embedder.embed([QUERY])
        assert len(vector) == 384
    finally:
        await embedder.aclose()


async def test_load_failure_is_an_embedding_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="could not load"):
        await LocalEmbedder.create(model_path=str(tmp_path))


_OFFLINE_SCRIPT = """
import asyncio, json, torch
from ledgerlens.embedding import EmbeddingSettings, create_embedder

async def main():
    embedder = await create_embedder(EmbeddingSettings(torch_threads=1))
    vectors = await embedder.embed(["offline"])
    await embedder.aclose()
    print(json.dumps({"dims": len(vectors[0]), "threads": torch.get_num_threads()}))

asyncio.run(main())
"""


def test_loads_offline_with_an_empty_cache(tmp_path: Path) -> None:
    """Nothing downloads: no Hugging Face cache, and every connection would fail."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "SENTENCE_TRANSFORMERS_HOME": str(tmp_path),
        # a proxy nothing listens on: an attempted download fails instead of succeeding
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"dims": 384, "threads": 1}
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
