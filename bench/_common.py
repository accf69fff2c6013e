"""Helpers shared by the benchmarks (``run.py`` skips modules starting with ``_``).

Each benchmark runs with ``bench/`` on ``sys.path`` (as a script, through ``run.py``,
or as its own server subprocess), so they import this as ``_common``.
"""

from __future__ import annotations

import os
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_gib() -> float | None:
    """Total memory (``/proc/meminfo``), GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a benchmark ran on, as every result file records it."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }
