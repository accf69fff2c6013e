"""What ``bench/load.py`` sends: the corpus split, the queries, the calls, the statistics.

The queries are the labelled ones of ``services/retrieval/eval/queries.yaml``. The seed
set (ingested before the measured mix) is made of the EIPs those queries are about
(relevance 2), in query order, so searches and answers find what they ask for; only
the queries whose central EIP is in the seed are sent. The mix's ingest calls take the
other EIPs of the corpus, in a fixed shuffled order, each under a source URL of its own
for the run (a document's identity is its source URL), so each one is a new document.
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.common.v1 import common_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.errors import from_rpc_error

REPO = Path(__file__).resolve().parent.parent
QUERIES = REPO / "services" / "retrieval" / "eval" / "queries.yaml"
SEED_URL = "https://eips.ethereum.org/EIPS/eip-{number}"
_EIP_FILE = re.compile(r"^eip-(\d+)\.md$")

#: the filters a search sometimes carries (each as likely as the others)
SELECTIVE_AUTHOR = "vitalik buterin"


def _ts(day: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(day).replace(tzinfo=UTC))
    return stamp


FILTERS: dict[str, retrieval_pb2.SearchFilter] = {
    "doc_type_eip": retrieval_pb2.SearchFilter(doc_types=[common_pb2.DOC_TYPE_EIP]),
    "chain_and_dates": retrieval_pb2.SearchFilter(
        chains=["ethereum"],
        published_after=_ts("2019-01-01"),
        published_before=_ts("2024-01-01"),
    ),
    "author": retrieval_pb2.SearchFilter(authors=[SELECTIVE_AUTHOR]),
}


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    eip: int  # the EIP it is about (relevance 2)


@dataclass(frozen=True)
class Corpus:
    seed: dict[int, Path]  # EIP number -> file, ingested before the mix
    rest: list[Path]  # ingested during the mix, in this order
    queries: list[Query]  # about seed EIPs only


def eip_files(corpus_dir: Path) -> dict[int, Path]:
    files = {}
    for path in corpus_dir.iterdir():
        match = _EIP_FILE.match(path.name)
        if match:
            files[int(match.group(1))] = path
    return files


def load_corpus(corpus_dir: Path, seed_docs: int, shuffle_seed: int = 9) -> Corpus:
    files = eip_files(corpus_dir)
    raw = yaml.safe_load(QUERIES.read_text(encoding="utf-8"))["queries"]
    labelled = []
    for item in raw:
        central = [int(eip) for eip, grade in item.get("relevant", {}).items() if grade == 2]
        central = [eip for eip in central if eip in files]
        if central:
            labelled.append(Query(item["id"], item["query"], central[0]))
    seed: dict[int, Path] = {}
    for query in labelled:
        if len(seed) >= seed_docs:
            break
        seed.setdefault(query.eip, files[query.eip])
    # more seed than the queries name: top up with the lowest-numbered EIPs
    for number in sorted(files):
        if len(seed) >= seed_docs:
            break
        seed.setdefault(number, files[number])
    rest = [files[n] for n in sorted(files) if n not in seed]
    random.Random(shuffle_seed).shuffle(rest)
    queries = [query for query in labelled if query.eip in seed]
    return Corpus(seed=seed, rest=rest, queries=queries)


def ingest_request(path: Path, source_url: str) -> ingestion_pb2.IngestDocumentRequest:
    return ingestion_pb2.IngestDocumentRequest(
        source_url=source_url,
        content=path.read_bytes(),
        content_type="text/markdown",
        metadata=common_pb2.DocumentMetadata(doc_type=common_pb2.DOC_TYPE_EIP, chain="ethereum"),
    )


# -- statistics --------------------------------------------------------------------------


@dataclass
class Calls:
    """Every measured call of one RPC: latency (s) of the successful and failed ones."""

    latencies: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    late: int = 0  # completed after the measured window (excluded)
    ramp: int = 0  # started during the ramp, before the window (excluded)
    backoff_seconds: float = 0.0  # waited as RetryInfo asked, after refused calls

    def record(self, seconds: float, code: str) -> None:
        self.latencies.append(seconds)
        self.codes[code] += 1

    def summary(self, window: float) -> dict[str, Any]:
        calls = len(self.latencies)
        errors = calls - self.codes.get("OK", 0)
        out: dict[str, Any] = {
            "calls": calls,
            "errors": errors,
            "error_rate": round(errors / calls, 4) if calls else None,
            "codes": dict(sorted(self.codes.items())),
            "throughput_per_s": round(calls / window, 2),
            "completed_after_window": self.late,
            "ramp_calls": self.ramp,
            "retry_info_backoff_seconds": round(self.backoff_seconds, 1),
        }
        if calls:
            ms = np.asarray(self.latencies) * 1000.0
            p50, p95, p99 = np.percentile(ms, [50, 95, 99])  # linear interpolation
            out |= {
                "p50_ms": round(float(p50), 2),
                "p95_ms": round(float(p95), 2),
                "p99_ms": round(float(p99), 2),
                "max_ms": round(float(ms.max()), 2),
                "mean_ms": round(statistics.fmean(ms.tolist()), 2),
            }
        return out


# -- the closed loop ---------------------------------------------------------------------

Op = Callable[[random.Random], Awaitable[object]]


def split_workers(concurrency: int, weights: dict[str, float]) -> dict[str, int]:
    """Workers per RPC in proportion to the weights (largest remainder), at least one for
    each RPC of positive weight."""
    active = {name: w for name, w in weights.items() if w > 0}
    if concurrency < len(active):
        raise ValueError(f"concurrency {concurrency} < {len(active)} RPCs with a weight")
    total = sum(active.values())
    exact = {name: concurrency * w / total for name, w in active.items()}
    counts = {name: max(1, int(x)) for name, x in exact.items()}
    by_remainder = sorted(active, key=lambda name: exact[name] - int(exact[name]), reverse=True)
    while sum(counts.values()) < concurrency:
        for name in by_remainder:
            if sum(counts.values()) < concurrency:
                counts[name] += 1
    while sum(counts.values()) > concurrency:  # the max(1, ...) can overshoot
        name = max(counts, key=lambda n: counts[n] - exact[n])
        counts[name] -= 1
    return counts


async def closed_loop(
    worker: int,
    ops: dict[str, Op],
    weights: Sequence[float],
    measure_from: float,
    deadline: float,
    results: dict[str, Calls],
    seed: int,
) -> None:
    """One closed-loop worker: pick an RPC by weight, call it, record it; until the
    deadline (``perf_counter``). Calls started before ``measure_from`` (the ramp) are not
    measured; a call still in flight at the deadline finishes and counts apart."""
    rng = random.Random(seed * 1000 + worker)
    names = list(ops)
    while time.perf_counter() < deadline:
        name = names[0] if len(names) == 1 else rng.choices(names, weights)[0]
        started = time.perf_counter()
        try:
            await ops[name](rng)
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
            backoff = _retry_after(error)
        else:
            backoff = 0.0
        ended = time.perf_counter()
        if started < measure_from:
            results[name].ramp += 1
        elif ended <= deadline:
            results[name].record(ended - started, code)
        else:
            results[name].late += 1
        if backoff > 0:
            # a well-behaved client waits as RetryInfo says (a rate limit), not spinning
            results[name].backoff_seconds += backoff
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.perf_counter())))


def _retry_after(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a RESOURCE_EXHAUSTED / UNAVAILABLE answer (0: none)."""
    domain = from_rpc_error(error)
    retry_after = getattr(domain, "retry_after", None)
    return float(retry_after) if retry_after else 0.0
