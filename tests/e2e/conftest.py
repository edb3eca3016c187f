"""Agent-spawning fixtures: a fake control plane (`/api/node/*` per CONTRACT §3.1) and real agent processes.

Everything listens on 127.0.0.1 and takes free ports, so the tests run in parallel under pytest-xdist.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import agent_port, agent_ready, wait_until
from worker_client.client import WorkerControlClient

REPO_ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3
BACKEND_TOKEN = "backend-secret"

# Backends that misbehave, for the failure scenarios; `--addr host:port` is appended to each.
TEST_BACKENDS = {
    "stderr30": {
        "command": [
            sys.executable,
            "-c",
            "import sys\nfor i in range(30): print(f'err line {i}', file=sys.stderr)\nsys.exit(3)",
        ]
    },
    "mute": {"command": [sys.executable, "-c", "import time; time.sleep(600)"]},
}


@dataclass
class Call:
    """One request the fake control plane received."""

    method: str
    path: str
    token: str
    body: Any
    at: float = field(default_factory=time.monotonic)


class FakeControlPlane:
    """`/api/node/*` in a thread: issues a new node token per registration, records every call.

    Knobs: `heartbeat_statuses` (statuses for the next heartbeats, then 200), `heartbeat_orphans` (`orphans`
    for the next heartbeats, then `orphans`), `in_flight` (summed by `GET /api/node/{id}/models`),
    `heartbeat_interval` (registration answer), `on_call` (path suffix → function called on such a call),
    `send_replicas` (the heartbeat answer's `send_replicas`; None leaves the field out, as an older control
    plane does).
    """

    node_id = "7"

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.node_tokens: list[str] = []
        self.heartbeat_statuses: list[int] = []
        self.heartbeat_orphans: list[list[str]] = []
        self.orphans: list[str] = []
        self.in_flight = 0
        self.heartbeat_interval: float | None = None
        self.send_replicas: bool | None = None
        self.on_call: dict[str, Callable[[], None]] = {}
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(), bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.server_bind()  # reserves the port; connections are refused until `start`
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FakeControlPlane:
        self._server.server_activate()
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    @property
    def node_token(self) -> str:
        with self.lock:
            return self.node_tokens[-1] if self.node_tokens else ""

    def calls_to(self, suffix: str) -> list[Call]:
        with self.lock:
            return [call for call in self.calls if call.path.endswith(suffix)]

    def answer(self, call: Call) -> tuple[int, Any]:
        """The status and JSON body for one call."""
        for suffix, hook in self.on_call.items():
            if call.path.endswith(suffix):
                hook()
        with self.lock:
            self.calls.append(call)
            if call.path == "/api/node/register":
                self.node_tokens.append(f"node-token-{len(self.node_tokens) + 1}")
                return 201, {
                    "id": self.node_id,
                    "name": call.body["name"],
                    "status": "healthy",
                    "node_token": self.node_tokens[-1],
                    "max_replicas_per_model": call.body["max_replicas_per_model"],
                    "heartbeat_interval": self.heartbeat_interval,
                    "backend_token": BACKEND_TOKEN,
                }
            if call.token != (self.node_tokens[-1] if self.node_tokens else None):
                return 401, {"error": "bad token"}
            if call.path.endswith("/heartbeat"):
                status = self.heartbeat_statuses.pop(0) if self.heartbeat_statuses else 200
                answer = {"status": "healthy", "max_replicas_per_model": 1, "orphans": list(self.orphans)}
                if self.send_replicas is not None:
                    answer["send_replicas"] = self.send_replicas
                return status, answer
            if call.path.endswith("/models"):
                return 200, [{"model_name": "m", "replica_index": 0, "in_flight": self.in_flight}]
            return 200, {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        control_plane = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                call = Call(self.command, self.path, token, json.loads(raw) if raw else None)
                status, body = control_plane.answer(call)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def child_pids(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (read from /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def is_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


class AgentProcess:
    """A `python -m worker_client.agent` process registered with a fake control plane."""

    def __init__(
        self, control_plane: FakeControlPlane, args: list[str], log_path: Path, env: dict[str, str]
    ) -> None:
        self.control_plane = control_plane
        self.port = agent_port()
        self.address = f"127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "worker_client.agent", "--register-to", control_plane.url]
        command += ["--addr", self.address, "--drain-timeout", "10s", *args]
        if "--state-dir" not in args:  # every agent keeps its node credential in a directory of its own
            command += ["--state-dir", str(log_path.with_name(f"{log_path.stem}-state"))]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, token: str | None = None) -> WorkerControlClient:
        """A client presenting `token`, by default the current node token."""
        return WorkerControlClient(
            self.address, self.control_plane.node_token if token is None else token, 30
        )

    def wait_registered(self, count: int = 1) -> None:
        wait_until(
            lambda: len(self.control_plane.calls_to("/register")) >= count, timeout=30, message="registration"
        )
        wait_until(lambda: agent_ready(self.client()), timeout=30, message="the agent's gRPC server")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL if it does not exit within `timeout`; answers the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def control_plane() -> Iterator[FakeControlPlane]:
    control_plane = FakeControlPlane().start()
    yield control_plane
    control_plane.stop()


@pytest.fixture
def backends_config(tmp_path: Path) -> Path:
    path = tmp_path / "backends.yaml"
    path.write_text(yaml.safe_dump(TEST_BACKENDS))
    return path


@pytest.fixture
def start_agent(tmp_path: Path, backends_config: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Starts agents (`start_agent(control_plane, *flags)`), by default with `--vram 24GiB`, heartbeats every
    0.5 s and the misbehaving test backends; afterwards stops them and checks no backend outlived them."""
    agents: list[AgentProcess] = []

    def start(
        control_plane: FakeControlPlane,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        heartbeat_interval: str | None = "0.5s",
    ) -> AgentProcess:
        flags = ["--vram", "24GiB", "--backends-config", str(backends_config), *args]
        if heartbeat_interval:
            flags += ["--heartbeat-interval", heartbeat_interval]
        agent = AgentProcess(control_plane, flags, tmp_path / f"agent-{len(agents)}.log", env or {})
        agents.append(agent)
        if wait:
            agent.wait_registered()
        return agent

    yield start
    for agent in agents:
        backends = child_pids(agent.pid)
        agent.stop()
        print(f"--- agent {agent.address} log ---\n{agent.log()}")
        for pid in backends:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"backend {pid} outlived agent {agent.pid}")


@pytest.fixture
def agent(control_plane: FakeControlPlane, start_agent: Callable[..., AgentProcess]) -> AgentProcess:
    """A registered agent with two replica slots per model."""
    return start_agent(control_plane, "--max-replicas-per-model", "2")
