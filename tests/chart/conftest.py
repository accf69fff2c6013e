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
    # what prod becomes once services/inference lands
    "prod-inference": ([VALUES_PROD], {"services.inference.enabled": True}),
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
