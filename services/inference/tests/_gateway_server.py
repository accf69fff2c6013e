"""The inference service as a separate process, for the replica tests: it runs exactly
what ``python -m ledgerlens.services.inference`` runs, in the test's event namespace.

Usage: ``python _gateway_server.py <event-names token>``; settings come from the
``LEDGERLENS_INFERENCE_*`` environment. Prints ``PORT <n>`` once it serves; SIGTERM
drains and stops it.
"""

from __future__ import annotations

import asyncio
import sys

from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.inference.app import REVOKED_CONSUMER, run_inference
from ledgerlens.services.inference.settings import Settings


async def main(token: str) -> None:
    names = EventNames(token)
    async with run_inference(
        Settings(),
        streams=names.platform_streams(),
        revoked_consumer=names.consumer(REVOKED_CONSUMER),
        subject=names.subject,
    ) as running:
        running.server.install_signal_handlers()
        print(f"PORT {running.server.bound_port}", flush=True)
        await running.server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
