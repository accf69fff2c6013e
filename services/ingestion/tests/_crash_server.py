"""The ingestion service as a separate process, for the crash test: it runs exactly what
``python -m ledgerlens.services.ingestion`` runs, in the test's event namespace.

Usage: ``python _crash_server.py <event-names token>``; settings come from the
``LEDGERLENS_INGESTION_*`` environment. Prints ``PORT <n>`` once it serves.
"""

from __future__ import annotations

import asyncio
import sys

from _ingestion_support import run_ingestion_in

from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.ingestion.settings import Settings


async def main(token: str) -> None:
    names = EventNames(token)
    async with run_ingestion_in(names, Settings()) as running:
        running.server.install_signal_handlers()
        print(f"PORT {running.server.bound_port}", flush=True)
        await running.server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
