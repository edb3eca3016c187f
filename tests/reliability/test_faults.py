"""Faults end to end with real agents and echo backends on loopback (QUALITY.md, "Faults"): a backend killed
mid-traffic costs only its own row, and an agent restart keeps what the admin set while its orphans are
stopped. (An agent killed outright is covered by tests/e2e/test_control_loops.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from nodes.choices import NodeStatus, ReplicaState
from nodes.models import ModelReplica, Node
from nodes.services import node_labels_merge, node_override_set
from scheduling.reconciler import reconcile_tick
from tests.conftest import agent_ready, wait_until
from tests.e2e.gateway_support import (  # noqa: F401
    RealAgent,
    approve_when_registered,
    place,
    start_agents_fixture,
    wait_in_flight_zero,
)
from tests.factories import ModelConfigFactory, RuleFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def chat(url: str, model: str, text: str = "hi") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


class Traffic:
    """Chat requests from a few threads until stopped; keeps every status code with its time."""

    def __init__(self, url: str, model: str, concurrency: int = 4) -> None:
        self.url, self.model, self.concurrency = url, model, concurrency
        self.answers: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(concurrency)
        self._lock = threading.Lock()

    def _run(self, worker: int) -> None:
        sent = 0
        while not self._stop.is_set():
            sent += 1
            try:
                answer = chat(self.url, self.model, f"w{worker} n{sent}")
                status, code = answer.status_code, answer.json().get("error", {}).get("code", "")
            except httpx.HTTPError as error:
                status, code = 0, type(error).__name__
            with self._lock:
                self.answers.append((time.monotonic(), status, code))

    def __enter__(self) -> Traffic:
        for worker in range(self.concurrency):
            self._pool.submit(self._run, worker)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)

    def since(self, moment: float) -> Counter:
        with self._lock:
            return Counter(status for at, status, _ in self.answers if at >= moment)


def live(model: str):
    return ModelReplica.objects.filter(
        model_name=model, state__in=[ReplicaState.LOADING, ReplicaState.LOADED]
    )


def test_backend_killed_mid_traffic_costs_only_its_row_and_the_reconciler_restores_it(
    cp_server, start_agents
):
    a, b = start_agents(2, slots=2)
    ModelConfigFactory(name="kill-m", options={"options": ["delay_ms:20"]})
    RuleFactory(model_name="kill-m", min_replicas=3)
    assert len(reconcile_tick().placed) == 3  # two on one node, one on the other
    rows_before = {(r.node.name, r.replica_index): r.id for r in live("kill-m").select_related("node")}
    stacked = a if sum(name == a.name for name, _ in rows_before) == 2 else b
    pids = {p.process_key: p.pid for agent in (a, b) for p in agent.processes()}
    victim_pid = next(p.pid for p in stacked.processes() if p.process_key == "kill-m#1")

    with Traffic(cp_server.url, "kill-m") as traffic:
        wait_until(lambda: traffic.since(0)[200] >= 20, timeout=60, message="traffic flowing")
        killed_at = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        wait_until(
            lambda: not live("kill-m").filter(node__name=stacked.name, replica_index=1).exists(),
            timeout=30,
            message="the killed replica's row to go",
        )
        gone_at = time.monotonic()
        wait_until(lambda: traffic.since(gone_at)[200] >= 20, timeout=60, message="traffic after the removal")

    # Requests in flight on the killed backend may fail (502 in OpenAI's shape); nothing else does, and once
    # its row is gone every request is answered by the siblings.
    during = traffic.since(killed_at)
    assert set(during) <= {200, 502}, during
    assert during[502] <= traffic.concurrency, during
    after = traffic.since(gone_at + 0.5)
    assert set(after) == {200}, after
    assert {code for at, status, code in traffic.answers if status == 502} <= {"backend_error"}

    # Only that row went: the siblings are the same rows and the same processes.
    rows_now = {(r.node.name, r.replica_index): r.id for r in live("kill-m").select_related("node")}
    assert rows_now == {key: pk for key, pk in rows_before.items() if key != (stacked.name, 1)}
    survivors = {p.process_key: p.pid for agent in (a, b) for p in agent.processes()}
    assert all(survivors[key] == pid for key, pid in pids.items() if pid != victim_pid)
    wait_in_flight_zero("kill-m")

    report = reconcile_tick()
    assert len(report.placed) == 1, report
    wait_until(
        lambda: live("kill-m").filter(state=ReplicaState.LOADED).count() == 3,
        timeout=30,
        message="three loaded replicas again",
    )
    assert chat(cp_server.url, "kill-m").status_code == 200


def test_agent_restart_keeps_admin_labels_and_override_and_stops_orphans(cp_server, start_agents, tmp_path):
    (agent,) = start_agents(1, slots=1)
    node = agent.node()
    node_labels_merge(node=node, labels={"team": "search", "rack": "r7"})
    node_override_set(node=node, value=3)
    ModelConfigFactory(name="keep-m")

    agent.stop()  # SIGTERM: drain, stop backends, deregister
    wait_until(
        lambda: agent.node().status == NodeStatus.OFFLINE,
        timeout=30,
        message="the node offline after SIGTERM",
    )
    args = ["--max-replicas-per-model", "1", "--vram", "24GiB"]
    again = RealAgent(cp_server, agent.name, tmp_path / "again.log", args)
    try:
        wait_until(
            lambda: Node.objects.filter(name=agent.name, status=NodeStatus.HEALTHY).exists(),
            timeout=60,
            message="the agent to register again",
        )
        wait_until(
            lambda: agent_ready(again.client()), timeout=30, message="the restarted agent's gRPC server"
        )
        node_again = again.node()
        assert node_again.id == node.id  # the same node, still approved: no second approval needed
        labels = {label.key: label.value for label in node_again.labels.all()}
        assert labels["team"] == "search" and labels["rack"] == "r7"
        assert node_again.max_replicas_override == 3
        assert node_again.worker_max_replicas_per_model == 1
        assert node_again.effective_max_replicas == 3
        assert labels["node.replica-slots"] == "3"

        # A replica the control plane knows, and a process it has never heard of (a lost message).
        place("keep-m")
        kept_pid = next(p.pid for p in again.processes() if p.process_key == "keep-m#0")
        again.client().load_replica("ghost", 0, "echo", load_timeout=60)
        assert {p.process_key for p in again.processes()} == {"keep-m#0", "ghost#0"}
        wait_until(
            lambda: {p.process_key for p in again.processes()} == {"keep-m#0"},
            timeout=30,
            message="the orphan ghost#0 to be stopped",
        )
        assert "ghost#0: the control plane has no replica for it in two heartbeats" in again.log()
        assert next(p.pid for p in again.processes() if p.process_key == "keep-m#0") == kept_pid
        assert chat(cp_server.url, "keep-m").status_code == 200
        assert not ModelReplica.objects.filter(model_name="ghost").exists()
    finally:
        again.stop()
        print(f"--- restarted agent log ---\n{again.log()[-4000:]}")
