"""Fixtures of the end-to-end tests: one running platform for the whole session.

The flow and auth modules share it (starting the five services costs tens of seconds on
two cores); a fault module, which kills and restarts parts of the stack, starts its own
with ``start_platform(tmp_path)`` instead.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest
from _platform import Platform, require_corpus, start_platform


@pytest.fixture(scope="session")
def corpus() -> None:
    """The EIP corpus is there (skip without it; under CI, fail)."""
    require_corpus()


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """NATS and the five services as real processes on free ports (see ``_platform``)."""
    with start_platform(tmp_path_factory.mktemp("platform")) as running:
        yield running


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """A failed test on a platform shows the last lines of each process's log."""
    outcome = yield
    report = outcome.get_result()
    running = getattr(item, "funcargs", {}).get("platform")
    if report.failed and isinstance(running, Platform):
        for child in running.supervisor.children:
            report.sections.append((f"{child.name} log (last lines)", child.log_tail(25)))
