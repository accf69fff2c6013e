"""``python -m ledgerlens.services.inference [serve|migrate]``.

``serve`` (the default) migrates the database, builds the providers and router from
the settings (or ``providers_file``), then runs the gRPC API, the ops app
(``/healthz``, ``/readyz``, ``/metrics``), the outbox relay that publishes
``inference.completion.recorded`` and the consumer of ``identity.key.revoked``.
``migrate`` only migrates.
"""

from __future__ import annotations

from ledgerlens.runtime.entrypoint import service_cli
from ledgerlens.services.inference.app import run_inference
from ledgerlens.services.inference.migrate import migrate
from ledgerlens.services.inference.settings import Settings

cli = service_cli("inference", Settings, run_inference, migrate, help_text=__doc__)

if __name__ == "__main__":
    cli()
