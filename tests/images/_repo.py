"""Where the images' inputs are: the repository root and its services."""

from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["REPO", "default_ports", "services_with_main"]

REPO = Path(__file__).resolve().parents[2]


def services_with_main() -> list[str]:
    """Every service package under services/ that runs as ``python -m`` (has __main__)."""
    found = REPO.glob("services/*/src/ledgerlens/services/*/__main__.py")
    return sorted(path.parent.name for path in found)


def default_ports(service: str) -> tuple[int, int]:
    """The service's default (gRPC, HTTP) ports, from its Settings class."""
    settings = importlib.import_module(f"ledgerlens.services.{service}.settings").Settings
    fields = settings.model_fields
    return int(fields["grpc_port"].default), int(fields["http_port"].default)
