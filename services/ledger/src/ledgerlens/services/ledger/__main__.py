"""``python -m ledgerlens.services.ledger [serve|migrate]``.

``serve`` (the default) migrates the database (the dev ledger's tables and the
service's own), opens the backend (the embedded dev ledger, or a Fabric network through
its Gateway peer), then runs the gRPC API, the ops app (``/healthz``, ``/readyz``,
``/metrics``), the chaincode event follower with its outbox relay, and the consumers of
ingested documents and recorded completions. ``migrate`` only migrates.
"""

from __future__ import annotations

from ledgerlens.runtime.entrypoint import service_cli
from ledgerlens.services.ledger.app import run_ledger
from ledgerlens.services.ledger.migrate import migrate
from ledgerlens.services.ledger.settings import Settings

cli = service_cli("ledger", Settings, run_ledger, migrate, help_text=__doc__)

if __name__ == "__main__":
    cli()
