"""The behaviour suite of the vector backends: the same checks on ``local`` (usearch
HNSW over a SQLite store) and ``qdrant`` (qdrant-client's local mode on disk).

The ground truth of every search is brute force in the test: the records passing
:meth:`Filter.matches` ranked by cosine. A filtered search must return exactly that
top-k (the local backend answers small filters by an exact scan, Qdrant's local mode
always scans); only an HNSW walk (the local backend's unfiltered search, or a large
dataset with a low ``exact_threshold``) is held to recall instead.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.common.v1 import common_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.db import create_engine
from ledgerlens.services.retrieval.index.base import VectorBackend
from ledgerlens.services.retrieval.index.local import LocalBackend
from ledgerlens.services.retrieval.index.qdrant import QdrantBackend
from ledgerlens.services.retrieval.migrate import migrate
from ledgerlens.services.retrieval.model import ChunkRecord, Filter, Hit
from ledgerlens.services.retrieval.settings import LocalIndexSettings, QdrantSettings
from ledgerlens.services.retrieval.store import Store

DIM = 16
TOL = 1e-4

EIPS = "https://eips.ethereum.org/EIPS/"
SPECS = "https://github.com/ethereum/consensus-specs/blob/dev/specs/"
CHAINS = ("ethereum", "polygon", "arbitrum", "")
AUTHORS = (
    "Vitalik Buterin (@vbuterin)",
    "Tim Beiko (@timbeiko)",
    "Ada Lovelace <ada@example.org>",
    "Barnabé Monnot",
    "Dankrad Feist (@dankrad)",
)
TAGS = ("EIP", "Rollups", "gas", " security ", "MEV")
CONTRACTS = (
    "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
    "0xdAC17F958D2ee523a2206206994597C13D831ec7",
    "0x6B175474E89094C44Da98b954EedeAC495271d0F",
)
DOC_TYPES = (
    common_pb2.DOC_TYPE_EIP,
    common_pb2.DOC_TYPE_GITHUB,
    common_pb2.DOC_TYPE_FORUM,
    common_pb2.DOC_TYPE_WHITEPAPER,
)
#: few distinct dates, so that many records share each (date-range edges bite)
DATES = tuple(1_600_000_000 + 86_400 * 30 * i for i in range(8))
#: prefixes a filter may ask for: on a "/" boundary, mid-segment, a whole URL, none
PREFIXES = (
    EIPS,
    SPECS,
    "https://github.com/",
    "https://eips.ethereum.org/EIPS/eip-1",
    "https://eips.ethereum.org/EIPS/eip-10",
    f"{SPECS}phase0/be",
    "https://eips",
    "https://nowhere.example/",
)


# -- synthetic data -----------------------------------------------------------------------


def unit(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def make_chunk(
    document_id: str,
    version: int,
    index: int,
    meta: common_pb2.DocumentMetadata,
    source_url: str,
    text: str = "",
) -> retrieval_pb2.Chunk:
    return retrieval_pb2.Chunk(
        chunk_id=f"{document_id}:{version}:{index}",
        text=text or f"chunk {index} of {document_id} v{version}",
        heading_path=[meta.title, f"Part {index}"],
        chunk_index=index,
        token_count=6,
        provenance=common_pb2.Provenance(
            document_id=document_id, version=version, source_url=source_url, sha256="ab" * 32
        ),
        metadata=meta,
    )


def make_records(
    rng: np.random.Generator, documents: int, versions: int, chunks: int
) -> list[ChunkRecord]:
    """``documents * versions * chunks`` records with varied metadata."""
    specs = ("phase0/beacon-chain", "phase0/fork-choice", "altair/sync", "deneb/blobs")
    protos: list[retrieval_pb2.Chunk] = []
    for d in range(documents):
        document_id = f"doc-{d:04d}"
        if d % 2:
            source_url = f"{EIPS}eip-{1000 + 7 * d}"
        else:
            source_url = f"{SPECS}{specs[(d // 2) % len(specs)]}-{d}.md"
        meta = common_pb2.DocumentMetadata(
            doc_type=DOC_TYPES[int(rng.integers(len(DOC_TYPES)))],
            chain=CHAINS[int(rng.integers(len(CHAINS)))],
            contract_addresses=list(rng.choice(CONTRACTS, int(rng.integers(0, 3)), replace=False)),
            authors=list(rng.choice(AUTHORS, int(rng.integers(0, 3)), replace=False)),
            tags=list(rng.choice(TAGS, int(rng.integers(0, 4)), replace=False)),
            title=f"Document {d}",
        )
        if rng.random() < 0.8:  # the others have no date
            meta.published_at.seconds = DATES[int(rng.integers(len(DATES)))]
        for version, index in itertools.product(range(1, versions + 1), range(chunks)):
            protos.append(make_chunk(document_id, version, index, meta, source_url))
    vectors = unit(rng, len(protos))
    return [ChunkRecord.from_chunk(p, v) for p, v in zip(protos, vectors, strict=True)]


def random_filter(rng: np.random.Generator, records: Sequence[ChunkRecord]) -> Filter:
    """A filter over a random subset of fields, its values drawn from ``records`` (and
    now and then a value no record has)."""

    def pick(values: Iterable[str], unknown: str) -> frozenset[str]:
        chosen = set(rng.choice(sorted(values), int(rng.integers(1, 3))).tolist())
        if rng.random() < 0.15:
            chosen.add(unknown)
        return frozenset(chosen)

    def maybe() -> bool:
        return bool(rng.random() < 0.3)

    chains = {r.chain for r in records if r.chain}
    contracts = {c for r in records for c in r.contract_addresses}
    authors = {a for r in records for a in r.author_keys}
    tags = {t for r in records for t in r.tags}
    urls = {r.source_url for r in records}
    documents = {r.document_id for r in records}
    after = before = None
    if maybe():
        after = int(rng.choice(DATES)) + int(rng.choice([0, 0, 1, -1]))
    if maybe():
        before = int(rng.choice(DATES)) + int(rng.choice([0, 0, 1, -1]))
    prefix = str(rng.choice(PREFIXES)) if maybe() else ""
    if prefix and rng.random() < 0.2:
        prefix = str(rng.choice(sorted(urls)))  # a whole URL is a prefix of itself
    return Filter(
        chains=pick(chains, "solana") if maybe() else frozenset(),
        contract_addresses=pick(contracts, "0x" + "0" * 40) if maybe() else frozenset(),
        authors=pick(authors, "satoshi") if maybe() else frozenset(),
        doc_types=(
            frozenset(int(t) for t in rng.choice(DOC_TYPES, int(rng.integers(1, 3))))
            if maybe()
            else frozenset()
        ),
        published_after=after,
        published_before=before,
        tags=pick(tags, "unknown-tag") if maybe() else frozenset(),
        source_urls=pick(urls, "https://unknown.example/x") if rng.random() < 0.1 else frozenset(),
        source_url_prefix=prefix,
        document_ids=pick(documents, "doc-none") if rng.random() < 0.1 else frozenset(),
    )


def single_field_filters(records: Sequence[ChunkRecord]) -> list[Filter]:
    """Each field alone, including date bounds exactly at a record's date."""
    some = records[0]
    dated = next(r for r in records if r.published_at is not None)
    day = dated.published_at
    assert day is not None
    return [
        Filter(),
        Filter(chains=frozenset({"ethereum"})),
        Filter(chains=frozenset({"polygon", "arbitrum"})),
        Filter(contract_addresses=frozenset({CONTRACTS[0].lower()})),
        Filter(authors=frozenset({"vbuterin"})),
        Filter(authors=frozenset({"@timbeiko", "barnabé monnot"})),
        Filter(authors=frozenset({"vitalik buterin (@vbuterin)"})),
        Filter(authors=frozenset({"ada lovelace"})),
        Filter(doc_types=frozenset({int(common_pb2.DOC_TYPE_EIP)})),
        Filter(doc_types=frozenset({int(common_pb2.DOC_TYPE_FORUM), 6})),
        Filter(published_after=day),
        Filter(published_before=day),
        Filter(published_after=day, published_before=day + 1),
        Filter(published_after=day + 1),
        Filter(published_before=day + 1),
        Filter(published_after=DATES[0], published_before=DATES[-1]),
        Filter(tags=frozenset({"security"})),
        Filter(tags=frozenset({"eip", "mev"})),
        Filter(source_urls=frozenset({some.source_url})),
        Filter(document_ids=frozenset({some.document_id, "doc-none"})),
        *(Filter(source_url_prefix=p) for p in PREFIXES),
        Filter(source_url_prefix=some.source_url),
        Filter(source_url_prefix=some.source_url + "x"),
    ]


# -- ground truth and checks --------------------------------------------------------------


@dataclass
class Truth:
    """The records a backend should hold, and brute-force search over them."""

    records: dict[str, ChunkRecord] = field(default_factory=dict)

    def add(self, records: Sequence[ChunkRecord]) -> None:
        for record in records:
            self.records[record.chunk_id] = record

    def remove(self, keys: Sequence[tuple[str, int]]) -> int:
        gone = [cid for cid, r in self.records.items() if r.key in set(keys)]
        for cid in gone:
            del self.records[cid]
        return len(gone)

    def search(self, query: npt.NDArray[np.float32], flt: Filter, k: int) -> list[Hit]:
        passing = [r for r in self.records.values() if flt.matches(r)]
        if not passing:
            return []
        scores = np.stack([r.vector for r in passing]) @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(passing[i].chunk_id, float(scores[i])) for i in order.tolist()]

    def check(
        self,
        hits: Sequence[Hit],
        query: npt.NDArray[np.float32],
        flt: Filter,
        k: int,
        *,
        exact: bool = True,
    ) -> float:
        """Assert ``hits`` are a valid answer; returns their recall of the true top-k."""
        ids = [h.chunk_id for h in hits]
        assert len(ids) == len(set(ids)), f"duplicate hits for {flt}"
        for hit in hits:
            record = self.records.get(hit.chunk_id)
            assert record is not None, f"{hit.chunk_id} is not indexed"
            assert flt.matches(record), f"{hit.chunk_id} fails {flt}"
            assert hit.score == pytest.approx(float(record.vector @ query), abs=TOL)
        scores = [h.score for h in hits]
        assert all(a >= b - TOL for a, b in itertools.pairwise(scores)), "not best first"
        expected = self.search(query, flt, k)
        assert len(hits) == len(expected), f"{len(hits)} hits, {len(expected)} pass {flt}"
        if exact:
            for got, want in zip(hits, expected, strict=True):
                # the same chunk, or one whose score ties with it
                assert got.chunk_id == want.chunk_id or got.score == pytest.approx(
                    want.score, abs=1e-5
                ), f"{ids} is not the top {k} under {flt}"
        if not expected:
            return 1.0
        return len(set(ids) & {h.chunk_id for h in expected}) / len(expected)


# -- the backends -------------------------------------------------------------------------


class Opener:
    """Opens the backend under test on one storage, again and again (a restart)."""

    def __init__(self, kind: str, root: Path, local: LocalIndexSettings) -> None:
        self.kind = kind
        self.root = root
        self.local = local
        self.engine: AsyncEngine | None = None
        self.store: Store | None = None
        self.running: list[VectorBackend] = []

    async def open(self) -> VectorBackend:
        backend: VectorBackend
        if self.kind == "local":
            if self.store is None:
                url = f"sqlite+aiosqlite:///{self.root}/r.db"
                await migrate(url)
                self.engine = create_engine(url)
                self.store = Store(self.engine)
            backend = LocalBackend(self.store, self.root / "data", DIM, self.local)
        else:
            backend = QdrantBackend(QdrantSettings(), self.root / "data", DIM)
        await backend.start()
        self.running.append(backend)
        return backend

    async def stop(self, backend: VectorBackend) -> None:
        self.running.remove(backend)
        await backend.stop()

    async def restart(self, backend: VectorBackend) -> VectorBackend:
        await self.stop(backend)
        return await self.open()

    async def close(self) -> None:
        for backend in list(self.running):
            await self.stop(backend)
        if self.engine is not None:
            await self.engine.dispose()


@pytest.fixture(params=["local", "qdrant"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def opener(kind: str, tmp_path: Path) -> AsyncIterator[Callable[..., Opener]]:
    made: list[Opener] = []

    def make(local: LocalIndexSettings | None = None) -> Opener:
        made.append(Opener(kind, tmp_path / f"store{len(made)}", local or LocalIndexSettings()))
        made[-1].root.mkdir()
        return made[-1]

    yield make
    for one in made:
        await one.close()


@pytest.fixture(scope="module")
def dataset() -> list[ChunkRecord]:
    return make_records(np.random.default_rng(7), documents=32, versions=2, chunks=3)


async def loaded(
    opener: Callable[..., Opener], records: Sequence[ChunkRecord]
) -> tuple[Opener, VectorBackend, Truth]:
    one = opener()
    backend = await one.open()
    truth = Truth()
    for start in range(0, len(records), 100):  # several writes, as the indexer does
        await backend.upsert(records[start : start + 100])
        truth.add(records[start : start + 100])
    return one, backend, truth


# -- the suite ----------------------------------------------------------------------------


async def test_filtered_search_is_exact(
    opener: Callable[..., Opener], dataset: list[ChunkRecord], kind: str
) -> None:
    _, backend, truth = await loaded(opener, dataset)
    assert backend.name == kind
    assert await backend.count() == len(dataset)
    rng = np.random.default_rng(11)
    filters = single_field_filters(dataset) + [random_filter(rng, dataset) for _ in range(120)]
    nonempty = 0
    for flt in filters:
        query = unit(rng, 1)[0]
        k = int(rng.choice([1, 5, 10, 40]))
        hits = await backend.search(query, flt, k)
        # the local backend walks its graph when nothing is filtered out
        truth.check(hits, query, flt, k, exact=not (kind == "local" and flt.empty))
        nonempty += bool(hits)
    assert nonempty > len(filters) // 2, "too few filters match anything to test much"


async def test_search_edges(
    opener: Callable[..., Opener], dataset: list[ChunkRecord], kind: str
) -> None:
    _, backend, truth = await loaded(opener, dataset)
    query = dataset[5].vector
    assert await backend.search(query, Filter(), 0) == []
    hits = await backend.search(query, Filter(), len(dataset) + 50)
    assert len(hits) == len(dataset)
    assert hits[0].chunk_id == dataset[5].chunk_id
    assert hits[0].score == pytest.approx(1.0, abs=TOL)
    # a filter nothing passes, and a date range no record has
    assert await backend.search(query, Filter(chains=frozenset({"solana"})), 10) == []
    empty = Filter(published_after=DATES[-1] + 1)
    assert await backend.search(query, empty, 10) == []
    # the date bounds: after is inclusive, before exclusive, undated records never pass
    day = DATES[3]
    on_day = {r.chunk_id for r in dataset if r.published_at == day}
    assert on_day
    hits = await backend.search(query, Filter(published_after=day, published_before=day + 1), 500)
    assert {h.chunk_id for h in hits} == on_day
    assert await backend.search(query, Filter(published_after=day, published_before=day), 10) == []
    since = await backend.search(query, Filter(published_after=DATES[0]), 500)
    undated = {r.chunk_id for r in dataset if r.published_at is None}
    assert undated
    assert len(since) == len(dataset) - len(undated)
    assert undated.isdisjoint(h.chunk_id for h in since)
    # a prefix cut mid-segment matches exactly the URLs starting with it
    for prefix in ("https://eips.ethereum.org/EIPS/eip-10", f"{SPECS}phase0/f", "https://e"):
        flt = Filter(source_url_prefix=prefix)
        hits = await backend.search(query, flt, 500)
        want = {r.chunk_id for r in dataset if r.source_url.startswith(prefix)}
        assert want
        assert {h.chunk_id for h in hits} == want
        truth.check(hits, query, flt, 500)


async def test_upsert_replaces(
    opener: Callable[..., Opener], dataset: list[ChunkRecord], kind: str
) -> None:
    _, backend, truth = await loaded(opener, dataset)
    total = await backend.count()
    target = dataset[17]
    # the same chunk again, and twice in one batch: still one
    await backend.upsert([target])
    await backend.upsert([target, target])
    assert await backend.count() == total
    hits = await backend.search(target.vector, Filter(), 20)
    assert [h.chunk_id for h in hits].count(target.chunk_id) == 1
    assert hits[0].chunk_id == target.chunk_id
    # a new text, vector and metadata under the same id replace the old ones
    meta = common_pb2.DocumentMetadata()
    meta.CopyFrom(target.chunk.metadata)
    meta.chain = "gnosis"
    meta.tags.append("Replaced")
    chunk = make_chunk(
        target.document_id,
        target.version,
        target.chunk.chunk_index,
        meta,
        target.source_url,
        text="the new text",
    )
    vector = unit(np.random.default_rng(3), 1)[0]
    replaced = ChunkRecord.from_chunk(chunk, vector)
    assert replaced.chunk_id == target.chunk_id
    await backend.upsert([replaced])
    truth.add([replaced])
    assert await backend.count() == total
    got = await backend.get([target.chunk_id])
    assert got[target.chunk_id].text == "the new text"
    assert got[target.chunk_id].chain == "gnosis"
    assert np.allclose(got[target.chunk_id].vector, vector, atol=TOL)
    hits = await backend.search(vector, Filter(), 20)
    assert [h.chunk_id for h in hits].count(target.chunk_id) == 1
    assert hits[0].chunk_id == target.chunk_id
    assert hits[0].score == pytest.approx(1.0, abs=TOL)
    assert await backend.search(target.vector, Filter(chains=frozenset({"gnosis"})), 5) == [
        Hit(target.chunk_id, pytest.approx(float(target.vector @ vector), abs=TOL))  # type: ignore[arg-type]
    ]
    old_chain = Filter(chains=frozenset({target.chain or "ethereum"}))
    hits = await backend.search(vector, old_chain, 500)
    assert target.chunk_id not in {h.chunk_id for h in hits}
    truth.check(hits, vector, old_chain, 500)


async def test_remove_versions(
    opener: Callable[..., Opener], dataset: list[ChunkRecord], kind: str
) -> None:
    _, backend, truth = await loaded(opener, dataset)
    keys = [("doc-0003", 1), ("doc-0010", 2), ("doc-0010", 1)]
    ids = [r.chunk_id for r in dataset if r.key in set(keys)]
    kept_sibling = next(r for r in dataset if r.key == ("doc-0003", 2))
    assert len(ids) == 9
    assert await backend.remove_versions(keys) == truth.remove(keys) == 9
    assert await backend.count() == len(dataset) - 9
    assert await backend.get(ids) == {}
    assert kept_sibling.chunk_id in await backend.get([kept_sibling.chunk_id])
    # removing again, an unknown version, or nothing removes nothing
    assert await backend.remove_versions(keys) == 0
    assert await backend.remove_versions([("doc-none", 1), ("doc-0003", 9)]) == 0
    assert await backend.remove_versions([]) == 0
    assert await backend.count() == len(dataset) - 9
    rng = np.random.default_rng(5)
    for flt in [Filter(document_ids=frozenset({"doc-0003", "doc-0010"}))] + [
        random_filter(rng, dataset) for _ in range(20)
    ]:
        query = unit(rng, 1)[0]
        hits = await backend.search(query, flt, 50)
        assert not set(ids) & {h.chunk_id for h in hits}
        truth.check(hits, query, flt, 50, exact=not (kind == "local" and flt.empty))
    # a removed chunk comes back when upserted again
    again = [r for r in dataset if r.key == ("doc-0003", 1)]
    await backend.upsert(again)
    truth.add(again)
    assert await backend.count() == len(dataset) - 6


async def test_get_and_records(
    opener: Callable[..., Opener], dataset: list[ChunkRecord], kind: str
) -> None:
    _, backend, _ = await loaded(opener, dataset)
    wanted = [dataset[0].chunk_id, "nope:1:0", dataset[40].chunk_id, dataset[0].chunk_id]
    got = await backend.get(wanted)
    assert set(got) == {dataset[0].chunk_id, dataset[40].chunk_id}
    assert await backend.get([]) == {}
    assert await backend.get(["nope:1:0"]) == {}
    for record in (dataset[0], dataset[40]):
        back = got[record.chunk_id]
        assert back.chunk == record.chunk
        assert back.key == record.key
        assert (back.chain, back.contract_addresses, back.author_keys, back.tags) == (
            record.chain,
            record.contract_addresses,
            record.author_keys,
            record.tags,
        )
        assert (back.doc_type, back.published_at) == (record.doc_type, record.published_at)
        assert np.allclose(back.vector, record.vector, atol=TOL)
    every = [r async for r in backend.records()]
    assert len(every) == len(dataset)
    by_id = {r.chunk_id: r for r in every}
    assert set(by_id) == {r.chunk_id for r in dataset}
    assert all(by_id[r.chunk_id].chunk == r.chunk for r in dataset)
    assert all(r.vector.shape == (DIM,) for r in every)
    memory = backend.memory_bytes()
    assert memory is None if kind == "qdrant" else memory is not None and memory > 0


async def test_restart_keeps_everything(
    opener: Callable[..., Opener], dataset: list[ChunkRecord], kind: str
) -> None:
    one, backend, truth = await loaded(opener, dataset)
    await backend.remove_versions([("doc-0001", 1)])
    truth.remove([("doc-0001", 1)])
    rng = np.random.default_rng(13)
    probes = [(unit(rng, 1)[0], random_filter(rng, dataset)) for _ in range(25)]
    probes.append((dataset[9].vector, Filter()))
    before = [await backend.search(q, f, 10) for q, f in probes]
    count = await backend.count()

    backend = await one.restart(backend)
    assert await backend.count() == count == len(truth.records)
    after = [await backend.search(q, f, 10) for q, f in probes]
    for (query, flt), old, new in zip(probes, before, after, strict=True):
        assert [h.chunk_id for h in new] == [h.chunk_id for h in old]
        truth.check(new, query, flt, 10, exact=not (kind == "local" and flt.empty))
    assert set(await backend.get([dataset[0].chunk_id, dataset[4].chunk_id])) == {
        dataset[0].chunk_id
    } | ({dataset[4].chunk_id} if dataset[4].key != ("doc-0001", 1) else set())

    # writes after the restart persist too
    extra = make_records(np.random.default_rng(99), documents=1, versions=1, chunks=3)
    extra = [
        ChunkRecord.from_chunk(
            make_chunk("doc-late", 1, i, r.chunk.metadata, "https://late.example/x"), r.vector
        )
        for i, r in enumerate(extra)
    ]
    await backend.upsert(extra)
    backend = await one.restart(backend)
    assert await backend.count() == count + 3
    assert set(await backend.get([r.chunk_id for r in extra])) == {r.chunk_id for r in extra}


@pytest.mark.parametrize("kind", ["local"])  # a setting of the local backend only
async def test_graph_precision_change_rebuilds_the_snapshot(
    opener: Callable[..., Opener],
    dataset: list[ChunkRecord],
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A snapshot written at one graph precision is not loaded at another: the graph
    is rebuilt, and either way the scores are exact cosines (the graph only proposes)."""
    one = opener(LocalIndexSettings(graph_dtype="f32"))
    backend = await one.open()
    await backend.upsert(dataset)
    truth = Truth()
    truth.add(dataset)
    assert isinstance(backend, LocalBackend)
    assert "F32" in repr(backend._ann)
    await one.stop(backend)

    one.local = LocalIndexSettings(graph_dtype="i8")
    caplog.set_level("INFO", logger="ledgerlens.services.retrieval.index.local")
    backend = await one.open()
    assert isinstance(backend, LocalBackend)
    assert "I8" in repr(backend._ann)  # rebuilt at the new precision, not the old file
    assert "HNSW snapshot is stale" in caplog.text
    rng = np.random.default_rng(31)
    for query in [*unit(rng, 10), dataset[3].vector]:
        hits = await backend.search(query, Filter(), 10)
        # every score is the exact cosine, not the quantised graph's distance
        assert truth.check(hits, query, Filter(), 10, exact=False) >= 0.8
    await one.stop(backend)
    caplog.clear()
    backend = await one.open()  # the same precision again: its own snapshot is loaded
    assert f"loaded HNSW snapshot of {len(dataset)} chunks" in caplog.text


@pytest.mark.slow
async def test_large_dataset_recall(
    opener: Callable[..., Opener], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3000 chunks and a low exact threshold: the local backend walks its HNSW graph
    under filters too; the results still all pass, with high recall.

    Qdrant's local mode scans every point, so it stays exact and a larger set tests
    nothing more there; it gets 600 chunks, as each point it writes is its own SQLite
    commit (~10 ms on a VM disk) and 3000 would take most of a minute.
    """
    documents = 250 if kind == "local" else 50
    records = make_records(np.random.default_rng(21), documents=documents, versions=2, chunks=6)
    assert len(records) == documents * 12
    one = opener(LocalIndexSettings(exact_threshold=100))
    backend = await one.open()
    await backend.upsert(records)
    truth = Truth()
    truth.add(records)
    assert await backend.count() == len(records)
    walked: list[int] = []
    if isinstance(backend, LocalBackend):  # count the searches that really walk the graph
        walk = backend._graph_search

        def counting(*args: Any) -> list[Hit]:
            walked.append(1)
            return walk(*args)

        monkeypatch.setattr(backend, "_graph_search", counting)
    rng = np.random.default_rng(23)
    filters = [
        Filter(),
        Filter(chains=frozenset({"ethereum"})),
        Filter(doc_types=frozenset({int(DOC_TYPES[0]), int(DOC_TYPES[1])})),
        Filter(source_url_prefix=EIPS),
        Filter(source_url_prefix="https://eips.ethereum.org/EIPS/eip-1"),
        Filter(published_after=DATES[2]),
        Filter(tags=frozenset({"gas"})),
        Filter(document_ids=frozenset({"doc-0007", "doc-0042"})),  # 24: an exact scan
    ]
    recalls: list[float] = []
    graph_walks = 0
    for flt, _ in itertools.product(filters, range(8)):
        passing = sum(flt.matches(r) for r in records)
        # the local backend scans when the filter leaves few chunks: at most its
        # exact_threshold, or at most 16 per result the graph walk would have to yield
        walk_results = min(len(records), int(10 / (passing / len(records)) * 2) + 10)
        graph = kind == "local" and (flt.empty or passing > max(100, 16 * walk_results))
        graph_walks += graph
        query = unit(rng, 1)[0]
        hits = await backend.search(query, flt, 10)
        recalls.append(truth.check(hits, query, flt, 10, exact=not graph))
    assert graph_walks >= (16 if kind == "local" else 0)
    assert len(walked) >= graph_walks
    assert float(np.mean(recalls)) >= 0.9, recalls


async def test_qdrant_refuses_another_dimension(tmp_path: Path) -> None:
    first = QdrantBackend(QdrantSettings(), tmp_path, DIM)
    await first.start()
    await first.stop()
    other = QdrantBackend(QdrantSettings(), tmp_path, DIM * 2)
    with pytest.raises(RuntimeError, match="16-dimensional"):
        await other.start()
    # the same dimensions open it again; another collection can have other dimensions
    again = QdrantBackend(QdrantSettings(), tmp_path, DIM)
    await again.start()
    assert await again.count() == 0
    await again.stop()
    wider = QdrantBackend(QdrantSettings(collection="wide"), tmp_path, DIM * 2)
    await wider.start()
    await wider.stop()
