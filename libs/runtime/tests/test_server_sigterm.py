"""SIGTERM on a real service process: in-flight calls finish, new ones are refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("_sigterm_server.py")


async def _read_line(stream: asyncio.StreamReader, prefix: str) -> str:
    while True:
        line = (await asyncio.wait_for(stream.readline(), 20)).decode()
        if not line:
            raise AssertionError(f"server exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line.removeprefix(prefix).strip()


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(
    issuer: DevTokenIssuer, mint: Callable[..., str]
) -> None:
    env = {
        **os.environ,
        "LEDGERLENS_SERVICE_SERVICE_NAME": "sigterm-test",
        "LEDGERLENS_SERVICE_GRPC_PORT": "0",
        "LEDGERLENS_SERVICE_SHUTDOWN_GRACE_SECONDS": "10",
        "LEDGERLENS_SERVICE_AUTH__STATIC_JWKS": json.dumps(issuer.jwks()),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        port = int(await _read_line(proc.stdout, "PORT "))
        md = [("authorization", f"Bearer {mint()}")]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            slow = asyncio.ensure_future(
                stub.CreateApiKey(
                    identity_pb2.CreateApiKeyRequest(name="slow:1.5"), metadata=md, timeout=20
                )
            )
            assert await _read_line(proc.stdout, "STARTED ") == "slow:1.5"

            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateApiKey(
                    identity_pb2.CreateApiKeyRequest(name="late"), metadata=md, timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            reply = await slow
            assert reply.key.name == "slow:1.5"
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        remaining = (await proc.stdout.read()).decode()
        assert "STARTED late" not in remaining  # the refused call never reached the servicer

        # its logs are JSON lines carrying the service name
        logs = [json.loads(line) for line in (await proc.stderr.read()).decode().splitlines()]
        messages = [entry["message"] for entry in logs]
        assert "received SIGTERM, shutting down" in messages
        assert all(entry["service"] == "sigterm-test" for entry in logs)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
