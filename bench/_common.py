"""Helpers shared by the benchmarks (``run.py`` skips modules starting with ``_``).

Each benchmark runs with ``bench/`` on ``sys.path`` (as a script, through ``run.py``,
or as its own server subprocess), so they import this as ``_common``.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
from collections.abc import Mapping
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


async def start_service(
    module: str, env: Mapping[str, str], log_path: Path, *, within: float
) -> tuple[asyncio.subprocess.Process, str]:
    """``python -m <module>`` with ``env`` (its stderr in ``log_path``), once it has printed
    its start-up line (``... gRPC host:port, HTTP url``) within ``within`` seconds: the
    process and that line.
    RuntimeError with the log's tail when it prints something else."""
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, env=dict(env), stdout=asyncio.subprocess.PIPE, stderr=log
        )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), within)).decode()
    if "gRPC " not in line:
        proc.terminate()
        await proc.wait()
        tail = (await asyncio.to_thread(log_path.read_text, errors="replace"))[-3000:]
        raise RuntimeError(f"{module} did not start: {line!r}\n{tail}")
    return proc, line


def grpc_address(start_line: str) -> str:
    """The gRPC address in a service's start-up line."""
    return start_line.split("gRPC ", 1)[1].split(",", 1)[0].strip()
