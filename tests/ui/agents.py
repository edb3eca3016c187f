"""A real worker agent (with echo backends) whose node exists in the test database, so the control plane's
code that talks to agents (the logs consumer) is exercised end to end. The agent registers with the e2e suite's
fake control plane, told to hand out the node's real token (`node_token_for`)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodes.models import Node
from nodes.tokens import new_token_salt, node_token_for, token_hash
from tests.e2e.conftest import BACKEND_TOKEN, AgentProcess, FakeControlPlane, child_pids, is_alive
from tests.factories import NodeFactory
from worker_client.client import BackendClient, WorkerControlClient


class KnownTokenControlPlane(FakeControlPlane):
    """The fake control plane, handing out a given node token at registration."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def answer(self, call):
        status, body = super().answer(call)
        if call.path == "/api/node/register":
            with self.lock:
                self.node_tokens[-1] = self.token
            body = {**body, "node_token": self.token}
        return status, body


@dataclass
class AgentNode:
    """A node row and the agent process behind it."""

    node: Node
    agent: AgentProcess

    def client(self) -> WorkerControlClient:
        return self.agent.client()

    def load(self, model_name: str, replica_index: int) -> str:
        """Loads `model_name#replica_index` with the echo backend; answers the backend's address."""
        return self.client().load_replica(model_name, replica_index, "echo", {"Model": model_name}).address

    @staticmethod
    def predict(address: str, text: str) -> None:
        """One `Predict` to a backend: the echo backend logs a `Predict …` line. Runs its own event loop in a
        thread, so it may be called where a loop is running (Playwright's sync API keeps one)."""

        async def call() -> None:
            await BackendClient(address, BACKEND_TOKEN, timeout=30).predict(Prompt=text)

        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, call()).result(timeout=60)


@pytest.fixture
def start_agent_node(transactional_db, tmp_path: Path) -> Iterator[Callable[..., AgentNode]]:
    """`start_agent_node(**node_fields)`: a node row plus a real agent at its address, with its token."""
    started: list[tuple[AgentProcess, FakeControlPlane]] = []

    def start(**fields) -> AgentNode:
        node = NodeFactory(worker_max_replicas_per_model=2, token_salt=new_token_salt(), **fields)
        token = node_token_for(node)
        control_plane = KnownTokenControlPlane(token).start()
        agent = AgentProcess(
            control_plane,
            ["--vram", "24GiB", "--max-replicas-per-model", "2", "--heartbeat-interval", "5s"],
            tmp_path / f"agent-{len(started)}.log",
            {},
        )
        started.append((agent, control_plane))
        agent.wait_registered()
        Node.objects.filter(pk=node.pk).update(address=agent.address, token_hash=token_hash(token))
        node.refresh_from_db()
        return AgentNode(node=node, agent=agent)

    yield start
    for agent, control_plane in started:
        backends = child_pids(agent.pid)
        agent.stop()
        control_plane.stop()
        for pid in backends:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
