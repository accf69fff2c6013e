"""Retrieval search at 100,000 chunks: in-process, through gRPC, recall, vs Qdrant local.

The index: every chunk of the EIP corpus (~16,000, chunked and embedded as ingestion
does, vectors from the eval cache: ``services/retrieval/eval/corpus.py``) plus
generated chunks up to ``--chunks`` (default 100,000). A generated chunk's vector is
a real chunk's vector mixed with another real chunk's (weight 0.5-0.9) plus Gaussian
noise (norm ~0.3), re-normalised; its text is the first real chunk's text; it belongs
to a generated document of 4-40 chunks whose metadata is drawn from the real
authors and tags and from a list of chains (ethereum, polygon, arbitrum, optimism,
base, solana, avalanche, bsc), dates 2015-2025 and every document type. Seeded.
Everything is written through the service's own ``Indexer`` (SQLite store, HNSW,
tantivy), as its event handler would.

Query vectors: the 93 labelled eval queries and the EIP titles, embedded with the
model ("real" queries), plus real chunk vectors with noise (norm 0.3); filters:
*typical* (chain ethereum and published in [2019-01-01, 2024-01-01): about a fifth
of the index, searched through the graph) and *selective* (one author, ``vitalik
buterin``: 1-2% of the index, below ``exact_threshold``, so scanned exactly); the
JSON gives each one's ``selectivity``.

Measured in one run:

1. In-process dense search (``LocalBackend.search_now``) latency, p50/p95/p99, at
   ``k`` 10 and at ``k`` 100 (the candidate pool a hybrid Search asks for), without
   and with each filter. Target: p95 <= 2 ms (judged on every filter, separately at
   k 10 and at k 100).
2. HNSW recall@10 against exact search (``LocalBackend.exact_search``) over every
   query, without and with each filter (the selective filter is answered exactly by
   design, so its recall is 1 by construction). Target: >= 0.95 (judged unfiltered
   and typical).
3. The same dense queries by numpy brute force (``vectors @ q`` + ``argpartition``;
   a filter as a mask) and by qdrant-client's local mode (``QdrantClient(":memory:")``,
   the same points and payload fields, the service's own filter translation): p50/p95
   and the ratio qdrant-local / in-process of the median. Target: >= 10x (judged on
   every filter, k 10).
4. Index memory (graph bytes per vector; with the vector and filter columns) and
   build time (the whole Indexer path; the bare HNSW graph built in one call).
5. The service as its own process (``python -m ledgerlens.services.retrieval`` on the
   index written above, a private nats-server, auth off) driven through gRPC
   ``Search`` (hybrid RRF, the default; ``top_k`` 10) at concurrency 8: p50/p95/p99
   and QPS, without and with the typical filter, with the service's query-vector
   cache warm (a warm-up pass first, then the same query set repeated), and
   dense-only for comparison; also hybrid at concurrency 1, 2 and 4 (one event loop
   does the searching, so once it is saturated latency grows as concurrency x
   per-search CPU time). The cold cost, a query never seen (the model embeds it:
   ~9 ms of CPU here), is measured one call at a time in the warm-up pass and
   reported separately. Target: warm Search p95 <= 10 ms (judged at concurrency 8,
   hybrid, without and with the typical filter). Each run also records the CPU one
   call cost the service and this load generator (``/proc``), and the floor that puts
   under the latency: a closed loop of 8 on ``cpus`` shared cores cannot average less
   than 8 x (service + client CPU per call) / cpus, however the service is spread.
6. Indexing freshness: ``ingestion.chunks.embedded`` events (one document of 8
   chunks each) published to the running service; publish -> searchable (a
   keyword Search for the document's unique marker word returns it), p50/p95;
   the service's ``ledgerlens_retrieval_index_lag_seconds`` histogram from
   ``/metrics`` alongside. Target: p95 <= 2 s.

Qdrant local mode is a pure-Python brute force (meant for tests): uploading 100,000
points takes a minute or two; a search scans every point, a filter is checked point
by point in Python. If the upload would take longer than ``--qdrant-budget`` seconds
the comparison uses the points uploaded so far and says so in the JSON; each
filter's queries stop after a minute (``n`` in the JSON: filtered searches take
seconds each at 100,000 points).

Run alone: ``python bench/retrieval_search.py [--chunks 100000]`` (``--chunks 20000``
for a quick run); ``make bench`` runs it through ``bench/run.py``. Prints / returns
JSON and writes ``bench/results/retrieval_search.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from _common import grpc_address, quantile, rpc_summary, start_service
from _cpu import closed_loop_floor, own_cpu_seconds, process_cpu_seconds

from ledgerlens.common.v1 import common_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.services.retrieval.model import ChunkRecord, Filter

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "retrieval_search.json"
sys.path.insert(0, str(REPO / "services" / "retrieval" / "eval"))

from corpus import embed_texts, load_corpus, open_index  # noqa: E402

TARGETS = {
    "in_process_p95_ms_max": 2.0,
    "recall_at_10_min": 0.95,
    "qdrant_local_speedup_min": 10.0,
    "grpc_warm_p95_ms_max": 10.0,
    "freshness_p95_s_max": 2.0,
}
CONCURRENCY = 8
SEED = 20240601
CHAINS = ["ethereum", "polygon", "arbitrum", "optimism", "base", "solana", "avalanche", "bsc"]
CHAIN_WEIGHTS = [0.35, 0.15, 0.12, 0.1, 0.1, 0.06, 0.06, 0.06]
DOC_TYPES = [
    common_pb2.DOC_TYPE_WHITEPAPER,
    common_pb2.DOC_TYPE_EIP,
    common_pb2.DOC_TYPE_GITHUB,
    common_pb2.DOC_TYPE_FORUM,
    common_pb2.DOC_TYPE_ONCHAIN_EVENT,
    common_pb2.DOC_TYPE_OTHER,
]
START_2015 = int(datetime(2015, 1, 1, tzinfo=UTC).timestamp())
END_2025 = int(datetime(2025, 12, 31, tzinfo=UTC).timestamp())
TYPICAL_AFTER = int(datetime(2019, 1, 1, tzinfo=UTC).timestamp())
TYPICAL_BEFORE = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
SELECTIVE_AUTHOR = "vitalik buterin"


_LOAD: list[tuple[str, float]] = []


def _log(message: str) -> None:
    print(f"[retrieval_search] {message}", file=sys.stderr, flush=True)


def _sample_load(phase: str) -> None:
    """The 1-minute load average at a phase boundary (other work on the machine shows)."""
    _LOAD.append((phase, round(os.getloadavg()[0], 2)))


def _ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean in ms of latencies in seconds."""
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_ms": round(quantile(ordered, 0.50) * 1000, 3),
        "p95_ms": round(quantile(ordered, 0.95) * 1000, 3),
        "p99_ms": round(quantile(ordered, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def _unit(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


# -- the corpus ------------------------------------------------------------------------


def generate(real: list[ChunkRecord], count: int, rng: np.random.Generator) -> list[ChunkRecord]:
    """``count`` generated chunks in documents of 4-40 (see the module docstring)."""
    pick = random.Random(SEED)
    vectors = np.stack([r.vector for r in real])
    authors = sorted({a for r in real for a in r.chunk.metadata.authors if a != "et al."})
    tags = sorted({t for r in real for t in r.chunk.metadata.tags})
    titles = sorted({r.chunk.metadata.title for r in real if r.chunk.metadata.title})
    made: list[ChunkRecord] = []
    doc = 0
    while len(made) < count:
        size = min(int(rng.integers(4, 41)), count - len(made))
        chain = pick.choices(CHAINS, CHAIN_WEIGHTS)[0]
        document_id = f"doc_synthetic_{doc:06d}"
        source_url = f"https://corpus.example.org/{chain}/doc-{doc}"
        metadata = common_pb2.DocumentMetadata(
            doc_type=pick.choice(DOC_TYPES),
            chain=chain,
            authors=pick.sample(authors, pick.randint(1, 3)),
            tags=pick.sample(tags, pick.randint(1, 3)),
            title=f"{pick.choice(titles)} ({chain} notes {doc})",
        )
        metadata.published_at.seconds = pick.randint(START_2015, END_2025)
        provenance = common_pb2.Provenance(
            document_id=document_id,
            version=1,
            source_url=source_url,
            sha256=uuid.UUID(int=pick.getrandbits(128)).hex * 2,
        )
        first = rng.integers(0, len(real), size)
        second = rng.integers(0, len(real), size)
        weight = rng.uniform(0.5, 0.9, (size, 1)).astype(np.float32)
        noise = rng.normal(0, 0.3 / np.sqrt(vectors.shape[1]), (size, vectors.shape[1]))
        mixed = _unit(weight * vectors[first] + (1 - weight) * vectors[second] + noise)
        offset = 0
        for i in range(size):
            source = real[int(first[i])].chunk
            chunk = retrieval_pb2.Chunk(
                chunk_id=f"{document_id}:1:{i}",
                text=source.text,
                heading_path=list(source.heading_path),
                char_start=offset,
                char_end=offset + len(source.text),
                chunk_index=i,
                token_count=source.token_count,
                provenance=provenance,
                metadata=metadata,
            )
            offset += len(source.text) + 1
            made.append(ChunkRecord.from_chunk(chunk, mixed[i]))
        doc += 1
    return made


def _query_vectors(
    real: list[ChunkRecord], rng: np.random.Generator
) -> tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Real query texts (eval queries + EIP titles), their vectors, and 500 noisy
    chunk vectors."""
    import yaml

    eval_dir = REPO / "services" / "retrieval" / "eval"
    queries = [
        q["query"] for q in yaml.safe_load((eval_dir / "queries.yaml").read_text())["queries"]
    ]
    titles = sorted({r.chunk.metadata.title for r in real if r.chunk.metadata.title})
    texts = list(dict.fromkeys(queries + titles))
    vectors = embed_texts(texts)
    base = np.stack([real[int(i)].vector for i in rng.integers(0, len(real), 500)])
    noisy = _unit(base + rng.normal(0, 0.3 / np.sqrt(base.shape[1]), base.shape))
    return texts, vectors, noisy


def _filters() -> dict[str, Filter]:
    return {
        "none": Filter(),
        "typical": Filter(
            chains=frozenset({"ethereum"}),
            published_after=TYPICAL_AFTER,
            published_before=TYPICAL_BEFORE,
        ),
        "selective": Filter(authors=frozenset({SELECTIVE_AUTHOR})),
    }


def _grpc_filter(name: str) -> retrieval_pb2.SearchFilter | None:
    if name == "none":
        return None
    if name == "typical":
        flt = retrieval_pb2.SearchFilter(chains=["ethereum"])
        flt.published_after.seconds = TYPICAL_AFTER
        flt.published_before.seconds = TYPICAL_BEFORE
        return flt
    return retrieval_pb2.SearchFilter(authors=[SELECTIVE_AUTHOR])


# -- in process ------------------------------------------------------------------------


def _timed(
    fn: Callable[[npt.NDArray[np.float32]], Any],
    queries: npt.NDArray[np.float32],
    budget_seconds: float | None = None,
) -> list[float]:
    """Latency of ``fn`` on each query (after 20 warm-up calls); with a budget, stops
    once it is spent (after at least 20 queries)."""
    for q in queries[:20]:
        fn(q)
    latencies = []
    began = time.perf_counter()
    for q in queries:
        started = time.perf_counter()
        fn(q)
        latencies.append(time.perf_counter() - started)
        if (
            budget_seconds is not None
            and len(latencies) >= 20
            and time.perf_counter() - began > budget_seconds
        ):
            break
    return latencies


def _numpy_search(
    matrix: npt.NDArray[np.float32],
    mask: npt.NDArray[np.bool_] | None,
    q: npt.NDArray[np.float32],
    k: int,
) -> npt.NDArray[np.int64]:
    scores = matrix @ q
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top])]


async def _in_process(
    records: list[ChunkRecord],
    real_queries: npt.NDArray[np.float32],
    noisy_queries: npt.NDArray[np.float32],
    workdir: Path,
) -> dict[str, Any]:
    from usearch.index import Index

    from ledgerlens.services.retrieval.settings import LocalIndexSettings

    # the service's defaults, but no periodic snapshot (see corpus.open_index)
    settings = LocalIndexSettings(snapshot_interval_seconds=7 * 24 * 3600.0)
    filters = _filters()
    result: dict[str, Any] = {"hnsw_settings": settings.model_dump()}
    started = time.perf_counter()
    async with open_index(records, workdir, settings=settings) as index:
        indexing = time.perf_counter() - started
        backend = index.backend
        n = await backend.count()
        result["selectivity"] = {
            name: round(int(backend.mask(flt).sum()) / n, 4) for name, flt in filters.items()
        }
        result["matching_chunks"] = {
            name: int(backend.mask(flt).sum()) for name, flt in filters.items()
        }
        # 1. latency
        latency: dict[str, Any] = {}
        for k in (10, 100):
            for name, flt in filters.items():
                times = _timed(lambda q, f=flt, k=k: backend.search_now(q, f, k), real_queries)
                latency[f"k{k}_{name}"] = _ms(times)
        result["latency"] = latency
        result["p95_ms_target"] = TARGETS["in_process_p95_ms_max"]
        for k in (10, 100):
            worst = max(v["p95_ms"] for name, v in latency.items() if name.startswith(f"k{k}_"))
            result[f"p95_ms_worst_k{k}"] = worst
            result[f"p95_met_k{k}"] = worst <= TARGETS["in_process_p95_ms_max"]
        result["p95_met"] = result["p95_met_k10"] and result["p95_met_k100"]
        _log(f"in-process latency: {json.dumps(latency)}")

        # 2. recall against exact search
        queries = np.concatenate([real_queries, noisy_queries])
        recall: dict[str, Any] = {"queries": len(queries)}
        for name, flt in filters.items():
            per_query = []
            for q in queries:
                got = {h.chunk_id for h in backend.search_now(q, flt, 10)}
                truth = {h.chunk_id for h in backend.exact_search(q, flt, 10)}
                if truth:
                    per_query.append(len(got & truth) / len(truth))
            recall[f"recall_at_10_{name}"] = round(statistics.fmean(per_query), 4)
        at100 = []
        for q in queries[:500]:
            got = {h.chunk_id for h in backend.search_now(q, filters["none"], 100)}
            truth = {h.chunk_id for h in backend.exact_search(q, filters["none"], 100)}
            at100.append(len(got & truth) / len(truth))
        recall["recall_at_100_none_k100"] = round(statistics.fmean(at100), 4)
        judged = min(recall["recall_at_10_none"], recall["recall_at_10_typical"])
        recall["recall_at_10_target"] = TARGETS["recall_at_10_min"]
        recall["recall_at_10_met"] = judged >= TARGETS["recall_at_10_min"]
        result["recall"] = recall
        _log(f"recall: {recall}")

        # 3a. numpy brute force on the same vectors (the mask built per query)
        matrix = np.ascontiguousarray(np.stack([r.vector for r in records]))
        chains = np.array([r.chain for r in records])
        published = np.array(
            [np.nan if r.published_at is None else r.published_at for r in records]
        )
        authors = [r.author_keys for r in records]
        selective_rows = np.array([SELECTIVE_AUTHOR in a for a in authors])

        def mask_of(name: str) -> npt.NDArray[np.bool_] | None:
            if name == "none":
                return None
            if name == "typical":
                with np.errstate(invalid="ignore"):
                    return (
                        (chains == "ethereum")
                        & (published >= TYPICAL_AFTER)
                        & (published < TYPICAL_BEFORE)
                    )
            return selective_rows  # a posting list, precomputed (as the backend keeps one)

        brute: dict[str, Any] = {}
        for name in filters:
            times = _timed(
                lambda q, name=name: _numpy_search(matrix, mask_of(name), q, 10), real_queries
            )
            brute[f"k10_{name}"] = _ms(times)
        result["numpy_brute_force"] = brute
        _log(f"numpy brute force: {json.dumps(brute)}")

        # 4. memory and build time
        graph = backend.graph_memory_bytes()
        total = backend.memory_bytes() or 0
        result["memory"] = {
            "vectors": n,
            "graph_bytes": graph,
            "graph_bytes_per_vector": round(graph / n, 1),
            "with_columns_bytes": total,
            "with_columns_bytes_per_vector": round(total / n, 1),
            "raw_vector_bytes_per_vector": int(matrix.shape[1] * 4),
            # the vector, alive, doc_type and published columns of one slot
            "columns_bytes_per_vector_at_exact_capacity": int(matrix.shape[1] * 4 + 1 + 2 + 8),
            "note": "columns are allocated by doubling, so they may hold spare capacity",
        }
        bare = Index(
            ndim=matrix.shape[1],
            metric="cos",
            dtype="f32",
            connectivity=settings.connectivity,
            expansion_add=settings.expansion_add,
            expansion_search=settings.expansion_search,
        )
        started = time.perf_counter()
        bare.add(np.arange(1, n + 1, dtype=np.uint64), matrix, threads=0)
        hnsw_build = time.perf_counter() - started
        del bare
        result["build"] = {
            "indexer_seconds": round(indexing, 1),
            "indexer_note": (
                "every chunk through Indexer.index in batches of 2000: SQLite rows, HNSW "
                "inserts (1 thread), tantivy commit"
            ),
            "hnsw_only_seconds": round(hnsw_build, 1),
            "hnsw_only_note": f"one usearch add of all vectors, threads=0 ({os.cpu_count()} CPUs)",
        }
        result["_matrix_rows"] = n
    return result


def _qdrant(
    records: list[ChunkRecord],
    real_queries: npt.NDArray[np.float32],
    budget_seconds: float,
    max_queries: int,
    query_budget: float = 60.0,
) -> dict[str, Any]:
    import warnings

    from qdrant_client import QdrantClient, models

    from ledgerlens.services.retrieval.index.qdrant import _conditions, _payload, point_id

    client = QdrantClient(location=":memory:")
    client.create_collection(
        "bench", vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE)
    )
    started = time.perf_counter()
    uploaded = 0
    batch = 1000
    for start in range(0, len(records), batch):
        part = records[start : start + batch]
        points = []
        for r in part:
            payload = _payload(r)
            del payload["chunk"]  # the filter fields only: the search compares filters
            points.append(
                models.PointStruct(
                    id=point_id(r.chunk_id), vector=r.vector.tolist(), payload=payload
                )
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client.upsert("bench", points=points, wait=True)
        uploaded += len(part)
        if time.perf_counter() - started > budget_seconds and uploaded < len(records):
            _log(f"qdrant upload over budget: stopping at {uploaded} points")
            break
    upload = time.perf_counter() - started
    result: dict[str, Any] = {
        "mode": "qdrant-client local mode, QdrantClient(location=':memory:')",
        "points": uploaded,
        "subset": uploaded < len(records),
        "upload_seconds": round(upload, 1),
        "queries_note": (
            f"up to {max_queries} of the real queries per filter, fewer when "
            f"{query_budget:.0f} s are spent (n in each entry)"
        ),
    }
    _log(f"qdrant: {uploaded} points uploaded in {upload:.1f}s")
    queries = real_queries[:max_queries]
    for name, flt in _filters().items():
        conditions = _conditions(flt)
        query_filter = models.Filter(must=conditions) if conditions else None

        def search(q: npt.NDArray[np.float32], qf: Any = query_filter) -> Any:
            return client.query_points("bench", query=q.tolist(), query_filter=qf, limit=10)

        times = _timed(search, queries, budget_seconds=query_budget)
        result[f"k10_{name}"] = _ms(times)
    client.close()
    return result


# -- the service through gRPC ------------------------------------------------------------


async def _start_service(workdir: Path, index_dir: Path, nats_url: str) -> tuple[Any, str, str]:
    env = {
        **os.environ,
        "LEDGERLENS_RETRIEVAL_DATABASE_URL": f"sqlite+aiosqlite:///{index_dir / 'retrieval.db'}",
        "LEDGERLENS_RETRIEVAL_DATA_DIR": str(index_dir / "data"),
        "LEDGERLENS_RETRIEVAL_NATS_URL": nats_url,
        "LEDGERLENS_RETRIEVAL_HOST": "127.0.0.1",
        "LEDGERLENS_RETRIEVAL_GRPC_PORT": "0",
        "LEDGERLENS_RETRIEVAL_HTTP_PORT": "0",
        "LEDGERLENS_RETRIEVAL_AUTH__ENABLED": "false",
    }
    proc, line = await start_service(
        "ledgerlens.services.retrieval", env, workdir / "retrieval.log", within=600
    )
    address = grpc_address(line)
    http = line.split("HTTP ", 1)[1].strip()
    return proc, address, http


async def _measured(
    stub: Any, requests: list[retrieval_pb2.SearchRequest], concurrency: int, server_pid: int
) -> dict[str, Any]:
    """One measured run: latency and QPS, plus the CPU each call cost the service and
    this load generator. On a machine of ``cpus`` cores shared by both, a closed loop of
    ``concurrency`` calls cannot average less than ``concurrency x (server + client CPU
    per call) / cpus``: the floor the latency target is up against here."""
    server_before, client_before = process_cpu_seconds(server_pid), own_cpu_seconds()
    latencies, seconds = await _drive(stub, requests, concurrency)
    server_cpu = process_cpu_seconds(server_pid) - server_before
    client_cpu = own_cpu_seconds() - client_before
    summary: dict[str, Any] = rpc_summary(latencies, seconds)
    calls = len(latencies)
    summary["server_cpu_ms_per_call"] = round(server_cpu / calls * 1000, 3)
    summary["client_cpu_ms_per_call"] = round(client_cpu / calls * 1000, 3)
    summary.update(closed_loop_floor(concurrency, (server_cpu + client_cpu) / calls))
    return summary


async def _drive(
    stub: Any, requests: list[retrieval_pb2.SearchRequest], concurrency: int
) -> tuple[list[float], float]:
    queue: asyncio.Queue[retrieval_pb2.SearchRequest] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    latencies: list[float] = []

    async def worker() -> None:
        while True:
            try:
                request = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            await stub.Search(request, timeout=60)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def _request(text: str, fusion: int, flt: str) -> retrieval_pb2.SearchRequest:
    request = retrieval_pb2.SearchRequest(query=text, top_k=10, fusion=fusion)  # type: ignore[arg-type]
    grpc_filter = _grpc_filter(flt)
    if grpc_filter is not None:
        request.filter.CopyFrom(grpc_filter)
    return request


def _histogram(metrics_text: str, name: str) -> dict[str, Any]:
    buckets: list[tuple[float, float]] = []
    count = 0.0
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = re.search(r'le="([^"]+)"', line)
            assert le is not None
            buckets.append((float(le.group(1)), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(f"{name}_count"):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            total = float(line.rsplit(" ", 1)[1])
    p95_bound = next((le for le, c in buckets if count and c >= 0.95 * count), None)
    return {
        "count": int(count),
        "mean_s": round(total / count, 4) if count else None,
        "p95_bucket_upper_bound_s": p95_bound,
        "buckets": {str(le): int(c) for le, c in buckets},
    }


async def _freshness(
    stub: Any, nats_url: str, http: str, records: list[ChunkRecord], events: int
) -> dict[str, Any]:
    from ledgerlens.events.v1 import events_pb2
    from ledgerlens.runtime.events import EventBus, Subjects

    bus = await EventBus.connect(nats_url, "bench-retrieval")
    lags: list[float] = []
    try:
        for i in range(events):
            marker = f"freshnessmarker{i:04d}x{uuid.uuid4().hex[:8]}"
            document_id = f"doc_fresh_{i:04d}"
            provenance = common_pb2.Provenance(
                document_id=document_id,
                version=1,
                source_url=f"https://corpus.example.org/fresh/{i}",
                sha256=uuid.uuid4().hex * 2,
            )
            metadata = common_pb2.DocumentMetadata(
                doc_type=common_pb2.DOC_TYPE_FORUM, chain="ethereum", title=f"Fresh {marker}"
            )
            chunks = []
            for j in range(8):
                source = records[(i * 8 + j) * 7 % len(records)]
                text = f"{marker} {source.text}"
                chunks.append(
                    events_pb2.EmbeddedChunk(
                        chunk_id=f"{document_id}:1:{j}",
                        provenance=provenance,
                        metadata=metadata,
                        chunk_index=j,
                        text=text,
                        vector=source.vector.tolist(),
                        char_start=0,
                        char_end=len(text),
                        token_count=source.chunk.token_count,
                    )
                )
            event = events_pb2.ChunksEmbedded(
                document_id=document_id,
                version=1,
                embedding_model="all-MiniLM-L6-v2",
                dimensions=384,
                chunks=chunks,
                batch_index=0,
                batch_count=1,
            )
            request = retrieval_pb2.SearchRequest(
                query=marker, top_k=1, fusion=retrieval_pb2.FUSION_MODE_KEYWORD
            )
            started = time.perf_counter()
            await bus.publish(Subjects.INGESTION_CHUNKS_EMBEDDED, event, f"fresh-{marker}")
            while True:
                response = await stub.Search(request, timeout=10)
                if response.results:
                    lags.append(time.perf_counter() - started)
                    break
                if time.perf_counter() - started > 30:
                    raise RuntimeError(f"event {i} not searchable after 30 s")
                await asyncio.sleep(0.002)
    finally:
        await bus.close()
    async with httpx.AsyncClient(timeout=10) as http_client:
        metrics_text = (await http_client.get(f"{http}/metrics")).text
    summary = {
        "events": events,
        "chunks_per_event": 8,
        "method": (
            "publish (JetStream ack) -> a keyword Search for the event's marker word "
            "returns it; polled every 2 ms"
        ),
        **{k: v for k, v in _ms(lags).items() if k != "p99_ms"},
        "service_index_lag_histogram": _histogram(
            metrics_text, "ledgerlens_retrieval_index_lag_seconds"
        ),
    }
    p95_s = summary["p95_ms"] / 1000
    summary["p95_s_target"] = TARGETS["freshness_p95_s_max"]
    summary["p95_met"] = p95_s <= TARGETS["freshness_p95_s_max"]
    return summary


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def _service(
    workdir: Path,
    index_dir: Path,
    texts: list[str],
    records: list[ChunkRecord],
    warm_queries: int,
    rounds: int,
    fresh_events: int,
) -> dict[str, Any]:
    import grpc.aio

    from ledgerlens.retrieval.v1 import retrieval_pb2_grpc
    from ledgerlens.runtime.testing import PrivateNatsServer

    nats = PrivateNatsServer(store_dir=workdir / "nats").start()
    proc = None
    try:
        started = time.perf_counter()
        proc, address, http = await _start_service(workdir, index_dir, nats.url)
        startup = time.perf_counter() - started
        _log(f"service up at {address} in {startup:.1f}s")
        result: dict[str, Any] = {
            "process": "python -m ledgerlens.services.retrieval (SQLite, local HNSW backend)",
            "startup_seconds": round(startup, 1),
            "concurrency": CONCURRENCY,
            "top_k": 10,
        }
        rrf = retrieval_pb2.FUSION_MODE_RRF
        dense = retrieval_pb2.FUSION_MODE_DENSE
        async with grpc.aio.insecure_channel(address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            # the connection and the first search's allocations, on a text used nowhere else
            for _ in range(3):
                await stub.Search(_request("connection warm-up", rrf, "none"), timeout=60)
            warm = texts[:warm_queries]
            # cold: first time each text is seen, one call at a time (the model embeds it)
            cold, _ = await _drive(stub, [_request(t, rrf, "none") for t in warm], 1)
            single_warm, _ = await _drive(stub, [_request(t, rrf, "none") for t in warm], 1)
            cold_ms = _ms(cold)
            single_ms = _ms(single_warm)
            result["cold_query"] = {
                "note": "first Search of a text (embedded by the model), one call at a time",
                **{k: v for k, v in cold_ms.items()},
                "embedding_cost_p50_ms": round(cold_ms["p50_ms"] - single_ms["p50_ms"], 3),
            }
            result["warm_single_stream"] = single_ms
            # the queueing curve: one event loop searches, so latency ~ concurrency x
            # the per-search CPU time once the server is saturated
            curve: dict[str, Any] = {}
            for concurrency in (1, 2, 4):
                requests = [_request(t, rrf, "none") for t in warm]
                curve[f"c{concurrency}"] = await _measured(
                    stub, requests * rounds, concurrency, proc.pid
                )
            runs: dict[str, Any] = {}
            for label, fusion, flt in (
                ("hybrid_rrf_none", rrf, "none"),
                ("hybrid_rrf_typical", rrf, "typical"),
                ("hybrid_rrf_selective", rrf, "selective"),
                ("dense_none", dense, "none"),
                ("dense_typical", dense, "typical"),
            ):
                requests = [_request(t, fusion, flt) for t in warm]
                await _drive(stub, requests, CONCURRENCY)  # warm-up pass of this setting
                runs[label] = await _measured(stub, requests * rounds, CONCURRENCY, proc.pid)
                _log(f"gRPC {label}: {runs[label]}")
            result["warm"] = runs
            curve["c8"] = runs["hybrid_rrf_none"]
            result["hybrid_rrf_none_by_concurrency"] = curve
            result["server_ms_per_hybrid_search_at_saturation"] = round(
                1000 / runs["hybrid_rrf_none"]["throughput_rps"], 3
            )
            # the CPU floor of each judged setting: even with the service spread perfectly
            # over every core, a closed loop of 8 cannot average less than this here
            result["cpu_bound_mean_ms_at_concurrency_8"] = {
                label: runs[label]["cpu_bound_mean_ms"] for label in runs
            }
            judged = [runs["hybrid_rrf_none"]["p95_ms"], runs["hybrid_rrf_typical"]["p95_ms"]]
            result["warm_p95_ms_target"] = TARGETS["grpc_warm_p95_ms_max"]
            result["warm_p95_met"] = max(judged) <= TARGETS["grpc_warm_p95_ms_max"]
            # for reference, not the target: one call at a time (no queueing)
            result["warm_p95_met_at_concurrency_1"] = (
                curve["c1"]["p95_ms"] <= TARGETS["grpc_warm_p95_ms_max"]
            )
            result["service_rss_mb"] = _rss_mb(proc.pid)
            result["freshness"] = await _freshness(stub, nats.url, http, records, fresh_events)
            _log(f"freshness: {result['freshness']}")
        return result
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        nats.stop()


# -- main --------------------------------------------------------------------------------


def main(
    chunks: int = 100_000,
    warm_queries: int = 200,
    rounds: int = 10,
    qdrant_budget: float = 300.0,
    qdrant_queries: int = 200,
    fresh_events: int = 40,
    write: bool = True,
    busy_note: str = "",
) -> dict[str, Any]:
    _LOAD.clear()
    _sample_load("start")
    rng = np.random.default_rng(SEED)
    real = load_corpus()
    if chunks < len(real):
        real = real[:chunks]
    made = generate(real, chunks - len(real), rng)
    records = real + made
    _log(f"{len(real)} real + {len(made)} generated chunks")
    texts, real_queries, noisy_queries = _query_vectors(real, rng)
    _log(f"{len(texts)} real query texts")
    # the gRPC query set: the eval queries first, then titles, in a fixed shuffled order
    order = list(range(len(texts)))
    random.Random(SEED).shuffle(order)
    service_texts = [texts[i] for i in order]

    result: dict[str, Any] = {
        "chunks": len(records),
        "real_eip_chunks": len(real),
        "generated_chunks": len(made),
        "dimensions": int(records[0].vector.shape[0]),
        "queries": {"real": len(texts), "noisy_chunk_vectors": len(noisy_queries)},
        "cpus": os.cpu_count(),
        "filters": {
            "typical": "chains=[ethereum], published in [2019-01-01, 2024-01-01)",
            "selective": f"authors=[{SELECTIVE_AUTHOR}]",
        },
    }
    with tempfile.TemporaryDirectory(prefix="ledgerlens-bench-retrieval-") as tmp:
        work = Path(tmp)
        index_dir = work / "index"
        _sample_load("in-process")
        in_process = asyncio.run(_in_process(records, real_queries, noisy_queries, index_dir))
        _sample_load("qdrant")
        in_process.pop("_matrix_rows", None)
        result["in_process"] = in_process

        qdrant = _qdrant(records, real_queries, qdrant_budget, qdrant_queries)
        local = in_process["latency"]
        ratios = {
            name: round(qdrant[f"k10_{name}"]["p50_ms"] / local[f"k10_{name}"]["p50_ms"], 1)
            for name in ("none", "typical", "selective")
        }
        qdrant["speedup_of_in_process_p50"] = ratios
        qdrant["speedup_target"] = TARGETS["qdrant_local_speedup_min"]
        qdrant["speedup_met"] = min(ratios.values()) >= TARGETS["qdrant_local_speedup_min"]
        result["qdrant_local"] = qdrant
        _log(f"qdrant local: {qdrant}")

        _sample_load("grpc")
        result["grpc_service"] = asyncio.run(
            _service(work, index_dir, service_texts, records, warm_queries, rounds, fresh_events)
        )

    _sample_load("end")
    result["targets"] = TARGETS
    result["met"] = {
        "in_process_p95_k10": result["in_process"]["p95_met_k10"],
        "in_process_p95_k100": result["in_process"]["p95_met_k100"],
        "recall_at_10": result["in_process"]["recall"]["recall_at_10_met"],
        "qdrant_local_speedup": result["qdrant_local"]["speedup_met"],
        "grpc_warm_p95": result["grpc_service"]["warm_p95_met"],
        "freshness_p95": result["grpc_service"]["freshness"]["p95_met"],
    }
    result["load_average_1m"] = dict(_LOAD)
    busiest = max(load for _, load in _LOAD)
    note = busy_note or (
        f"the 1-minute load average reached {busiest} on {os.cpu_count()} CPUs during the run "
        "(this benchmark alone keeps about 1-2 busy): other work shared the machine"
        if busiest > 2.5
        else ""
    )
    if note:
        result["machine_busy_note"] = note
    if write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000, help="chunks in the index")
    parser.add_argument("--warm-queries", type=int, default=200, help="distinct gRPC query texts")
    parser.add_argument("--rounds", type=int, default=10, help="repeats of the warm query set")
    parser.add_argument(
        "--qdrant-budget", type=float, default=300.0, help="upload seconds, at most"
    )
    parser.add_argument(
        "--qdrant-queries", type=int, default=200, help="queries per qdrant setting"
    )
    parser.add_argument("--fresh-events", type=int, default=40, help="events for freshness")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    parser.add_argument("--busy-note", default="", help="machine_busy_note for the JSON")
    args = parser.parse_args()
    print(
        json.dumps(
            main(
                args.chunks,
                args.warm_queries,
                args.rounds,
                args.qdrant_budget,
                args.qdrant_queries,
                args.fresh_events,
                not args.no_write,
                args.busy_note,
            ),
            indent=2,
        )
    )
