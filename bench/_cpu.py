"""CPU accounting of a benchmark's processes from ``/proc`` (Linux), and the floor it
puts under a closed loop's latency (``run.py`` skips modules starting with ``_``).

Latency on a shared machine is noisy; the CPU one call costs each process is not, and
it bounds what any closed loop can reach on these cores:

- *all processes*: ``concurrency`` callers whose calls need ``c`` CPU-seconds in all
  (server, client, providers, ...) cannot average less than ``concurrency x c / cpus``
  on ``cpus`` cores, nor complete more than ``cpus / c`` calls a second;
- *one process*: a Python server runs its calls on one event loop (one core at a time,
  the GIL), so a server spending ``s`` a call cannot serve more than ``1 / s`` calls a
  second, and ``concurrency`` callers wait at least ``concurrency x s`` on average
  (once that exceeds what the rest of the call takes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CpuMeter", "closed_loop_floor", "own_cpu_seconds", "process_cpu_seconds"]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    times = os.times()
    return times.user + times.system


def closed_loop_floor(
    concurrency: int, cpu_seconds_per_call: float, cpus: int | None = None
) -> dict[str, float]:
    """The lowest mean latency (ms) and the highest throughput (calls/s) a closed loop
    of ``concurrency`` can reach when each call costs ``cpu_seconds_per_call`` on
    ``cpus`` cores (the machine's by default)."""
    cores = cpus or os.cpu_count() or 1
    return {
        "cpu_bound_mean_ms": round(concurrency * cpu_seconds_per_call / cores * 1000, 3),
        "cpu_bound_max_rps": round(cores / cpu_seconds_per_call, 1)
        if cpu_seconds_per_call > 0
        else float("inf"),
    }


class CpuMeter:
    """CPU time of named processes (and of this one, as ``own``) over measured runs.

    ``meter.start()`` before a run, ``meter.stop()`` after it adds the CPU each process
    spent to its total; :meth:`summary` divides by the calls made."""

    def __init__(self, pids: Mapping[str, int], own: str = "load_generator") -> None:
        self._pids = dict(pids)
        self._own = own
        self.seconds: dict[str, float] = dict.fromkeys([*self._pids, own], 0.0)
        self._before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: process_cpu_seconds(pid) for name, pid in self._pids.items()}
        now[self._own] = own_cpu_seconds()
        return now

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> None:
        for name, seconds in self._now().items():
            self.seconds[name] += seconds - self._before[name]

    def summary(
        self, calls: int, concurrency: int, *, single_loop: str | None = None
    ) -> dict[str, Any]:
        """CPU ms a call per process and in all, the closed loop's floor on all the
        machine's cores and, with ``single_loop``, the floor that process's one event
        loop puts under the loop by itself (see the module docstring)."""
        cpus = os.cpu_count() or 1
        total = sum(self.seconds.values()) / calls
        out: dict[str, Any] = {
            "cpu_ms_per_call": {
                name: round(s / calls * 1000, 3) for name, s in self.seconds.items()
            },
            "cpu_ms_per_call_all_processes": round(total * 1000, 3),
            "cpus": cpus,
            **closed_loop_floor(concurrency, total, cpus),
        }
        if single_loop is not None:
            one = closed_loop_floor(concurrency, self.seconds[single_loop] / calls, 1)
            out[f"{single_loop}_loop_bound_mean_ms"] = one["cpu_bound_mean_ms"]
            out[f"{single_loop}_loop_bound_max_rps"] = one["cpu_bound_max_rps"]
        return out
