"""Helpers shared by the benchmarks (``run.py`` skips modules starting with ``_``).

Each benchmark runs with ``bench/`` on ``sys.path`` (as a script, through ``run.py``,
or as its own server subprocess), so they import this as ``_common``.
"""

from __future__ import annotations

import os
import statistics


def pin(cpu: int) -> None:
    """Pin this process to one CPU (servers on one, the load generator on the other),
    so the scheduler moving processes around does not blur a comparison."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {cpu})


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def rpc_summary(latencies: list[float], seconds: float) -> dict[str, float]:
    """Throughput and latency quantiles (ms) of one measured run of calls."""
    values = sorted(latencies)
    return {
        "calls": len(values),
        "seconds": round(seconds, 3),
        "throughput_rps": round(len(values) / seconds, 1),
        "p50_ms": round(quantile(values, 0.50) * 1000, 3),
        "p95_ms": round(quantile(values, 0.95) * 1000, 3),
        "p99_ms": round(quantile(values, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
    }
