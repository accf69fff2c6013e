"""Alembic environment of the identity service (see ledgerlens.runtime.migrations)."""

from ledgerlens.runtime.migrations import run_env
from ledgerlens.services.identity import ca_store, store  # noqa: F401  (register the tables)
from ledgerlens.services.identity.schema import Base

run_env(Base.metadata)
