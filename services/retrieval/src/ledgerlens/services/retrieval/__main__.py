"""``python -m ledgerlens.services.retrieval [serve|migrate]``.

``serve`` (the default) migrates the database, opens the index (loading the HNSW
snapshot or rebuilding it), loads the embedding model, then runs the gRPC API, the ops
app (``/healthz``, ``/readyz``, ``/metrics``) and the consumers that keep the index in
step with ingestion and the ledger. ``migrate`` only migrates.
"""

from __future__ import annotations

from ledgerlens.runtime.entrypoint import service_cli
from ledgerlens.services.retrieval.app import run_retrieval
from ledgerlens.services.retrieval.migrate import migrate
from ledgerlens.services.retrieval.settings import Settings

cli = service_cli("retrieval", Settings, run_retrieval, migrate, help_text=__doc__)

if __name__ == "__main__":
    cli()
