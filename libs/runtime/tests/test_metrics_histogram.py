"""The RPC duration histogram's exposition is a correct Prometheus histogram."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ledgerlens.runtime.metrics import DURATION_BUCKETS, RpcMetrics

NAME = "ledgerlens_rpc_server_duration_seconds"


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_buckets_are_cumulative_and_bounds_inclusive() -> None:
    registry = CollectorRegistry()
    metrics = RpcMetrics(registry)
    series = metrics.duration.series("pkg.Svc", "Get", "OK")
    observations = [0.00005, 0.001, 0.001, 0.003, 20.0]  # 0.001 sits exactly on a bound
    for seconds in observations:
        series.observe(seconds)
    metrics.duration.series("pkg.Svc", "Get", "NOT_FOUND").observe(0.2)

    samples = _samples(registry)
    labels = (("code", "OK"), ("method", "Get"), ("service", "pkg.Svc"))

    def bucket(le: str) -> float:
        return samples[(f"{NAME}_bucket", tuple(sorted((*labels, ("le", le)))))]

    for bound in DURATION_BUCKETS:
        expected = sum(1 for seconds in observations if seconds <= bound)
        assert bucket(str(bound)) == expected, bound
    assert bucket("+Inf") == len(observations)
    assert samples[(f"{NAME}_count", labels)] == len(observations)
    assert samples[(f"{NAME}_sum", labels)] == pytest.approx(sum(observations))
    not_found = (("code", "NOT_FOUND"), ("method", "Get"), ("service", "pkg.Svc"))
    assert samples[(f"{NAME}_count", not_found)] == 1


def test_wrong_label_count_is_refused() -> None:
    metrics = RpcMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="expected labels"):
        metrics.duration.series("pkg.Svc", "Get")


def test_a_second_histogram_of_the_same_name_is_refused() -> None:
    registry = CollectorRegistry()
    RpcMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        RpcMetrics(registry)
