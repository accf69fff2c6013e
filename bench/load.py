"""``make load``: a realistic mix of ingest, search and answer against the running stack.

Targets the stack ``make up`` runs (``<data-dir>/devstack.json``: every process's pid,
ports and endpoints). With none running there, it starts a private one (the same
``Supervisor``, a temp data dir, free ports) for the duration of the run and says so on
stderr; ``--stack running`` makes a missing stack an error instead.

1. **Credentials.** An API key ``loadgen-service`` (tenant ``devstack``) with the scopes
   the mix needs, created by identity's ``create-key`` as ``make up`` creates service
   keys, traded for a token at ``/oauth/token``.
2. **Warm-up.** ``--seed-docs`` EIPs (those the labelled retrieval queries are about) are
   ingested with ``IngestDocument``, then polled with ``Search`` until each is searchable.
3. **Mix.** ``--concurrency`` closed-loop workers over grpc.aio on loopback, for
   ``--duration`` seconds, each picking its next call by weight: ``Search`` (hybrid,
   top 10, a labelled query, a metadata filter on ``--filtered`` of them),
   ``Answer`` (inference's default provider, the local extractive answerer, through
   retrieval, top 5) and ``IngestDocument`` (an EIP not in the seed, as a new document).
4. **Output.** One JSON document on stdout (and ``--out``): the machine and its load
   average, the settings, per RPC calls / errors by status code / throughput /
   p50 / p95 / p99 / max, overall, each process's resident memory (VmRSS sampled every
   second during the mix: peak and end; VmHWM) and CPU, and the git commit.

Latency is ``time.perf_counter`` around each awaited call; only calls completed within
the window count (those in flight at its end finish and are counted apart). Not a test,
and not part of ``make bench``'s targets.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from _common import machine
from _load_mix import (
    FILTERS,
    Calls,
    Corpus,
    Op,
    closed_loop,
    ingest_request,
    load_corpus,
    split_workers,
)
from _load_stack import (
    KEY_OWNER,
    LOAD_SCOPES,
    MemorySampler,
    Stack,
    Token,
    cpu_seconds,
    load_credentials,
    log,
    private_stack,
    running_stack,
)

from ledgerlens.inference.v1 import inference_pb2, inference_pb2_grpc
from ledgerlens.ingestion.v1 import ingestion_pb2_grpc
from ledgerlens.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from ledgerlens.runtime.devstack import TOKEN_PATH

REPO = Path(__file__).resolve().parent.parent
#: ``$LEDGERLENS_CORPUS_DIR`` (as the tests and the retrieval eval name it), else beside the repo
DEFAULT_CORPUS = Path(
    os.environ.get("LEDGERLENS_CORPUS_DIR") or REPO.parent / "shared" / "corpus" / "eips"
)
RPCS = {
    "search": "ledgerlens.retrieval.v1.RetrievalService/Search",
    "answer": "ledgerlens.inference.v1.InferenceService/Answer",
    "ingest": "ledgerlens.ingestion.v1.IngestionService/IngestDocument",
}
#: per-call deadlines: generous, so a slow call shows as latency, not as an error
TIMEOUTS = {"search": 30.0, "answer": 60.0, "ingest": 300.0}
SEED_CONCURRENCY = 4
SEARCHABLE_TIMEOUT = 300.0


class StackChoice(StrEnum):
    auto = "auto"  # the running one, else a private one
    running = "running"  # the running one, else an error
    private = "private"  # always a private one


class Split(StrEnum):
    workers = "workers"
    calls = "calls"


@dataclass(frozen=True)
class Settings:
    duration_s: float = 60.0
    ramp_s: float = 5.0
    split: str = "workers"
    concurrency: int = 16
    weights: dict[str, float] | None = None
    seed_docs: int = 40
    filtered_share: float = 0.3
    search_top_k: int = 10
    answer_top_k: int = 5
    random_seed: int = 9
    stack: str = "auto"
    data_dir: str = ".data"
    corpus: str = str(DEFAULT_CORPUS)


# -- machine and code --------------------------------------------------------------------


#: above this many cores taken by other processes during the window, a run is not quiet
QUIET_OTHER_CORES = 0.2


def _system_busy_seconds() -> float | None:
    """CPU time every process on the machine spent so far (``/proc/stat``: all but idle
    and iowait), to tell how much of a window went to work other than this run's."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(value) for value in fields]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None}
    dirty = git("diff", "--quiet", "HEAD", "--").returncode != 0
    return {"commit": head.stdout.strip(), "dirty": dirty}


# -- the run -----------------------------------------------------------------------------


class Clients:
    def __init__(self, stack: Stack, token: Token) -> None:
        self.token = token
        self._channels = [
            grpc.aio.insecure_channel(stack.grpc(name))
            for name in ("ingestion", "retrieval", "inference")
        ]
        self.ingestion = ingestion_pb2_grpc.IngestionServiceStub(self._channels[0])
        self.retrieval = retrieval_pb2_grpc.RetrievalServiceStub(self._channels[1])
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._channels[2])

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


async def _seed(clients: Clients, corpus: Corpus) -> dict[str, Any]:
    """Ingest the seed EIPs, then wait until each one's chunks are searchable."""
    started = time.perf_counter()
    slots = asyncio.Semaphore(SEED_CONCURRENCY)
    documents: dict[str, int] = {}  # document id -> chunks

    async def one(number: int, path: Path) -> None:
        async with slots:
            response = await clients.ingestion.IngestDocument(
                ingest_request(path, f"https://eips.ethereum.org/EIPS/eip-{number}"),
                metadata=await clients.token.metadata(),
                timeout=TIMEOUTS["ingest"],
            )
        documents[response.document_id] = response.chunk_count

    async with asyncio.TaskGroup() as group:
        for number, path in corpus.seed.items():
            group.create_task(one(number, path))
    ingested = time.perf_counter()
    waiting = {doc for doc, chunks in documents.items() if chunks > 0}
    deadline = time.monotonic() + SEARCHABLE_TIMEOUT
    while waiting:
        for doc in sorted(waiting):
            response = await clients.retrieval.Search(
                retrieval_pb2.SearchRequest(
                    query=corpus.queries[0].text,
                    filter=retrieval_pb2.SearchFilter(document_ids=[doc]),
                    top_k=1,
                ),
                metadata=await clients.token.metadata(),
                timeout=TIMEOUTS["search"],
            )
            if response.results:
                waiting.discard(doc)
        if waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} seed documents not searchable in time")
            await asyncio.sleep(0.5)
    return {
        "documents": len(documents),
        "chunks": sum(documents.values()),
        "ingest_seconds": round(ingested - started, 1),
        "until_searchable_seconds": round(time.perf_counter() - started, 1),
    }


async def _mix(
    clients: Clients, corpus: Corpus, settings: Settings, weights: dict[str, float]
) -> tuple[dict[str, Calls], dict[str, Any], float]:
    run_id = uuid.uuid4().hex[:12]
    queries = corpus.queries
    filters = list(FILTERS.values())
    outcome: dict[str, Any] = {
        "search_empty": 0,
        "answer_grounded": 0,
        "answer_ungrounded": 0,
        "ingested": 0,
    }
    next_doc = iter(range(10**9))

    async def search(rng: Any) -> object:
        request = retrieval_pb2.SearchRequest(
            query=rng.choice(queries).text, top_k=settings.search_top_k
        )
        if rng.random() < settings.filtered_share:
            request.filter.CopyFrom(rng.choice(filters))
        response = await clients.retrieval.Search(
            request, metadata=await clients.token.metadata(), timeout=TIMEOUTS["search"]
        )
        outcome["search_empty"] += not response.results
        return response

    async def answer(rng: Any) -> object:
        response = await clients.inference.Answer(
            inference_pb2.AnswerRequest(
                query=rng.choice(queries).text, top_k=settings.answer_top_k
            ),
            metadata=await clients.token.metadata(),
            timeout=TIMEOUTS["answer"],
        )
        outcome["answer_grounded" if response.grounded else "answer_ungrounded"] += 1
        return response

    async def ingest(rng: Any) -> object:
        n = next(next_doc)
        path = corpus.rest[n % len(corpus.rest)]
        url = f"https://eips.ethereum.org/EIPS/{path.stem}?load-run={run_id}&n={n}"
        response = await clients.ingestion.IngestDocument(
            ingest_request(path, url),
            metadata=await clients.token.metadata(),
            timeout=TIMEOUTS["ingest"],
        )
        outcome["ingested"] += 1
        return response

    ops: dict[str, Op] = {"search": search, "answer": answer, "ingest": ingest}
    results = {name: Calls() for name in ops}
    if settings.split == "workers":
        # each worker calls one RPC: workers split by weight
        counts = split_workers(settings.concurrency, weights)
        loops = [({name: ops[name]}, [1.0]) for name, n in counts.items() for _ in range(n)]
    else:
        # each worker picks every call by weight
        loops = [(ops, [weights[name] for name in ops])] * settings.concurrency
        counts = {}
    measure_from = time.perf_counter() + settings.ramp_s
    deadline = measure_from + settings.duration_s
    await asyncio.gather(
        *(
            closed_loop(
                worker,
                worker_ops,
                worker_weights,
                measure_from,
                deadline,
                results,
                settings.random_seed,
            )
            for worker, (worker_ops, worker_weights) in enumerate(loops)
        )
    )
    drained = time.perf_counter() - deadline
    return results, outcome | {"workers": counts}, drained


async def _against(stack: Stack, settings: Settings, weights: dict[str, float]) -> dict[str, Any]:
    corpus = load_corpus(Path(settings.corpus), settings.seed_docs, settings.random_seed)
    log(f"credentials: API key {KEY_OWNER}-service with {', '.join(LOAD_SCOPES)}")
    credentials = await load_credentials(stack)
    token = Token(stack.http("identity") + TOKEN_PATH, credentials)
    clients = Clients(stack, token)
    try:
        log(f"warm-up: ingesting {len(corpus.seed)} seed EIPs, waiting until searchable")
        warmup = await _seed(clients, corpus)
        ready = warmup["until_searchable_seconds"]
        log(f"warm-up done in {ready} s; mix for {settings.duration_s} s")
        load_mix_start = _load_average()
        sampler = MemorySampler(stack.pids)
        cpu_before = {name: cpu_seconds(pid) for name, pid in stack.pids.items()}
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        system_before = _system_busy_seconds()
        sampler.start()
        started = time.perf_counter()
        results, outcome, drained = await _mix(clients, corpus, settings, weights)
        window = settings.duration_s
        memory = await sampler.stop()
        cpu_after = {name: cpu_seconds(pid) for name, pid in stack.pids.items()}
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        system_after = _system_busy_seconds()
    finally:
        await clients.close()
    # the CPU a process spent from the window's start until every call had finished
    spent = time.perf_counter() - started
    cpu = {
        name: round(after - before, 2)
        for name in stack.pids
        if (before := cpu_before[name]) is not None and (after := cpu_after[name]) is not None
    }
    own_cpu = (own_after.ru_utime + own_after.ru_stime) - (
        own_before.ru_utime + own_before.ru_stime
    )
    cpu["load_generator"] = round(own_cpu, 2)
    per_rpc = {
        name: {"rpc": RPCS[name], **calls.summary(window)} for name, calls in results.items()
    }
    overall = Calls()
    for calls in results.values():
        overall.latencies += calls.latencies
        overall.codes += calls.codes
        overall.late += calls.late
        overall.ramp += calls.ramp
        overall.backoff_seconds += calls.backoff_seconds
    workers = outcome.pop("workers")
    measured = max(1, len(overall.latencies))
    call_share = {name: round(len(c.latencies) / measured, 3) for name, c in results.items()}
    return {
        "stack": {
            "kind": "private (started by this run)" if stack.private else "running (make up)",
            "data_dir": None if stack.private else str(stack.data_dir),
            "endpoints": {
                name: proc["endpoints"] for name, proc in sorted(stack.processes.items())
            },
        },
        "corpus": {
            "seed_eips": sorted(corpus.seed),
            "queries": len(corpus.queries),
            "mix_ingest_pool": len(corpus.rest),
        },
        "warmup": warmup,
        "workers_per_rpc": workers or None,
        "call_share": call_share,
        "ramp_seconds": settings.ramp_s,
        "window_seconds": window,
        "drain_seconds": round(drained, 2),
        "load_average_mix_start": load_mix_start,
        "rpcs": per_rpc,
        "overall": overall.summary(window),
        "outcomes": outcome,
        "memory_mib": memory,
        "memory_samples": sampler.samples,
        "cpu_seconds": {
            "interval_seconds": round(spent, 2),
            "by_process": cpu,
            "cores_busy": round(sum(cpu.values()) / spent, 2),
            # what the rest of the machine took meanwhile (0 on a quiet machine)
            "other_processes_cores": (
                round(max(0.0, system_after - system_before - sum(cpu.values())) / spent, 2)
                if system_before is not None and system_after is not None
                else None
            ),
        },
    }


async def run_load(settings: Settings) -> dict[str, Any]:
    weights = settings.weights or {"search": 70.0, "answer": 20.0, "ingest": 10.0}
    result: dict[str, Any] = {
        "benchmark": "make load: closed-loop mix of ingest, search and answer",
        "machine": machine(),
        "load_average_before": _load_average(),
        "settings": asdict(settings) | {"weights": weights},
        "git": git_commit(),
    }
    started = time.perf_counter()
    data_dir = Path(settings.data_dir)  # absolute already (main, the CLI)
    stack = None if settings.stack == "private" else running_stack(data_dir)
    if stack is not None:
        log(f"using the running dev stack in {data_dir}")
        result |= await _against(stack, settings, weights)
    elif settings.stack == "running":
        raise RuntimeError(f"no dev stack runs in {data_dir} (`make up` first)")
    else:
        log(
            f"no dev stack runs in {data_dir}: starting a private one (temp data dir, free "
            "ports) for this run"
        )
        async with private_stack() as private:
            log("private dev stack ready")
            result |= await _against(private, settings, weights)
    result["load_average_after"] = _load_average()
    result["seconds"] = round(time.perf_counter() - started, 1)
    # The load average counts this run's own stack and warm-up, so it cannot tell a quiet
    # machine; the CPU other processes took during the window can.
    other = result["cpu_seconds"]["other_processes_cores"]
    if other is not None and other > QUIET_OTHER_CORES:
        result["machine_busy_note"] = (
            f"other processes took {other} cores during the window (more than "
            f"{QUIET_OTHER_CORES}): these figures are on the low side; re-run on a quiet "
            "machine"
        )
    return result


def main(**overrides: Any) -> dict[str, Any]:
    """``run.py``'s entry point: one run with the defaults (or ``overrides``)."""
    settings = Settings(**overrides)
    settings = replace(settings, data_dir=str(Path(settings.data_dir).resolve()))
    return asyncio.run(run_load(settings))


# -- CLI ---------------------------------------------------------------------------------

cli = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@cli.command()
def load(
    duration: Annotated[float, typer.Option(min=1, help="measured seconds of mix")] = 60.0,
    ramp: Annotated[
        float, typer.Option(min=0, help="seconds of mix before the measured window")
    ] = 5.0,
    split: Annotated[
        Split,
        typer.Option(
            help="workers: the weights split the workers, each calling one RPC; "
            "calls: every worker picks each call by weight"
        ),
    ] = Split.workers,
    concurrency: Annotated[int, typer.Option(min=1, help="closed-loop workers")] = 16,
    search: Annotated[float, typer.Option(min=0, help="weight of Search")] = 70.0,
    answer: Annotated[float, typer.Option(min=0, help="weight of Answer")] = 20.0,
    ingest: Annotated[float, typer.Option(min=0, help="weight of IngestDocument")] = 10.0,
    seed_docs: Annotated[int, typer.Option(min=1, help="EIPs ingested before the mix")] = 40,
    filtered: Annotated[
        float, typer.Option(min=0, max=1, help="share of searches with a metadata filter")
    ] = 0.3,
    stack: Annotated[
        StackChoice,
        typer.Option(help="auto: the running stack, else a private one; running: it or fail"),
    ] = StackChoice.auto,
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir", envvar="LEDGERLENS_DEVSTACK_DATA_DIR", help="the running stack's data"
        ),
    ] = Path(".data"),
    corpus: Annotated[Path, typer.Option(help="the EIP corpus")] = DEFAULT_CORPUS,
    seed: Annotated[int, typer.Option(help="random seed (choices, shuffle)")] = 9,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
) -> None:
    """Run the mix; print one JSON document."""
    if search + answer + ingest <= 0:
        raise typer.BadParameter("at least one weight must be positive", param_hint="--search")
    settings = Settings(
        duration_s=duration,
        ramp_s=ramp,
        split=split.value,
        concurrency=concurrency,
        weights={"search": search, "answer": answer, "ingest": ingest},
        seed_docs=seed_docs,
        filtered_share=filtered,
        random_seed=seed,
        stack=stack.value,
        data_dir=str(data_dir.resolve()),
        corpus=str(corpus),
    )
    try:
        result = asyncio.run(run_load(settings))
    except RuntimeError as exc:
        log(f"error: {exc}")
        raise typer.Exit(1) from None
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    cli()
