"""Chart renders shared by the chart tests: each values set is rendered once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _helm import VALUES_DEV, VALUES_PROD, render, values
from _renders import Rendered

#: the values sets the tests render: (values files, --set values)
VALUE_SETS: dict[str, tuple[list[Path], dict[str, Any]]] = {
    "default": ([], {}),
    "dev": ([VALUES_DEV], {}),
    "prod": ([VALUES_PROD], {}),
    # dev with a gateway config and the service token in the chart's Secret
    "dev-gateway": (
        [VALUES_DEV],
        {
            "services.inference.gatewayConfig": {
                "providers": [
                    {
                        "name": "vllm",
                        "kind": "openai",
                        "base_url": "http://vllm.llm.svc:8000/v1",
                        "models": ["llama-3.1-8b"],
                    },
                    {
                        "name": "local",
                        "kind": "extractive",
                        "models": ["extractive", "all-MiniLM-L6-v2"],
                    },
                ],
                "router": {
                    "aliases": {
                        "default": ["vllm/llama-3.1-8b", "local/extractive"],
                        "embed": ["local/all-MiniLM-L6-v2"],
                    }
                },
            },
            "services.inference.secretEnv": {"LEDGERLENS_INFERENCE_SERVICE_TOKEN": "dev-token"},
        },
    ),
    "prod-keda": ([VALUES_PROD], {"global.autoscaling.provider": "keda"}),
}


@pytest.fixture(scope="session")
def renders() -> dict[str, Rendered]:
    class Lazy(dict[str, Rendered]):
        def __missing__(self, key: str) -> Rendered:
            files, sets = VALUE_SETS[key]
            self[key] = Rendered(key, values(files, sets), render(files, sets))
            return self[key]

    return Lazy()


@pytest.fixture(params=list(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, renders: dict[str, Rendered]) -> Rendered:
    return renders[request.param]
