"""A tiny service for the SIGTERM test: ``python _sigterm_server.py`` (settings from env).

Serves the identity contract with one slow RPC through the real runtime, prints
``PORT <n>`` once listening and ``STARTED <name>`` when a call begins, and exits 0
after a graceful shutdown — i.e. it is shaped like a service's ``__main__``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc.aio

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.auth import TokenVerifier
from ledgerlens.runtime.server import build_server
from ledgerlens.runtime.settings import ServiceSettings
from ledgerlens.runtime.telemetry import configure_logging, configure_tracing


class SlowIdentity(identity_pb2_grpc.IdentityServiceServicer):
    async def CreateApiKey(
        self, request: identity_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> identity_pb2.CreateApiKeyResponse:
        print(f"STARTED {request.name}", flush=True)
        if request.name.startswith("slow:"):
            await asyncio.sleep(float(request.name.removeprefix("slow:")))
        return identity_pb2.CreateApiKeyResponse(key=identity_pb2.ApiKey(name=request.name))


async def main() -> None:
    settings = ServiceSettings()
    configure_logging(settings)
    configure_tracing(settings)
    server = build_server(
        settings,
        [
            (
                identity_pb2_grpc.add_IdentityServiceServicer_to_server,
                SlowIdentity(),  # type: ignore[abstract]  # one RPC is enough
                identity_pb2.DESCRIPTOR.services_by_name["IdentityService"],
            )
        ],
        TokenVerifier.from_settings(settings.auth),
    )
    await server.start()
    server.install_signal_handlers()
    print(f"PORT {server.bound_port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
