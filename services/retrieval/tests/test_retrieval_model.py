"""Filter keys of authors, and the embedded backend's bounded walk for fusion candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ledgerlens.common.v1 import common_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.db import create_engine
from ledgerlens.services.retrieval.index.local import LocalBackend
from ledgerlens.services.retrieval.migrate import migrate
from ledgerlens.services.retrieval.model import ChunkRecord, Filter, author_keys
from ledgerlens.services.retrieval.settings import LocalIndexSettings
from ledgerlens.services.retrieval.store import Store


def test_author_keys_are_the_author_the_name_and_the_handle() -> None:
    assert set(author_keys("Vitalik Buterin (@vbuterin)")) == {
        "vitalik buterin (@vbuterin)",
        "vitalik buterin",
        "@vbuterin",
        "vbuterin",
    }
    # an e-mail address is not a GitHub handle: its domain must not become a key
    keys = set(author_keys("Fabian Vogelsteller <fabian@ethereum.org>"))
    assert keys == {"fabian vogelsteller <fabian@ethereum.org>", "fabian vogelsteller"}


async def test_candidates_walk_is_bounded_but_never_short_of_at_least(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/r.db"
    await migrate(url)
    engine = create_engine(url)
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((20000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = []
    for i, vector in enumerate(vectors):
        chunk = retrieval_pb2.Chunk(
            chunk_id=f"doc_{i}:1:0",
            text=f"chunk {i}",
            provenance=common_pb2.Provenance(document_id=f"doc_{i}", version=1),
            metadata=common_pb2.DocumentMetadata(chain="polygon" if i % 5 == 0 else "ethereum"),
        )
        records.append(ChunkRecord.from_chunk(chunk, vector))
    settings = LocalIndexSettings(exact_threshold=100, max_graph_candidates=16)
    backend = LocalBackend(Store(engine), tmp_path / "data", 16, settings)
    await backend.start()
    try:
        await backend.upsert(records)
        polygon = Filter(chains=frozenset({"polygon"}))  # a fifth of the chunks
        passing = {r.chunk_id for r in records if polygon.matches(r)}
        for query in vectors[:20]:
            bounded = await backend.search(query, polygon, 100, at_least=10)
            full = await backend.search(query, polygon, 100)
            assert 10 <= len(bounded) < 100
            assert len(full) == 100
            assert {h.chunk_id for h in bounded} <= passing
            scores = [h.score for h in bounded]
            assert scores == sorted(scores, reverse=True)
            # what the short walk finds are the best: mostly the exact top of that length
            exact = backend.exact_search(query, polygon, len(bounded))
            found = {h.chunk_id for h in bounded} & {h.chunk_id for h in exact}
            assert len(found) >= 0.9 * len(bounded)
    finally:
        await backend.stop()
        await engine.dispose()
