"""Prometheus RED metrics of the gRPC server.

The names are part of the contract with dashboards, alerts and the p95 autoscaler
(see CONVENTIONS.md): renaming one breaks them. The ops app serves the exposition::

    prometheus_client.generate_latest(ledgerlens.runtime.metrics.registry())

Tests inject their own registry with :func:`use_registry` (or build an isolated
:class:`RpcMetrics` directly) so that counts never leak between tests.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Histogram

__all__ = [
    "DURATION_BUCKETS",
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


class RpcMetrics:
    """The server-side RPC metrics, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.duration = Histogram(
            "ledgerlens_rpc_server_duration_seconds",
            "Time from a call's arrival to its status (whole stream for streaming RPCs).",
            ["service", "method", "code"],
            buckets=DURATION_BUCKETS,
            registry=registry,
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
