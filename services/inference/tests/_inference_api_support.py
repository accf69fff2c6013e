"""The harness of the inference service tests (see conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledgerlens.inference.v1 import inference_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.inference.app import RunningInference
from ledgerlens.services.inference.settings import Settings

__all__ = ["INVOKE", "MODEL", "PRICE", "Harness"]

#: the model the stand-ins serve, and its price (micro-USD per 1k tokens)
MODEL = "gpt-standin"
PRICE = {"input_per_1k": 150, "output_per_1k": 600}
INVOKE = ["inference:invoke", "usage:read"]


@dataclass
class Harness:
    running: RunningInference
    stub: inference_pb2_grpc.InferenceServiceStub
    metadata: tuple[tuple[str, str], ...]
    settings: Settings
    events: EventNames
    issuer: DevTokenIssuer

    def auth(self, scopes: list[str], *, sub: str = "llk_tester", tenant: str = "acme") -> Any:
        token = self.issuer.issue(sub, scopes, tenant=tenant, ttl=3600)
        return (("authorization", f"Bearer {token}"),)
