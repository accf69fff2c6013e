"""The runtime's per-call overhead: full interceptor chain vs a bare grpc.aio server.

Two server subprocesses serve the same identity contract (``Introspect``, a tiny unary
RPC) on loopback: *full* is built with ``build_server`` as a service would be (auth
with a real ES256 token against static JWKS keys, RED metrics, tracing at its
production default (no exporter, so no spans), JSON logging, health, reflection); *bare* is a
plain ``grpc.aio.server`` with the servicer and nothing else. This process is the
load generator: concurrency 32, fixed call counts, alternating rounds between the two
so that drift (CPU frequency, other load) hits both alike. Servers share one CPU, the
load generator has the other.

``added_p95_ms`` (what the target is judged on) is the median over rounds of the
per-round p95 difference; ``added_p95_ms_pooled`` compares the pooled latencies. An A/A
run (two bare servers, same method) is reported as ``calibration_a_a``: it shows what
the machine's noise alone reads as overhead.

Run alone: ``python bench/runtime_overhead.py [--calls 100000 --rounds 100]``;
``make bench`` runs it through ``bench/run.py``. Prints / returns JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import grpc
import grpc.aio
from _common import pin, quantile, rpc_summary

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc

CONCURRENCY = 32
TARGETS = {"throughput_ratio_min": 0.75, "added_p95_ms_max": 1.0}
SCOPE = "tokens:introspect"


# -- server side (subprocess) ------------------------------------------------------------


class _Identity(identity_pb2_grpc.IdentityServiceServicer):
    async def Introspect(
        self, request: identity_pb2.IntrospectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> identity_pb2.IntrospectResponse:
        return identity_pb2.IntrospectResponse(active=True, subject="bench")


async def _serve(kind: str) -> None:
    pin(1)
    descriptor = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]
    add = identity_pb2_grpc.add_IdentityServiceServicer_to_server
    servicer = _Identity()  # type: ignore[abstract]
    if kind == "bare":
        server = grpc.aio.server()
        add(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"PORT {port}", flush=True)
        await server.wait_for_termination()
        return

    from ledgerlens.runtime.auth import TokenVerifier
    from ledgerlens.runtime.server import build_server
    from ledgerlens.runtime.settings import ServiceSettings
    from ledgerlens.runtime.telemetry import configure_logging, configure_tracing

    settings = ServiceSettings(service_name="bench", grpc_port=0, shutdown_grace_seconds=1)
    configure_logging(settings)
    configure_tracing(settings)
    runtime = build_server(
        settings, [(add, servicer, descriptor)], TokenVerifier.from_settings(settings.auth)
    )
    await runtime.start()
    runtime.install_signal_handlers()
    print(f"PORT {runtime.bound_port}", flush=True)
    await runtime.wait_for_termination()


# -- load generator ------------------------------------------------------------------------


async def _round(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub,
    calls: int,
    metadata: tuple[tuple[str, str], ...],
    latencies: list[float],
) -> float:
    remaining = calls
    request = identity_pb2.IntrospectRequest()

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            await stub.Introspect(request, metadata=metadata, timeout=10)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started


async def _start(kind: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        kind,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if not line.startswith("PORT "):
        raise RuntimeError(f"{kind} server did not start: {line!r}")
    return proc, int(line.split()[1])


def _verify_cost(rounds: int = 2000) -> dict[str, float]:
    """Token verification cost alone: remembered token vs a full signature check."""
    from ledgerlens.runtime.auth import DevTokenIssuer, TokenVerifier

    issuer = DevTokenIssuer()
    verifier = TokenVerifier(issuer=issuer.issuer, audience="ledgerlens", static_jwks=issuer.jwks())
    tokens = [issuer.issue(f"u{i}", [SCOPE]) for i in range(rounds)]

    async def measure() -> tuple[list[float], list[float]]:
        fresh, warm = [], []
        for token in tokens:
            t0 = time.perf_counter()
            await verifier.verify(token)
            fresh.append(time.perf_counter() - t0)
        for _ in range(rounds):
            t0 = time.perf_counter()
            await verifier.verify(tokens[0])
            warm.append(time.perf_counter() - t0)
        return sorted(fresh), sorted(warm)

    fresh, warm = asyncio.run(measure())
    return {
        "signature_check_p50_us": round(quantile(fresh, 0.5) * 1e6, 1),
        "signature_check_p95_us": round(quantile(fresh, 0.95) * 1e6, 1),
        "remembered_token_p50_us": round(quantile(warm, 0.5) * 1e6, 2),
        "remembered_token_p95_us": round(quantile(warm, 0.95) * 1e6, 2),
    }


async def _measure(calls: int, rounds: int, warmup: int, candidate: str = "full") -> dict[str, Any]:
    """``bare`` against ``candidate`` (the runtime, or a second bare server: A/A)."""
    from ledgerlens.runtime.auth import DevTokenIssuer

    pin(0)
    issuer = DevTokenIssuer()
    env = {
        **os.environ,
        "LEDGERLENS_SERVICE_AUTH__STATIC_JWKS": json.dumps(issuer.jwks()),
        "LEDGERLENS_SERVICE_LOG_LEVEL": "INFO",
    }
    token = issuer.issue("bench", [SCOPE], tenant="bench", ttl=3600)
    # Both sides get the same requests, token included: the bare server ignores it, so
    # the difference is what the runtime does with a call, not the bytes on the wire.
    same = (("authorization", f"Bearer {token}"),)
    metadata = {"full": same, "bare": same}
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        ports = {}
        for kind in ("bare", "full"):
            procs[kind], ports[kind] = await _start(candidate if kind == "full" else kind, env)
        channels = {k: grpc.aio.insecure_channel(f"127.0.0.1:{p}") for k, p in ports.items()}
        stubs = {k: identity_pb2_grpc.IdentityServiceStub(c) for k, c in channels.items()}
        latencies: dict[str, list[float]] = {"bare": [], "full": []}
        seconds = {"bare": 0.0, "full": 0.0}
        paired_p95_diffs: list[float] = []
        for kind in ("bare", "full"):  # warm-up: connections, caches, JIT-free but lazy init
            await _round(stubs[kind], warmup, metadata[kind], [])
        per_round = calls // rounds
        # The load generator's own garbage collections would land on whichever side
        # happens to be running; pausing them here keeps the comparison about servers.
        gc.collect()
        gc.disable()
        for i in range(rounds):
            order = ("bare", "full") if i % 2 == 0 else ("full", "bare")
            round_p95 = {}
            for kind in order:
                this_round: list[float] = []
                seconds[kind] += await _round(stubs[kind], per_round, metadata[kind], this_round)
                latencies[kind].extend(this_round)
                round_p95[kind] = quantile(sorted(this_round), 0.95)
            paired_p95_diffs.append(round_p95["full"] - round_p95["bare"])
        gc.enable()
        for channel in channels.values():
            await channel.close()
    finally:
        gc.enable()
        for proc in procs.values():
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
    bare = rpc_summary(latencies["bare"], seconds["bare"])
    full = rpc_summary(latencies["full"], seconds["full"])
    ratio = full["throughput_rps"] / bare["throughput_rps"]
    # This machine's noise (shared cores) moves a pooled p95 by more than a millisecond
    # between two identical servers, so the target is judged on the paired estimate:
    # each round measures both sides back to back, and the median of the per-round p95
    # differences cancels drift that hits a whole round. The pooled difference is
    # reported beside it.
    added_p95 = statistics.median(paired_p95_diffs) * 1000
    return {
        "rpc": "ledgerlens.identity.v1.IdentityService/Introspect (unary)",
        "concurrency": CONCURRENCY,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "pinning": "servers on cpu 1, load generator on cpu 0",
        "bare": bare,
        "full": full,
        "throughput_ratio": round(ratio, 3),
        "added_p50_ms": round(full["p50_ms"] - bare["p50_ms"], 3),
        "added_p95_ms": round(added_p95, 3),
        "added_p95_ms_pooled": round(full["p95_ms"] - bare["p95_ms"], 3),
        "added_p99_ms": round(full["p99_ms"] - bare["p99_ms"], 3),
        "targets": TARGETS,
        "met": {
            "throughput_ratio_min": ratio >= TARGETS["throughput_ratio_min"],
            "added_p95_ms_max": added_p95 <= TARGETS["added_p95_ms_max"],
        },
    }


def main(calls: int = 100_000, rounds: int = 100, warmup: int = 2_000) -> dict[str, Any]:
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        result = asyncio.run(_measure(calls, rounds, warmup))
        # A/A: the same method with two identical bare servers shows what noise alone
        # reads as "overhead" on this machine (ideally 0 and 1.0).
        calibration = asyncio.run(_measure(calls, rounds, warmup, candidate="bare"))
    finally:
        if affinity is not None:  # later benchmarks in this process get every CPU back
            os.sched_setaffinity(0, affinity)
    result["calibration_a_a"] = {
        key: calibration[key]
        for key in ("throughput_ratio", "added_p95_ms", "added_p95_ms_pooled", "added_p99_ms")
    }
    result["token_verification"] = _verify_cost()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", choices=["full", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=100_000, help="calls per side")
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
    else:
        print(json.dumps(main(args.calls, args.rounds), indent=2))
