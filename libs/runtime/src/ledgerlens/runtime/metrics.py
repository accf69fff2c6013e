"""Prometheus RED metrics of the gRPC server.

The names are part of the contract with dashboards, alerts and the p95 autoscaler
(see CONVENTIONS.md): renaming one breaks them. The ops app serves the exposition::

    prometheus_client.generate_latest(ledgerlens.runtime.metrics.registry())

Tests inject their own registry with :func:`use_registry` (or build an isolated
:class:`RpcMetrics` directly) so that counts never leak between tests.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "DURATION_BUCKETS",
    "DurationHistogram",
    "RpcMetrics",
    "registry",
    "rpc_metrics",
    "use_registry",
]

#: seconds; dense below 10 ms where a healthy RPC lives (p95 targets are sub-ms to a few
#: ms), then coarser up to 10 s for slow streaming or LLM-bound calls.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class DurationSeries:
    """One label combination's bucket counts and sum."""

    __slots__ = ("count", "counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.count += 1
        self.total += seconds


class DurationHistogram(Collector):
    """A Prometheus histogram kept as plain counts, exposed through a custom collector.

    Hand-written instead of ``prometheus_client.Histogram`` because it sits on every
    RPC's path: the library's children take a lock per bucket and per sum, and in the
    grpc.aio server that cost a measurable share of the runtime's per-call overhead
    (``bench/runtime_overhead.py``). Observations come only from the event loop's
    thread; a scrape from another thread copies the counts first, so at worst it sees
    a call in its bucket a moment before it is in ``_count``. The exposition is the
    library's own (``HistogramMetricFamily``).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], DurationSeries] = {}
        registry.register(self)

    def series(self, *labelvalues: str) -> DurationSeries:
        """The series of one label combination (created at zero on first use)."""
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"expected labels {self.labelnames}, got {labelvalues}")
        found = self._series.get(labelvalues)
        if found is None:
            found = self._series[labelvalues] = DurationSeries(len(DURATION_BUCKETS))
        return found

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labelvalues, series in list(self._series.items()):
            counts, total = list(series.counts), series.total
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*map(str, DURATION_BUCKETS), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labelvalues), buckets, total)
        yield family


class RpcMetrics:
    """The server-side RPC metrics, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.duration = DurationHistogram(
            "ledgerlens_rpc_server_duration_seconds",
            "Time from a call's arrival to its status (whole stream for streaming RPCs).",
            ["service", "method", "code"],
            registry,
        )


_registry: CollectorRegistry = REGISTRY
_metrics: RpcMetrics | None = None


def registry() -> CollectorRegistry:
    """The registry the runtime's metrics live on (what ``/metrics`` exposes)."""
    return _registry


def rpc_metrics() -> RpcMetrics:
    """The process-wide :class:`RpcMetrics`, created on first use on :func:`registry`."""
    global _metrics
    if _metrics is None:
        _metrics = RpcMetrics(_registry)
    return _metrics


def use_registry(new: CollectorRegistry) -> None:
    """Use ``new`` for the runtime's metrics from now on (tests; before building servers)."""
    global _registry, _metrics
    _registry = new
    _metrics = None
