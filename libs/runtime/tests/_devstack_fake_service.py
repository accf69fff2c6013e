"""A stand-in service the devstack tests register: ``python -m _devstack_fake_service``.

It reads its settings the way a real service does (``LEDGERLENS_FAKE_*``), connects to
the NATS the supervisor gave it, and serves the ops app, whose ``/readyz`` checks that
NATS connection. With ``FAKE_CRASH=1`` it fails at start, like a broken service.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import grpc
import nats
from grpc_health.v1 import health, health_pb2_grpc

from ledgerlens.runtime.ops import build_ops_app, serve_ops_app
from ledgerlens.runtime.settings import ServiceSettings, service_config


class FakeSettings(ServiceSettings):
    model_config = service_config("fake")


async def main() -> int:
    if os.environ.get("FAKE_CRASH"):
        print("fake service: boom, cannot start", flush=True)
        return 3
    settings = FakeSettings()
    connection = await nats.connect(settings.nats_url)

    async def nats_connected() -> bool:
        return bool(connection.is_connected)

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # type: ignore[attr-defined]
    server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    await server.start()

    app = build_ops_app(settings.service_name, {"nats": nats_connected})
    ops = await serve_ops_app(app, settings.host, settings.http_port)
    print(f"fake service {settings.service_name} serving on {ops.port}", flush=True)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await ops.stop()
    await server.stop(1)
    await connection.close()
    print("fake service stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
