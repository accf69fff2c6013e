"""Alembic environment of the ledger service (see ledgerlens.runtime.migrations)."""

from ledgerlens.runtime.migrations import run_env
from ledgerlens.services.ledger.schema import Base

run_env(Base.metadata)
