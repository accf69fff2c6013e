"""``python -m ledgerlens.services.ingestion [serve|migrate]``.

``serve`` (the default) migrates the database, loads the embedding model, then runs
the gRPC API, the ops app (``/healthz``, ``/readyz``, ``/metrics``), the outbox relay
and the consumer of ledger anchors. ``migrate`` only migrates.
"""

from __future__ import annotations

from ledgerlens.runtime.entrypoint import service_cli
from ledgerlens.services.ingestion.app import run_ingestion
from ledgerlens.services.ingestion.migrate import migrate
from ledgerlens.services.ingestion.settings import Settings

cli = service_cli("ingestion", Settings, run_ingestion, migrate, help_text=__doc__)

if __name__ == "__main__":
    cli()
