"""Alembic environment of the ingestion service (see ledgerlens.runtime.migrations)."""

from ledgerlens.runtime.migrations import run_env
from ledgerlens.services.ingestion.schema import Base

run_env(Base.metadata)
