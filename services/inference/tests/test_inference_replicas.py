"""Two gateway processes sharing one real Redis (what ``python -m
ledgerlens.services.inference`` runs, started twice with ``LEDGERLENS_INFERENCE_REDIS_URL``):
limits hold across both, and an idempotency key used on both at once reaches the
provider once.

The processes are started once for the module (a few seconds each); each test uses an
API key of its own, so counters and idempotency results never mix."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis as sync_redis
from _inference_api_support import INVOKE, MODEL, PRICE
from _inference_support import redis_prefix
from _openai_standin import OpenAIStandIn, Script

from ledgerlens.inference.v1 import inference_pb2, inference_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.testing import EventNames, delete_streams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVER = Path(__file__).with_name("_gateway_server.py")
#: requests per minute per API key, in both processes
LIMIT = 7


@dataclass
class Replicas:
    addresses: list[str]
    standin: OpenAIStandIn
    issuer: DevTokenIssuer
    redis_url: str

    def auth(self, key: str) -> Any:
        token = self.issuer.issue(key, INVOKE, tenant="acme", ttl=3600)
        return (("authorization", f"Bearer {token}"),)


def _env(
    tmp: Path,
    name: str,
    *,
    nats_url: str,
    redis_url: str,
    prefix: str,
    issuer: DevTokenIssuer,
    standin_url: str,
) -> dict[str, str]:
    """One replica's settings: its own database, Redis (with this module's key prefix)
    shared with the other replica."""
    return {
        **os.environ,
        "LEDGERLENS_INFERENCE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/{name}.db",
        "LEDGERLENS_INFERENCE_DATA_DIR": str(tmp / name),
        "LEDGERLENS_INFERENCE_NATS_URL": nats_url,
        "LEDGERLENS_INFERENCE_REDIS_URL": redis_url,
        "LEDGERLENS_INFERENCE_HOST": "127.0.0.1",
        "LEDGERLENS_INFERENCE_GRPC_PORT": "0",
        "LEDGERLENS_INFERENCE_HTTP_PORT": "0",
        "LEDGERLENS_INFERENCE_SHUTDOWN_GRACE_SECONDS": "2",
        "LEDGERLENS_INFERENCE_AUTH__STATIC_JWKS": json.dumps(issuer.jwks()),
        "LEDGERLENS_INFERENCE_AUTH__ISSUER": issuer.issuer,
        "LEDGERLENS_INFERENCE_LIMITS__KEY_PREFIX": f"{prefix}limits:",
        "LEDGERLENS_INFERENCE_LIMITS__KEY_REQUESTS_PER_MINUTE": str(LIMIT),
        "LEDGERLENS_INFERENCE_IDEMPOTENCY__KEY_PREFIX": f"{prefix}idem:",
        "LEDGERLENS_INFERENCE_CACHE__KEY_PREFIX": f"{prefix}cache:",
        "LEDGERLENS_INFERENCE_PROVIDERS": json.dumps(
            [
                {
                    "name": "primary",
                    "kind": "openai",
                    "base_url": standin_url,
                    "api_key": "sk-test",
                    "models": [MODEL],
                    "prices": {MODEL: PRICE},
                }
            ]
        ),
        "LEDGERLENS_INFERENCE_ROUTER": json.dumps(
            {"aliases": {"default": [f"primary/{MODEL}"], "embed": [f"primary/{MODEL}"]}}
        ),
    }


@pytest.fixture(scope="module")
def replicas(
    nats_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    names = EventNames(secrets.token_hex(4))
    tmp = tmp_path_factory.mktemp("replicas")
    issuer = DevTokenIssuer()
    prefix = redis_prefix("replicas")
    procs: list[subprocess.Popen[str]] = []
    logs = []
    with OpenAIStandIn(default_text="Shared answer.") as standin:
        try:
            for name in ("a", "b"):
                log = (tmp / f"{name}.log").open("w")
                logs.append(log)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(SERVER), names.token],
                        env=_env(
                            tmp,
                            name,
                            nats_url=nats_url,
                            redis_url=redis_url,
                            prefix=prefix,
                            issuer=issuer,
                            standin_url=standin.base_url,
                        ),
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                    )
                )
            addresses = []
            for proc, name in zip(procs, ("a", "b"), strict=True):
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if not line.startswith("PORT "):
                    log_text = (tmp / f"{name}.log").read_text()[-3000:]
                    pytest.fail(f"gateway {name} did not start: {line!r}\n{log_text}")
                addresses.append(f"127.0.0.1:{line.split()[1]}")
            yield Replicas(addresses, standin, issuer, redis_url)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for log in logs:
                log.close()
            asyncio.run(delete_streams(nats_url, names))


def chat(text: str, **kwargs: Any) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(
        messages=[inference_pb2.ChatMessage(role=inference_pb2.ROLE_USER, content=text)],
        **kwargs,
    )


def _inside_one_minute(redis_url: str) -> None:
    """The per-minute window is Redis' clock minute: start well inside one."""
    client = sync_redis.Redis.from_url(redis_url)
    try:
        seconds, _ = client.time()
    finally:
        client.close()
    if seconds % 60 > 50:
        time.sleep(61 - seconds % 60)


async def test_limits_hold_across_two_gateways_sharing_redis(replicas: Replicas) -> None:
    _inside_one_minute(replicas.redis_url)
    metadata = replicas.auth("llk_limits")
    n = 3 * LIMIT
    async with (
        grpc.aio.insecure_channel(replicas.addresses[0]) as a,
        grpc.aio.insecure_channel(replicas.addresses[1]) as b,
    ):
        stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in (a, b)]

        async def one(i: int) -> grpc.StatusCode:
            try:
                await stubs[i % 2].Chat(chat(f"limits {i}"), metadata=metadata, timeout=20)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(one(i) for i in range(n)))
    assert codes.count(grpc.StatusCode.OK) == LIMIT
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == n - LIMIT
    # both gateways admitted some and refused some: the counter is shared, not per process
    for parity in (0, 1):
        mine = codes[parity::2]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in mine


async def test_an_idempotency_key_used_on_both_gateways_at_once_runs_the_provider_once(
    replicas: Replicas,
) -> None:
    standin = replicas.standin
    before = standin.calls()
    standin.script(Script.slow(0.5, "Exactly once."))
    metadata = replicas.auth("llk_idem")
    request = chat("idempotent", idempotency_key=f"shared-{secrets.token_hex(4)}")
    async with (
        grpc.aio.insecure_channel(replicas.addresses[0]) as a,
        grpc.aio.insecure_channel(replicas.addresses[1]) as b,
    ):
        stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in (a, b)]
        responses = await asyncio.gather(
            *(stubs[i % 2].Chat(request, metadata=metadata, timeout=20) for i in range(6))
        )
    assert standin.calls() == before + 1
    assert {r.completion_id for r in responses} == {responses[0].completion_id}
    assert {r.message.content for r in responses} == {"Exactly once."}
    assert sum(not r.cached for r in responses) == 1
