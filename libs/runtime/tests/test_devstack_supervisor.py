"""The dev stack supervisor as a real process, with a real nats-server and a fake service.

The registry holds one fake service (``_devstack_fake_service.py``, beside this file)
and one entry whose module does not exist yet. Port 4222 is taken (the system NATS, or
this test holds it), so the embedded NATS must move to a free port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from ledgerlens.runtime.devstack import PID_FILE, STATE_FILE, pid_alive
from ledgerlens.runtime.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TESTS_DIR = Path(__file__).resolve().parent
READY_TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def port_4222_taken() -> Iterator[None]:
    """Hold 4222 unless something (the system NATS) already listens there."""
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 4222))
        holder.listen()
    except OSError:
        pass  # already taken, as wanted
    yield
    holder.close()


def _write_registry(path: Path, fake_env: dict[str, str] | None = None) -> Path:
    env = ", ".join(f'{key} = "{value}"' for key, value in (fake_env or {}).items())
    path.write_text(
        "services = [\n"
        f'  {{ name = "fake", module = "_devstack_fake_service", grpc_port = {free_port()},'
        f" http_port = {free_port()}, env = {{ {env} }} }},\n"
        '  { name = "later", module = "ledgerlens.services.not_written_yet",'
        " grpc_port = 50999, http_port = 8999 },\n"
        "]\n"
    )
    return path


def _devstack_env(registry: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LEDGERLENS_DEVSTACK_DATA_DIR", None)
    # the fake service module lives beside this test
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["LEDGERLENS_DEVSTACK_REGISTRY"] = str(registry)
    env["COLUMNS"] = "200"
    return env


def _devstack(*args: str) -> list[str]:
    return [sys.executable, "-m", "ledgerlens.runtime.devstack", *args]


class Stack:
    """One ``devstack up`` process and what it writes."""

    def __init__(self, data_dir: Path, registry: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.registry = registry
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                _devstack("up", "--data-dir", str(data_dir), "--ready-timeout", "30"),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_devstack_env(registry),
            )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads((self.data_dir / STATE_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return state

    async def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            state = self.state()
            if state is not None and state["status"] == "ready":
                return state
            if self.process.poll() is not None:
                pytest.fail(f"devstack up exited with {self.process.returncode}:\n{self.output}")
            await asyncio.sleep(0.1)
        pytest.fail(f"devstack up not ready within {READY_TIMEOUT}s:\n{self.output}")

    async def wait_exit(self, within: float = 40.0) -> int:
        deadline = time.monotonic() + within
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"devstack up did not exit:\n{self.output}")
            await asyncio.sleep(0.1)
        return self.process.returncode

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _devstack(*args, "--data-dir", str(self.data_dir)),
            capture_output=True,
            text=True,
            env=_devstack_env(self.registry),
            timeout=60,
            check=False,
        )


def _pids(state: dict[str, Any]) -> dict[str, int]:
    return {proc["name"]: proc["pid"] for proc in state["processes"]}


async def _wait_all_gone(pids: list[int], within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:  # never leave a supervisor or its children behind
        if stack.process.poll() is None:
            stack.process.send_signal(signal.SIGTERM)
            try:
                stack.process.wait(30)
            except subprocess.TimeoutExpired:
                stack.process.kill()
                stack.process.wait()
        state = stack.state()
        if state:
            stack.run("down")


async def test_up_serves_nats_and_services_and_down_stops_everything(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    data_dir = tmp_path / "data"
    registry = _write_registry(tmp_path / "registry.toml")
    stack = Stack(data_dir, registry, tmp_path / "up1.log")
    stacks.append(stack)
    state = await stack.wait_ready()

    names = [proc["name"] for proc in state["processes"]]
    assert names == ["nats", "fake"]  # "later" is not installed: skipped, and said so
    assert "skipped: later" in stack.output
    nats_proc, fake_proc = state["processes"]
    assert nats_proc["ports"]["client"] != 4222
    assert (data_dir / PID_FILE).read_text().strip() == str(stack.process.pid)

    # the embedded NATS has JetStream, storing under the data dir
    connection = await nats.connect(nats_proc["endpoints"]["client"])
    try:
        js = connection.jetstream()
        await js.account_info()
        await js.add_stream(name="DEVSTACK_KEEP", subjects=["devstack.keep"])
        await js.publish("devstack.keep", b"kept across restarts")
    finally:
        await connection.close()
    assert (data_dir / "nats" / "jetstream").is_dir()

    # the service got its ports and NATS URL from the supervisor and is ready
    async with httpx.AsyncClient() as http:
        ready = await http.get(f"{fake_proc['endpoints']['http']}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["nats"]["ok"] is True

    status = stack.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "fake" in status.stdout
    assert str(fake_proc["pid"]) in status.stdout

    down = stack.run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert await stack.wait_exit() == 0
    assert await _wait_all_gone(list(_pids(state).values())) == []
    assert not (data_dir / STATE_FILE).exists()
    assert not (data_dir / PID_FILE).exists()
    assert stack.run("status").returncode == 3
    assert "fake service stopped" in (data_dir / "logs" / "fake.log").read_text()

    # a second `up` on the same data dir keeps NATS's store; SIGTERM stops it too
    again = Stack(data_dir, registry, tmp_path / "up2.log")
    stacks.append(again)
    state = await again.wait_ready()
    connection = await nats.connect(state["processes"][0]["endpoints"]["client"])
    try:
        info = await connection.jetstream().stream_info("DEVSTACK_KEEP")
    finally:
        await connection.close()
    assert info.state.messages == 1

    again.process.send_signal(signal.SIGTERM)
    assert await again.wait_exit() == 0
    assert await _wait_all_gone(list(_pids(state).values())) == []
    assert not (data_dir / STATE_FILE).exists()


async def test_a_service_that_dies_at_start_fails_up_with_its_log(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    data_dir = tmp_path / "data"
    registry = _write_registry(tmp_path / "registry.toml", {"FAKE_CRASH": "1"})
    stack = Stack(data_dir, registry, tmp_path / "up.log")
    stacks.append(stack)

    code = await stack.wait_exit()

    assert code != 0
    assert "fake exited with code 3" in stack.output
    assert "boom, cannot start" in stack.output  # the last lines of its log
    assert not (data_dir / STATE_FILE).exists()
    ps = await asyncio.create_subprocess_exec("ps", "-eo", "args", stdout=asyncio.subprocess.PIPE)
    listing, _ = await ps.communicate()
    still_running = [line for line in listing.decode().splitlines() if str(data_dir) in line]
    assert still_running == []  # NATS was stopped too


async def test_down_stops_the_children_of_a_killed_supervisor(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    data_dir = tmp_path / "data"
    stack = Stack(data_dir, _write_registry(tmp_path / "registry.toml"), tmp_path / "up.log")
    stacks.append(stack)
    state = await stack.wait_ready()

    stack.process.kill()  # no chance to clean up
    stack.process.wait()
    children = list(_pids(state).values())
    assert all(pid_alive(pid) for pid in children)

    down = stack.run("down")

    assert down.returncode == 0, down.stdout + down.stderr
    assert "leftover" in down.stdout
    assert await _wait_all_gone(children) == []
    assert not (data_dir / STATE_FILE).exists()
