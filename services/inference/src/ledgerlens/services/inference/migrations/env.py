"""Alembic environment of the inference service (see ledgerlens.runtime.migrations)."""

from ledgerlens.runtime.migrations import run_env
from ledgerlens.services.inference import store  # noqa: F401  (register the tables)
from ledgerlens.services.inference.schema import Base

run_env(Base.metadata)
