"""What one render of the chart gives the tests (a values set's values and objects)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rendered:
    name: str
    values: dict[str, Any]
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} objects in {self.name}"
        return found[0]

    @property
    def enabled(self) -> list[str]:
        return sorted(n for n, s in self.values["services"].items() if s["enabled"])

    def workload(self, svc: str) -> dict[str, Any]:
        kind = "Rollout" if self.values["services"][svc]["canary"]["enabled"] else "Deployment"
        return self.get(kind, f"ledgerlens-{svc}")
