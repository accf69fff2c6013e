"""The stack ``bench/load.py`` drives: the one ``make up`` runs, or a private one.

``make up`` (``ledgerlens.runtime.devstack``) records every process it started in
``<data_dir>/devstack.json``: pids, ports and endpoints. When no stack runs there, the
load generator starts its own with the same ``Supervisor`` in a temp data dir on free
ports, so ``make load`` works on a fresh clone.

Also here: the load test's API key (provisioned as ``make up`` provisions service keys),
its token, and the resident-memory sampler of the stack's processes (``/proc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ledgerlens.runtime.devstack import (
    STATE_FILE,
    TOKEN_PATH,
    Supervisor,
    load_registry,
    pid_alive,
    provision_service_credentials,
    service_env,
)
from ledgerlens.runtime.net import free_port

#: what the mix calls: ingestion (write, read), retrieval, inference, usage
LOAD_SCOPES = ("ingest:write", "ingest:read", "search:read", "inference:invoke", "usage:read")
#: the key is ``<KEY_OWNER>-service`` of tenant ``devstack`` (provision_service_credentials)
KEY_OWNER = "loadgen"
_NEEDED = ("identity", "ingestion", "retrieval", "inference")


def log(message: str) -> None:
    print(f"load: {message}", file=sys.stderr, flush=True)


@dataclass
class Stack:
    """A running dev stack as its state file describes it."""

    data_dir: Path
    private: bool
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def grpc(self, name: str) -> str:
        return str(self.processes[name]["endpoints"]["grpc"])

    def http(self, name: str) -> str:
        return str(self.processes[name]["endpoints"]["http"])

    @property
    def pids(self) -> dict[str, int]:
        return {name: int(proc["pid"]) for name, proc in self.processes.items()}

    @property
    def nats_url(self) -> str:
        return str(self.processes["nats"]["endpoints"]["client"])


def running_stack(data_dir: Path) -> Stack | None:
    """The stack ``make up`` runs in ``data_dir``, if it is up and ready."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    supervisor = state.get("supervisor_pid")
    if state.get("status") != "ready" or not supervisor or not pid_alive(int(supervisor)):
        return None
    processes = {proc["name"]: proc for proc in state.get("processes", [])}
    if not all(pid_alive(int(proc["pid"])) for proc in processes.values()):
        return None
    missing = [name for name in (*_NEEDED, "nats") if name not in processes]
    if missing:
        raise RuntimeError(
            f"the dev stack in {data_dir} runs without {', '.join(missing)}: "
            "the load mix needs identity, ingestion, retrieval and inference"
        )
    return Stack(Path(state.get("data_dir", data_dir)), private=False, processes=processes)


@contextlib.asynccontextmanager
async def private_stack() -> AsyncIterator[Stack]:
    """A dev stack of our own (temp data dir, free ports), stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="ledgerlens-load-") as tmp:
        # free ports, not the registry's: never collide with a `make up` started later
        entries = [
            dataclasses.replace(entry, grpc_port=free_port(), http_port=free_port())
            for entry in load_registry()
            if entry.installed
        ]
        supervisor = Supervisor(Path(tmp), entries, ready_timeout=180.0)
        try:
            await supervisor.start()
            state = supervisor.state()
            processes = {proc["name"]: proc for proc in state["processes"]}
            yield Stack(supervisor.data_dir, private=True, processes=processes)
        finally:
            await supervisor.stop()


async def load_credentials(stack: Stack) -> dict[str, str]:
    """The load test's API key, created with identity's ``create-key`` as ``make up``
    creates service keys (on identity's own database, with identity's environment)."""
    entries = {entry.name: entry for entry in load_registry()}
    ports = {
        name: (int(proc["ports"]["grpc"]), int(proc["ports"]["http"]))
        for name, proc in stack.processes.items()
        if name != "nats"
    }
    identity_env = service_env(
        entries["identity"],
        grpc_port=ports["identity"][0],
        http_port=ports["identity"][1],
        nats_url=stack.nats_url,
        data_dir=stack.data_dir,
        peers={name: p for name, p in ports.items() if name != "identity"},
    )
    return await provision_service_credentials(
        KEY_OWNER,
        LOAD_SCOPES,
        data_dir=stack.data_dir,
        identity_env=identity_env,
        token_url=stack.http("identity") + TOKEN_PATH,
    )


class Token:
    """An identity token for the load key, renewed at 80% of its lifetime."""

    def __init__(self, token_url: str, credentials: Mapping[str, str]) -> None:
        self._url = token_url
        self._auth = httpx.BasicAuth(credentials["client_id"], credentials["client_secret"])
        self._token = ""
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        if time.monotonic() >= self._renew_at:
            async with self._lock:
                if time.monotonic() >= self._renew_at:
                    await self._issue()
        return (("authorization", f"Bearer {self._token}"),)

    async def _issue(self) -> None:
        async with httpx.AsyncClient(timeout=10.0) as http:
            response = await http.post(
                self._url, data={"grant_type": "client_credentials"}, auth=self._auth
            )
        response.raise_for_status()
        body = response.json()
        self._token = str(body["access_token"])
        self._renew_at = time.monotonic() + 0.8 * float(body.get("expires_in", 300))


# -- memory ------------------------------------------------------------------------------


def _status_mib(pid: int) -> dict[str, float] | None:
    """VmRSS and VmHWM of ``pid`` in MiB (None once it is gone)."""
    found: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024  # kB
    except OSError:
        return None
    return found if len(found) == 2 else None


class MemorySampler:
    """Samples every process's VmRSS/VmHWM once a ``interval`` while it runs."""

    def __init__(self, pids: Mapping[str, int], interval: float = 1.0) -> None:
        self._pids = dict(pids)
        self._interval = interval
        self._peak_rss: dict[str, float] = {}
        self._last: dict[str, dict[str, float]] = {}
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        self.samples += 1
        for name, pid in self._pids.items():
            status = _status_mib(pid)
            if status is None:
                continue
            self._last[name] = status
            self._peak_rss[name] = max(self._peak_rss.get(name, 0.0), status["VmRSS"])

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, dict[str, float | int]]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()
        return {
            name: {
                "pid": self._pids[name],
                "rss_peak_mib": round(self._peak_rss[name], 1),
                "rss_end_mib": round(last["VmRSS"], 1),
                "hwm_end_mib": round(last["VmHWM"], 1),
            }
            for name, last in self._last.items()
        }


def own_rss_mib() -> dict[str, float] | None:
    return _status_mib(os.getpid())


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (``/proc/<pid>/stat``), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # after the command: state is field 3 of the man page, utime 14 and stime 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
