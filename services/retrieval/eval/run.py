"""Retrieval quality on the labelled EIP queries: dense, keyword, hybrid (RRF), weighted.

``make eval`` (or ``python services/retrieval/eval/run.py``). Method:

1. The EIP corpus is chunked and embedded exactly as ingestion does it
   (:mod:`corpus`; the vectors come from a cache in ``.data/eval`` after the first run,
   which embeds ~16,000 chunks in about 15 minutes).
2. The records go through the service's own :class:`Indexer` into its own index, in
   this process: the SQLite store, the HNSW backend (``LocalBackend``) and the tantivy
   BM25 index, in a temporary directory.
3. Each query of ``queries.yaml`` is parsed as a ``SearchRequest`` (``top_k`` 100) by
   the service's validator and ranked by the service's :meth:`Searcher.ranked`
   (candidates from each ranking, fusion, exactly what ``Search`` returns before
   hydration), once per fusion mode: DENSE, KEYWORD, RRF (the default, "hybrid") and
   WEIGHTED (``dense_weight`` 0.5). Query vectors are the same model's.
4. The top 100 chunks become a document ranking (the labels are per EIP): a
   document's rank is its best chunk's rank, its score that chunk's fused score (less
   ``rank * 1e-9``, so ranx keeps the service's order where fused scores tie, e.g.
   identical ``Moved`` stubs); later chunks of a ranked document are dropped.
5. ranx scores the runs against the graded labels: nDCG@10 (graded), recall@10,
   recall@100 (grade >= 1 counts as relevant) and MRR@100, over all queries and per kind
   (known-item, topical); ``paired t-test`` p-values compare hybrid with dense and
   keyword on nDCG@10.

The acceptance criterion: hybrid (RRF with the service defaults: ``candidates`` 50,
so with ``top_k`` 100 each ranking gives 100 candidates; ``rrf_k`` 60) beats both
dense-only and keyword-only on nDCG@10. A small sweep of the hybrid knobs (``rrf_k``,
``candidates``) is reported alongside, for information.

Writes ``results.json`` next to this file; prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml
from ranx import Qrels, Run, compare, evaluate
from rich.console import Console
from rich.table import Table

from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.services.retrieval.model import ChunkRecord
from ledgerlens.services.retrieval.requests import Limits, parse_search
from ledgerlens.services.retrieval.searcher import Searcher

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from corpus import eip_number, embed_texts, load_corpus, open_index  # noqa: E402

from ledgerlens.services.retrieval.settings import Settings  # noqa: E402

QUERIES = HERE / "queries.yaml"
RESULTS = HERE / "results.json"
TOP_K = 100
# the service's defaults; with top_k 100 a search takes max(candidates, top_k) = 100
# candidates from each ranking
DEFAULT_CANDIDATES = Settings().candidates
DEFAULT_RRF_K = Settings().rrf_k
METRICS = ["ndcg@10", "recall@10", "recall@100", "mrr@100"]
KINDS = ("known-item", "topical")
#: name -> (fusion mode, dense_weight or None)
MODES: dict[str, tuple[int, float | None]] = {
    "dense": (retrieval_pb2.FUSION_MODE_DENSE, None),
    "keyword": (retrieval_pb2.FUSION_MODE_KEYWORD, None),
    "hybrid_rrf": (retrieval_pb2.FUSION_MODE_RRF, None),
    "weighted_0.5": (retrieval_pb2.FUSION_MODE_WEIGHTED, 0.5),
}
#: hybrid (RRF) settings tried besides the defaults: (candidates, rrf_k)
SWEEP = [(100, 10), (100, 30), (100, 60), (100, 120), (200, 60), (400, 60), (200, 30)]

out = Console(stderr=False)
# ranx's numba kernels warn about a uint64 -> int64 cast of list lengths (harmless)
warnings.filterwarnings("ignore", message="unsafe cast from uint64 to int64")


@dataclass(frozen=True)
class LabelledQuery:
    id: str
    kind: str
    text: str
    relevant: dict[int, int]


def load_queries(path: Path = QUERIES) -> list[LabelledQuery]:
    data = yaml.safe_load(path.read_text())
    return [
        LabelledQuery(
            q["id"], q["kind"], q["query"], {int(k): int(v) for k, v in q["relevant"].items()}
        )
        for q in data["queries"]
    ]


def document_ranking(chunk_ids: list[str], scores: list[float], eip_of: dict[str, int]) -> dict:
    """{EIP number as str: score}, best chunk per document, order preserved (see module)."""
    ranked: dict[str, float] = {}
    for chunk_id, score in zip(chunk_ids, scores, strict=True):
        doc = str(eip_of[chunk_id])
        if doc not in ranked:
            ranked[doc] = float(score) - len(ranked) * 1e-9
    return ranked


async def _rankings(
    records: list[ChunkRecord],
    queries: list[LabelledQuery],
    vectors: npt.NDArray[np.float32],
    workdir: Path,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
    """Document runs per configuration name (the modes, then the sweep)."""
    eip_of = {}
    for record in records:
        number = eip_number(record.source_url)
        assert number is not None, record.source_url
        eip_of[record.chunk_id] = number
    limits = Limits(max_top_k=TOP_K)
    runs: dict[str, dict[str, dict[str, float]]] = {}
    info: dict[str, Any] = {}
    async with open_index(records, workdir) as index:
        info["chunks_indexed"] = await index.backend.count()
        info["keyword_docs"] = index.keyword.count()

        def searcher(candidates: int, rrf_k: int) -> Searcher:
            # ranked() never embeds: the query vectors are passed in, so no queue
            return Searcher(
                index.backend,
                index.keyword,
                index.state,
                None,  # type: ignore[arg-type]
                candidates=candidates,
                rrf_k=rrf_k,
            )

        async def run(s: Searcher, fusion: int, weight: float | None) -> dict:
            result: dict[str, dict[str, float]] = {}
            for query, vector in zip(queries, vectors, strict=True):
                request = retrieval_pb2.SearchRequest(query=query.text, top_k=TOP_K, fusion=fusion)  # type: ignore[arg-type]
                if weight is not None:
                    request.dense_weight = weight
                parsed = parse_search(request, limits)
                fused = (await s.ranked(parsed, vector))[: parsed.top_k]
                result[query.id] = document_ranking(
                    [f.chunk_id for f in fused], [f.score for f in fused], eip_of
                )
            return result

        default = searcher(DEFAULT_CANDIDATES, DEFAULT_RRF_K)
        timings = {}
        for name, (fusion, weight) in MODES.items():
            started = time.perf_counter()
            runs[name] = await run(default, fusion, weight)
            timings[name] = round((time.perf_counter() - started) * 1000 / len(queries), 2)
        info["ms_per_query"] = timings
        for candidates, rrf_k in SWEEP:
            name = f"hybrid_rrf(candidates={candidates}, rrf_k={rrf_k})"
            runs[name] = await run(searcher(candidates, rrf_k), retrieval_pb2.FUSION_MODE_RRF, None)
    return runs, info


def _scores(qrels: dict, run: dict) -> dict[str, float]:
    result = evaluate(Qrels(qrels), Run(run), METRICS, make_comparable=True)
    assert isinstance(result, dict)
    return {m: round(float(v), 4) for m, v in result.items()}


def score(
    queries: list[LabelledQuery], runs: dict[str, dict[str, dict[str, float]]]
) -> dict[str, Any]:
    qrels_all = {q.id: {str(n): g for n, g in q.relevant.items()} for q in queries}
    groups = {"all": [q.id for q in queries]}
    for kind in KINDS:
        groups[kind] = [q.id for q in queries if q.kind == kind]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, run in runs.items():
        table[name] = {}
        for group, ids in groups.items():
            table[name][group] = _scores(
                {i: qrels_all[i] for i in ids}, {i: run.get(i, {}) for i in ids}
            )
    return table


def significance(queries: list[LabelledQuery], runs: dict) -> dict[str, Any]:
    """Hybrid vs dense and vs keyword on nDCG@10 over all queries: the paired t-test's
    p-value and per-query wins/ties/losses of hybrid."""
    qrels = Qrels({q.id: {str(n): g for n, g in q.relevant.items()} for q in queries})
    named = []
    for name in ("hybrid_rrf", "dense", "keyword"):
        named.append(Run(runs[name], name=name))
    report = compare(qrels, named, ["ndcg@10"], stat_test="student", make_comparable=True)
    found = {}
    wtl = report.to_dict()["hybrid_rrf"]["win_tie_loss"]
    for other in ("dense", "keyword"):
        p = report.comparisons[("hybrid_rrf", other)]["ndcg@10"]["p_value"]
        counts = wtl[other]["ndcg@10"]
        found[f"hybrid_rrf_vs_{other}"] = {
            "p_value": round(float(p), 4),
            "wins_ties_losses": [int(counts["W"]), int(counts["T"]), int(counts["L"])],
        }
    return found


def _table(results: dict[str, Any]) -> Table:
    names = list(MODES)
    table = Table(title="EIP retrieval eval (document level, top 100 chunks)")
    table.add_column("queries")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    scores = results["scores"]
    for group in ("all", *KINDS):
        count = results["queries"][group]
        for i, metric in enumerate(METRICS):
            values = [scores[n][group][metric] for n in names]
            best = max(values)
            cells = [
                f"[bold]{v:.3f}[/bold]" if math.isclose(v, best) else f"{v:.3f}" for v in values
            ]
            table.add_row(f"{group} ({count})" if i == 0 else "", metric, *cells)
        table.add_section()
    return table


def main(limit_docs: int | None = None, write: bool = True) -> dict[str, Any]:
    queries = load_queries()
    records = load_corpus(limit=limit_docs)
    vectors = embed_texts([q.text for q in queries])
    with tempfile.TemporaryDirectory(prefix="ledgerlens-eval-") as tmp:
        runs, info = asyncio.run(_rankings(records, queries, vectors, Path(tmp)))
    scores = score(queries, runs)
    ndcg = {name: scores[name]["all"]["ndcg@10"] for name in MODES}
    met = ndcg["hybrid_rrf"] > ndcg["dense"] and ndcg["hybrid_rrf"] > ndcg["keyword"]
    results: dict[str, Any] = {
        "corpus": {
            "documents": len({r.document_id for r in records}),
            "chunks": len(records),
            "embedding_model": "all-MiniLM-L6-v2",
            **info,
        },
        "queries": {"all": len(queries), **{k: sum(q.kind == k for q in queries) for k in KINDS}},
        "method": (
            "Searcher.ranked over the service's own index (LocalBackend + tantivy), "
            f"top_k {TOP_K} chunks -> documents by best chunk; ranx metrics"
        ),
        "defaults": {"candidates": DEFAULT_CANDIDATES, "rrf_k": DEFAULT_RRF_K},
        "metrics": METRICS,
        "scores": {name: scores[name] for name in MODES},
        "hybrid_sweep": {
            name: scores[name]["all"] for name in runs if name.startswith("hybrid_rrf(")
        },
        "ndcg@10_paired_t_test": significance(queries, runs),
        "acceptance": {
            "criterion": "hybrid (RRF, defaults) nDCG@10 > dense-only and > keyword-only",
            "ndcg@10": ndcg,
            "met": met,
        },
    }
    out.print(_table(results))
    sweep = Table(title="hybrid RRF knobs (all queries)")
    sweep.add_column("setting")
    for metric in METRICS:
        sweep.add_column(metric, justify="right")
    for name, values in results["hybrid_sweep"].items():
        setting = name.removeprefix("hybrid_rrf(").removesuffix(")")
        sweep.add_row(setting, *(f"{values[m]:.3f}" for m in METRICS))
    out.print(sweep)
    out.print(
        f"acceptance (hybrid nDCG@10 beats dense and keyword): "
        f"{'[green]met[/green]' if met else '[red]NOT met[/red]'} "
        f"(paired t-test: {results['ndcg@10_paired_t_test']})"
    )
    if write and limit_docs is None:
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        out.print(f"wrote {os.path.relpath(RESULTS)}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--limit-docs", type=int, default=None, help="only the first N EIPs (no results.json)"
    )
    args = parser.parse_args()
    main(args.limit_docs)
