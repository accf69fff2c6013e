"""The inference gateway's own overhead: ``InferenceService.Chat`` vs the provider direct.

Processes besides this one (the load generator), none pinned (2 cores, shared):

- *two providers*: the OpenAI-compatible stand-in the inference tests use
  (``services/inference/tests/_openai_standin.py``: FastAPI + uvicorn on a real
  socket), each started by this file with ``--serve-standin`` in a process of its own:
  *remote* answers every chat call after ``--provider-latency-ms`` (default 250 ms),
  *instant* answers at once. Both give the same short completion and its usage.
- *the gateway*: ``python -m ledgerlens.services.inference`` with a private
  nats-server, SQLite in a temp dir, auth off, the two stand-ins as two
  OpenAI-compatible providers (aliases ``remote`` and ``instant``, ``max_concurrency``
  256 so their semaphores never queue a call), moderation on (the bundled local
  rules), limits 0 (unlimited). The calls carry no idempotency key and no temperature,
  so neither the idempotency store nor the response cache (temperature 0 only) serves
  them: every call is screened, admitted, routed to a stand-in, accounted (a usage row
  and the ``inference.completion.recorded`` outbox row committed in one SQLite
  transaction before the reply, then relayed to NATS) and reconciled with the limits.
- *nats-server*, which receives the gateway's completion events.

The same chat request (one user message of about 30 words) is sent

(a) *direct*: to the stand-in through the gateway's own provider class
    (``OpenAICompatProvider.chat``, built from the same provider configuration), in
    this process, so the hop the gateway makes is the hop measured here;
(b) *gateway*: ``InferenceService.Chat`` over one gRPC channel.

Closed loops of ``concurrency`` workers (asyncio) with a fixed number of calls a
round; after a warm-up pass on both, rounds alternate ABAB/BABA so that drift hits
both alike. ``added_p95_ms`` (what the target is judged on, as in
``runtime_overhead.py``) is the median over rounds of the per-round p95 difference
(gateway - direct); ``added_p95_ms_pooled`` compares the pooled latencies. Each side
also reports the CPU one call cost each process (``/proc``): the gateway, the
stand-in, nats-server and this load generator.

**The target (added p95 <= 5 ms at 200 concurrent) is judged on the remote
provider.** A real provider is never instant: a remote LLM API takes hundreds of
milliseconds to seconds per completion, and the question is what the gateway adds
on top of that. 250 ms is the low end for a short chat completion from a hosted API,
so it asks the most throughput of the gateway (200 concurrent / 0.25 s = 800
calls/s) of any realistic latency. With the *instant* stand-in, 200 concurrent
closed loops saturate the two shared cores on both sides and the added latency is
the gateway's extra CPU per call multiplied by the queue: that run is reported as a
CPU-contention stress figure, beside the target's. Concurrencies 1 and 8 are measured
on both providers for context.

Run alone: ``python bench/inference_gateway.py`` (``--quick`` for a short run);
``make bench`` runs it through ``bench/run.py``. Prints / returns JSON and writes
``bench/results/inference_gateway.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import grpc_address, machine, quantile, rpc_summary, start_service
from _cpu import CpuMeter

from ledgerlens.services.inference.model import ProviderError

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "inference_gateway.json"
STANDIN_DIR = REPO / "services" / "inference" / "tests"

TARGETS = {"added_p95_ms_max": 5.0}
CONCURRENCY = 200
LOW_CONCURRENCIES = (1, 8)
#: the remote provider's answer time; the target is judged with it (module docstring)
PROVIDER_LATENCY_MS = 250.0
MODEL = "bench-model"
ANSWER = "EIP-1559 burns the base fee and pays the priority fee to the block proposer."
PROMPT = (
    "In two sentences, how does the fee market of EIP-1559 change what a user pays "
    "for a transaction, and where does the base fee go once the block is included? "
    "Request {i}."
)

_LOAD: list[tuple[str, float]] = []


def _log(message: str) -> None:
    print(f"[inference_gateway] {message}", file=sys.stderr, flush=True)


def _sample_load(phase: str) -> None:
    _LOAD.append((phase, round(os.getloadavg()[0], 2)))


# -- the stand-in provider (subprocess) --------------------------------------------------


def _serve_standin(latency_ms: float) -> None:
    sys.path.insert(0, str(STANDIN_DIR))
    from _openai_standin import OpenAIStandIn  # type: ignore[import-not-found]

    standin = OpenAIStandIn(default_text=ANSWER)
    if latency_ms > 0:
        inner = standin.app
        delay = latency_ms / 1000

        async def remote(scope: Any, receive: Any, send: Any) -> None:
            # a remote API's answer time: one timer a request (the stand-in's scripted
            # ``Script.slow`` wakes every 20 ms, which costs CPU at hundreds of calls/s)
            if scope["type"] == "http":
                await asyncio.sleep(delay)
            await inner(scope, receive, send)

        standin.app = remote
    standin.start()
    # The stand-in's listening socket lacks TCP_NODELAY: uvicorn writes a response's
    # head and body separately, so on a reused connection Nagle holds the body until
    # the client's delayed ACK (~40 ms a call). Accepted sockets inherit the option.
    listening = standin._socket
    assert listening is not None
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print(f"URL {standin.base_url}", flush=True)
    # The stand-in records every request for the tests; a long run would keep them all.
    while True:
        time.sleep(2)
        standin.reset()


# -- processes -------------------------------------------------------------------------


def _fdatasync_ms(directory: Path, syncs: int = 40) -> dict[str, float]:
    """What one durable commit's sync costs on this disk now: the gateway commits each
    batch of accounting rows with an fsync before replying, so the disk's sync time,
    which other work on the machine changes, is part of the added latency."""
    times = []
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        for _ in range(syncs):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(name)
    times.sort()
    return {
        "p50_ms": round(quantile(times, 0.50) * 1000, 3),
        "p95_ms": round(quantile(times, 0.95) * 1000, 3),
    }


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def _start_standin(latency_ms: float) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve-standin",
        "--provider-latency-ms",
        str(latency_ms),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    if not line.startswith("URL "):
        proc.terminate()
        await proc.wait()
        raise RuntimeError(f"the stand-in did not start: {line!r}")
    return proc, line.split()[1]


def _provider(name: str, base_url: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "openai",
        "base_url": base_url,
        "api_key": "bench",
        "models": [MODEL],
        "prices": {MODEL: {"input_per_1k": 150, "output_per_1k": 600}},
        "timeout_seconds": 30,
        "max_concurrency": 256,
    }


def _providers_file(workdir: Path, urls: dict[str, str]) -> Path:
    config = {
        "providers": [_provider(name, url) for name, url in urls.items()],
        "router": {
            "aliases": {name: [f"{name}/{MODEL}"] for name in urls},
            "default_chat_alias": "remote",
            "default_embed_alias": "remote",
        },
    }
    path = workdir / "providers.json"
    path.write_text(json.dumps(config))
    return path


async def _start_gateway(
    workdir: Path, urls: dict[str, str], nats_url: str
) -> tuple[asyncio.subprocess.Process, str]:
    env = {
        **os.environ,
        "LEDGERLENS_INFERENCE_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'inference.db'}",
        "LEDGERLENS_INFERENCE_DATA_DIR": str(workdir / "data"),
        "LEDGERLENS_INFERENCE_NATS_URL": nats_url,
        "LEDGERLENS_INFERENCE_HOST": "127.0.0.1",
        "LEDGERLENS_INFERENCE_GRPC_PORT": "0",
        "LEDGERLENS_INFERENCE_HTTP_PORT": "0",
        "LEDGERLENS_INFERENCE_AUTH__ENABLED": "false",
        "LEDGERLENS_INFERENCE_PROVIDERS_FILE": str(_providers_file(workdir, urls)),
        # not used by Chat; set so no dev-stack address leaks in
        "LEDGERLENS_INFERENCE_RAG__RETRIEVAL_TARGET": "127.0.0.1:9",
    }
    for name in (
        "KEY_REQUESTS_PER_MINUTE",
        "KEY_TOKENS_PER_MINUTE",
        "KEY_TOKENS_PER_DAY",
        "TENANT_REQUESTS_PER_MINUTE",
        "TENANT_TOKENS_PER_MINUTE",
        "TENANT_TOKENS_PER_DAY",
    ):
        env[f"LEDGERLENS_INFERENCE_LIMITS__{name}"] = "0"  # 0: unlimited
    for name in list(env):  # a Redis URL from the caller's shell would change the backends
        if name.startswith("LEDGERLENS_INFERENCE_") and "REDIS_URL" in name:
            del env[name]
    proc, line = await start_service(
        "ledgerlens.services.inference", env, workdir / "inference.log", within=120
    )
    return proc, grpc_address(line)


# -- load generation ---------------------------------------------------------------------

Call = Callable[[int], Awaitable[None]]


async def _loop(call: Call, calls: int, concurrency: int, start: int) -> tuple[list[float], float]:
    """A closed loop: ``concurrency`` workers, ``calls`` calls in all."""
    latencies: list[float] = []
    counter = iter(range(start, start + calls))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


class _Sides:
    """The two ways of making the same chat call, to one provider (``name``)."""

    def __init__(self, name: str, base_url: str, channel: Any) -> None:
        from ledgerlens.inference.v1 import inference_pb2, inference_pb2_grpc
        from ledgerlens.services.inference.model import ChatParams, Deadline, Message
        from ledgerlens.services.inference.providers import ProviderConfig
        from ledgerlens.services.inference.providers.openai_compat import OpenAICompatProvider

        self._pb = inference_pb2
        self._name = name
        self._params, self._message, self._deadline = ChatParams, Message, Deadline
        # the gateway's provider, built from the same configuration
        self.provider = OpenAICompatProvider(
            ProviderConfig.model_validate(_provider(name, base_url))
        )
        self.stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self.retries = 0

    async def direct(self, i: int) -> None:
        params = self._params(MODEL, (self._message("user", PROMPT.format(i=i)),))
        try:
            completion = await self.provider.chat(params, self._deadline.after(120))
        except ProviderError as exc:
            # a kept-alive connection the stand-in closed (uvicorn: idle 5 s) as it was
            # reused; the gateway's router retries this too, so the direct side does
            if not exc.retryable:
                raise
            self.retries += 1
            completion = await self.provider.chat(params, self._deadline.after(120))
        if completion.text != ANSWER or completion.usage is None:
            raise RuntimeError(f"unexpected provider answer: {completion!r}")

    async def gateway(self, i: int) -> None:
        pb = self._pb
        request = pb.ChatRequest(
            model=self._name,
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content=PROMPT.format(i=i))],
        )
        response = await self.stub.Chat(request, timeout=120)
        if response.message.content != ANSWER or response.cached:
            raise RuntimeError(f"unexpected gateway answer: {response!r}")

    async def close(self) -> None:
        await self.provider.aclose()


async def _compare(
    sides: _Sides,
    pids: dict[str, int],
    concurrency: int,
    calls: int,
    rounds: int,
    warmup: int,
    next_index: list[int],
) -> dict[str, Any]:
    """``rounds`` interleaved rounds of ``calls`` calls a side at ``concurrency``."""
    calls_of: dict[str, Call] = {"direct": sides.direct, "gateway": sides.gateway}

    def index(n: int) -> int:
        start = next_index[0]
        next_index[0] += n
        return start

    for kind in ("direct", "gateway"):  # connections, lazy imports, first allocations
        await _loop(calls_of[kind], warmup, concurrency, index(warmup))
    latencies: dict[str, list[float]] = {"direct": [], "gateway": []}
    seconds = {"direct": 0.0, "gateway": 0.0}
    meters = {kind: CpuMeter(pids) for kind in latencies}
    load_before = round(os.getloadavg()[0], 2)
    per_round: list[dict[str, Any]] = []
    gc.collect()
    gc.disable()  # the load generator's collections would land on whichever side runs
    try:
        for r in range(rounds):
            order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
            this: dict[str, Any] = {"order": "".join(k[0] for k in order)}
            for kind in order:
                meters[kind].start()
                values, took = await _loop(calls_of[kind], calls, concurrency, index(calls))
                meters[kind].stop()
                latencies[kind].extend(values)
                seconds[kind] += took
                ordered = sorted(values)
                this[kind] = {
                    "p50_ms": round(quantile(ordered, 0.50) * 1000, 3),
                    "p95_ms": round(quantile(ordered, 0.95) * 1000, 3),
                    "throughput_rps": round(len(values) / took, 1),
                }
            this["added_p50_ms"] = round(this["gateway"]["p50_ms"] - this["direct"]["p50_ms"], 3)
            this["added_p95_ms"] = round(this["gateway"]["p95_ms"] - this["direct"]["p95_ms"], 3)
            per_round.append(this)
    finally:
        gc.enable()
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "rounds": rounds,
        "warmup": warmup,
        "load_average_1m": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
    }
    for kind in ("direct", "gateway"):
        summary: dict[str, Any] = rpc_summary(latencies[kind], seconds[kind])
        # CPU a call per process, the floor all of it puts on the mean over the machine's
        # cores, and the floor of the gateway's one event loop by itself (bench/_cpu.py)
        summary.update(
            meters[kind].summary(
                len(latencies[kind]),
                concurrency,
                single_loop="gateway" if kind == "gateway" else None,
            )
        )
        result[kind] = summary
    direct, gateway = result["direct"], result["gateway"]
    result["added_p50_ms"] = round(gateway["p50_ms"] - direct["p50_ms"], 3)
    result["added_p95_ms"] = round(
        statistics.median(r["added_p95_ms"] for r in per_round), 3
    )  # paired: the median over rounds
    result["added_p95_ms_pooled"] = round(gateway["p95_ms"] - direct["p95_ms"], 3)
    result["added_p99_ms"] = round(gateway["p99_ms"] - direct["p99_ms"], 3)
    result["added_mean_ms"] = round(gateway["mean_ms"] - direct["mean_ms"], 3)
    result["throughput_ratio"] = round(gateway["throughput_rps"] / direct["throughput_rps"], 3)
    result["gateway_extra_cpu_ms_per_call"] = round(
        gateway["cpu_ms_per_call_all_processes"] - direct["cpu_ms_per_call_all_processes"], 3
    )
    result["per_round"] = per_round
    return result


#: calls a side a round, and rounds, per (provider, concurrency); the remote provider's
#: slow answers need fewer calls at low concurrency for a run of a few minutes
_PLAN = {
    ("remote", 200): (1_500, 4),
    ("remote", 8): (200, 4),
    ("remote", 1): (40, 4),
    ("instant", 200): (2_000, 6),
    ("instant", 8): (500, 6),
    ("instant", 1): (500, 6),
}


async def _measure(
    plan: dict[tuple[str, int], tuple[int, int]], warmup: int, latency_ms: float
) -> dict[str, Any]:
    import grpc.aio

    from ledgerlens.runtime.testing import PrivateNatsServer

    with tempfile.TemporaryDirectory(prefix="ledgerlens-bench-inference-") as tmp:
        work = Path(tmp)
        nats = PrivateNatsServer(store_dir=work / "nats").start()
        procs: list[asyncio.subprocess.Process] = []
        sides: dict[str, _Sides] = {}
        channel = None
        try:
            urls: dict[str, str] = {}
            standin_pids: dict[str, int] = {}
            for name, latency in (("remote", latency_ms), ("instant", 0.0)):
                proc, urls[name] = await _start_standin(latency)
                procs.append(proc)
                standin_pids[name] = proc.pid
            started = time.perf_counter()
            gateway, address = await _start_gateway(work, urls, nats.url)
            procs.append(gateway)
            startup = time.perf_counter() - started
            _log(f"stand-ins at {urls}, gateway at {address} (up in {startup:.1f}s)")
            channel = grpc.aio.insecure_channel(address)
            next_index = [0]
            result: dict[str, Any] = {"gateway_startup_seconds": round(startup, 1)}
            for (name, concurrency), (calls, rounds) in plan.items():
                if name not in sides:
                    sides[name] = _Sides(name, urls[name], channel)
                    result[name] = {}
                pids = {"gateway": gateway.pid, "standin": standin_pids[name]}
                nats_process = getattr(nats, "_process", None)
                if nats_process is not None:
                    pids["nats_server"] = nats_process.pid
                _sample_load(f"{name}_c{concurrency}")
                fsync = _fdatasync_ms(work)
                run = await _compare(
                    sides[name],
                    pids,
                    concurrency,
                    calls,
                    rounds,
                    min(warmup, calls, 10 * concurrency),
                    next_index,
                )
                _log(
                    f"{name} c{concurrency}: added p50 {run['added_p50_ms']} ms, p95 "
                    f"{run['added_p95_ms']} ms (pooled {run['added_p95_ms_pooled']}); gateway "
                    f"CPU {run['gateway']['cpu_ms_per_call']['gateway']} ms a call"
                )
                run["disk_fdatasync_ms_before"] = fsync
                result[name][f"c{concurrency}"] = run
            result["direct_retries"] = {name: side.retries for name, side in sides.items()}
            result["gateway_rss_mb"] = _rss_mb(gateway.pid)
            return result
        finally:
            for side in sides.values():
                await side.close()
            if channel is not None:
                await channel.close(None)
            for proc in procs:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 15)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
            nats.stop()


def _note(result: dict[str, Any]) -> str:
    remote = result["remote"][f"c{CONCURRENCY}"]
    instant = result["instant"][f"c{CONCURRENCY}"]
    low = result["instant"]["c1"]
    met = result["met"]["added_p95_ms_max"]
    gw, direct = remote["gateway"], remote["direct"]
    return (
        f"Judged on the remote provider ({result['provider_latency_ms']} ms a completion) at "
        f"concurrency {CONCURRENCY}: the gateway adds {remote['added_p50_ms']} ms p50 / "
        f"{remote['added_p95_ms']} ms p95, so the target of at most "
        f"{TARGETS['added_p95_ms_max']} ms added p95 is {'met' if met else 'NOT met'}. "
        f"Direct runs {direct['throughput_rps']} calls/s, the gateway "
        f"{gw['throughput_rps']} calls/s; the gateway process spends "
        f"{gw['cpu_ms_per_call']['gateway']} ms of CPU a call, so its one event loop "
        f"serves at most {gw['gateway_loop_bound_max_rps']} calls/s and {CONCURRENCY} "
        f"callers wait at least {gw['gateway_loop_bound_mean_ms']} ms on average (all "
        f"processes: {gw['cpu_ms_per_call_all_processes']} ms a call on {gw['cpus']} "
        f"shared cores, at most {gw['cpu_bound_max_rps']} calls/s): it cannot serve the "
        f"{CONCURRENCY} / latency calls a second the closed loop asks for, and the "
        "missing throughput becomes queueing in the added latency. With the instant "
        f"stand-in (a CPU-contention stress figure) it adds {instant['added_p95_ms']} ms "
        f"p95 at {CONCURRENCY}; one call at a time it adds {low['added_p50_ms']} ms p50 / "
        f"{low['added_p95_ms']} ms p95."
    )


def main(
    plan: dict[tuple[str, int], tuple[int, int]] | None = None,
    warmup: int = 400,
    write: bool = True,
    latency_ms: float = PROVIDER_LATENCY_MS,
) -> dict[str, Any]:
    plan = dict(_PLAN if plan is None else plan)
    _LOAD.clear()
    _sample_load("start")
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine(),
        "rpc": "ledgerlens.inference.v1.InferenceService/Chat (unary), auth off",
        "direct": (
            "POST /v1/chat/completions to the same stand-in through the gateway's own "
            "provider class (OpenAICompatProvider.chat: httpx, the same configuration), in "
            "the load generator"
        ),
        "provider_latency_ms": latency_ms,
        "why_this_latency": (
            "the target is judged with the remote stand-in: a remote LLM API is never "
            "instant (hundreds of ms to seconds a completion) and the question is what the "
            "gateway adds on top of it; 250 ms (the default) is the low end for a short "
            f"hosted chat completion, so it asks the most throughput of the gateway "
            f"({CONCURRENCY} / latency = {CONCURRENCY / max(latency_ms, 1e-3) * 1000:.0f} "
            "calls/s here). The instant stand-in makes 200 closed loops a CPU-contention "
            "test of the 2 shared cores, reported beside it, not judged."
        ),
        "gateway_config": {
            "providers": (
                "two openai-compatible providers (the remote and the instant stand-in), "
                "aliases remote and instant, max_concurrency 256"
            ),
            "moderation": "local rules (bundled data/moderation_rules.json)",
            "limits": "0 (unlimited), in-process",
            "idempotency_key": "none",
            "temperature": "unset (the response cache serves temperature 0 only)",
            "accounting": (
                "SQLite usage row + outbox row committed (WAL, synchronous=FULL: fsync) in "
                "one transaction before the reply, group commit across concurrent calls, "
                "each transaction one hop to a writer thread; relayed to nats-server by the "
                "outbox relay (its own connection, synchronous=NORMAL), woken 50 ms after "
                "a commit"
            ),
            "auth": "off",
        },
        "stand_in": (
            "services/inference/tests/_openai_standin.py, one process per provider (FastAPI "
            "+ uvicorn h11); remote: answers after provider_latency_ms; instant: at once"
        ),
        "processes": "load generator, gateway, two stand-ins, nats-server; not pinned",
        "method": (
            "closed loops; a warm-up pass on each side, then rounds alternating "
            "direct/gateway (ABAB, BABA); added_p95_ms is the median over rounds of the "
            "per-round p95 difference (gateway - direct), added_p95_ms_pooled the "
            "difference of the pooled p95s"
        ),
        "plan_calls_rounds": {f"{n}_c{c}": list(v) for (n, c), v in plan.items()},
        "prompt_words": len(PROMPT.split()),
        "answer_words": len(ANSWER.split()),
    }
    result.update(asyncio.run(_measure(plan, warmup, latency_ms)))
    _sample_load("end")
    result["targets"] = {
        **TARGETS,
        "judged_at": f"remote provider ({latency_ms} ms), concurrency {CONCURRENCY}",
    }
    judged = result["remote"][f"c{CONCURRENCY}"]["added_p95_ms"]
    result["met"] = {"added_p95_ms_max": judged <= TARGETS["added_p95_ms_max"]}
    result["for_context_not_judged"] = {
        f"{name}_c{c}": result[name][f"c{c}"]["added_p95_ms"] <= TARGETS["added_p95_ms_max"]
        for name in ("remote", "instant")
        for c in (CONCURRENCY, *LOW_CONCURRENCIES)
        if (name, c) != ("remote", CONCURRENCY) and f"c{c}" in result[name]
    }
    result["note"] = _note(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1m"] = dict(_LOAD)
    busiest = max(load for _, load in _LOAD)
    if busiest > 4.0:
        result["machine_busy_note"] = (
            f"the 1-minute load average reached {busiest} on {os.cpu_count()} CPUs (this "
            "benchmark alone keeps both busy at concurrency 200): other work shared the "
            "machine"
        )
    if write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-standin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--provider-latency-ms",
        type=float,
        default=PROVIDER_LATENCY_MS,
        help="the remote stand-in's answer time (the target is judged with it)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run, not written")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = parser.parse_args()
    if args.serve_standin:
        _serve_standin(args.provider_latency_ms)
    elif args.quick:
        quick = {key: (max(10, calls // 5), 2) for key, (calls, _) in _PLAN.items()}
        print(json.dumps(main(quick, 100, False, args.provider_latency_ms), indent=2))
    else:
        print(
            json.dumps(
                main(None, 400, not args.no_write, args.provider_latency_ms),
                indent=2,
            )
        )
