"""Alembic environment of the retrieval service (see ledgerlens.runtime.migrations)."""

from ledgerlens.runtime.migrations import run_env
from ledgerlens.services.retrieval.schema import Base

run_env(Base.metadata)
