"""Real agents registered with the real control plane test server (`cp_server`), for the gateway tests.

Each agent is a `python -m worker_client.agent` subprocess on 127.0.0.1 with a free port; it registers over
HTTP with the control plane in the test process, and is approved through the registry service. Backends are
the bundled echo backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import ControlPlaneServer, agent_port, agent_ready, wait_until
from tests.e2e.conftest import child_pids

REPO_ROOT = Path(__file__).resolve().parents[2]


class RealAgent:
    """One agent process registered with `cp_server` under `name`."""

    def __init__(
        self,
        server: ControlPlaneServer,
        name: str,
        log_path: Path,
        args: list[str],
        state_dir: Path | None = None,
    ) -> None:
        """`state_dir`: where the agent keeps its node credential; by default one per name next to the log,
        so an agent started again under the same name comes back as the same node."""
        self.name = name
        self.state_dir = state_dir or log_path.parent / "agent-state" / name
        self.port = agent_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [
            sys.executable,
            "-m",
            "worker_client.agent",
            "--register-to",
            server.url,
            "--addr",
            self.address,
            "--node-name",
            name,
            "--heartbeat-interval",
            "1s",
            "--drain-timeout",
            "2s",
            "--state-dir",
            str(self.state_dir),
            *args,
        ]
        self.args = list(args)
        self.models_path = (
            Path(args[args.index("--models-path") + 1]) if "--models-path" in args else REPO_ROOT / "models"
        )
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ)
        )

    def node(self):
        from nodes.models import Node

        return Node.objects.filter(name=self.name).first()

    def client(self):
        from nodes.tokens import node_token_for
        from worker_client.client import WorkerControlClient

        return WorkerControlClient(self.address, node_token_for(self.node()), 30)

    def load_count(self, model: str) -> int:
        """How many times a backend of `model` on this agent answered `LoadModel` (one per LoadReplica)."""
        lines = self.client().get_logs(model)
        return sum(1 for line in lines if line.text.startswith("LoadModel"))

    def processes(self) -> list:
        return self.client().list_replicas()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        backends = child_pids(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        for pid in backends:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def approve_when_registered(name: str):
    """Waits for the node row, approves it (when pending) and answers it."""
    from nodes.choices import NodeStatus
    from nodes.models import Node
    from nodes.services import node_approve

    node = wait_until(
        lambda: Node.objects.filter(name=name).first(), timeout=60, message=f"{name} to register"
    )
    if node.status == NodeStatus.PENDING:
        node = node_approve(node=node)
    return node


@pytest.fixture(name="start_agents")
def start_agents_fixture(
    cp_server: ControlPlaneServer, tmp_path: Path
) -> Iterator[Callable[..., list[RealAgent]]]:
    """`start_agents(2, slots=2, vram="24GiB", labels="k=v", args=(...))`: registered, approved agents with
    echo backends (`args`: more agent flags, e.g. `--backends-config FILE`)."""
    agents: list[RealAgent] = []

    def start(
        count: int = 1,
        *,
        slots: int = 1,
        vram: str = "24GiB",
        labels: str = "",
        heartbeat_interval: str = "1s",
        args: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        own_models_path: bool = False,
    ) -> list[RealAgent]:
        """`args`/`extra_args`: more agent flags. `own_models_path`: each agent gets `--models-path <tmp>/<name>-models` (`agent.models_path`)."""
        started = []
        for _ in range(count):
            name = f"gw-{os.getpid()}-{len(agents)}"
            flags = ["--max-replicas-per-model", str(slots), "--vram", vram]
            flags += ["--heartbeat-interval", heartbeat_interval]  # after the default of 1 s: this one wins
            if labels:
                flags += ["--node-labels", labels]
            if own_models_path:
                flags += ["--models-path", str(tmp_path / f"{name}-models")]
            agent = RealAgent(cp_server, name, tmp_path / f"{name}.log", [*flags, *args, *extra_args])
            agents.append(agent)
            started.append(agent)
        for agent in started:
            approve_when_registered(agent.name)
            wait_until(
                lambda a=agent: agent_ready(a.client()), timeout=30, message=f"{agent.name} holding its token"
            )
        return started

    yield start
    for agent in agents:
        agent.stop()
    for agent in agents:
        print(f"--- agent {agent.name} log ---\n{agent.log()[-4000:]}")


def in_flight(model: str) -> list[int]:
    from nodes.models import ModelReplica

    return list(
        ModelReplica.objects.filter(model_name=model).order_by("id").values_list("in_flight", flat=True)
    )


def wait_in_flight_zero(model: str, timeout: float = 20) -> None:
    wait_until(
        lambda: all(value == 0 for value in in_flight(model)),
        timeout=timeout,
        message=f"in-flight of {model} back to 0 (now {in_flight(model)})",
    )


def predict_count(agent, model: str) -> int:
    """How many `Predict` calls the agent's backend of `model` logged (one per call that reached it)."""
    return sum(1 for line in agent.client().get_logs(model) if line.text.startswith("Predict"))


def place(model: str, count: int = 1) -> list:
    """Places `count` replicas of a catalog model through the real placement path."""
    from scheduling.services import replica_place

    return [replica_place(model_name=model) for _ in range(count)]
