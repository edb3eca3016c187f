"""A node's name is not its identity; admin intent wins over the worker's word (issue 11, items 1 and 2).

Real agents register with the live control plane (`cp_server`); the attacks come from a second real agent
process and from a raw HTTP client, and the agent is killed with SIGKILL and started again.
"""

from __future__ import annotations

import os
import stat

import httpx
import pytest

from nodes.choices import NodeStatus
from nodes.models import ModelReplica, Node
from nodes.services import node_drain, node_labels_merge, node_resume
from nodes.tokens import backend_token_for
from tests.conftest import agent_ready, wait_until
from tests.e2e.gateway_support import RealAgent, place, start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory
from worker_client.client import backend_health

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
NAME_TAKEN = "is registered by another agent; delete it first or present its credential"
AGENT_ARGS = ["--max-replicas-per-model", "1", "--vram", "24GiB"]


def loaded(model: str) -> ModelReplica:
    return wait_until(
        lambda: ModelReplica.objects.filter(model_name=model, state="loaded").select_related("node").first(),
        timeout=60,
        message=f"a loaded replica of {model}",
    )


def test_a_second_agent_or_a_raw_client_cannot_take_an_approved_name(cp_server, start_agents, tmp_path):
    (agent,) = start_agents(1)
    node = agent.node()
    credential_file = agent.state_dir / "node-credential.json"
    assert stat.S_IMODE(credential_file.stat().st_mode) == 0o600
    before = Node.objects.get(pk=node.pk)

    impostor = RealAgent(cp_server, agent.name, tmp_path / "impostor.log", AGENT_ARGS, tmp_path / "impostor")
    try:
        wait_until(
            lambda: "is registered by another agent" in impostor.log(),
            timeout=60,
            message="the impostor to be refused",
        )
    finally:
        impostor.stop()

    attack = {"name": agent.name, "address": "127.0.0.1:9", "labels": {"owner": "evil"}}
    answer = httpx.post(f"{cp_server.url}/api/node/register", json=attack, timeout=30)
    assert answer.status_code == 409
    assert set(answer.json()) == {"error", "details"}
    assert answer.json()["error"] == f"node {agent.name} {NAME_TAKEN}"
    assert backend_token_for(before) not in answer.text and "backend_token" not in answer.text

    after = Node.objects.get(pk=node.pk)
    for field in ("address", "token_hash", "token_salt", "approved_at", "status", "credential_hash"):
        assert getattr(after, field) == getattr(before, field), field
    assert "owner" not in {label.key for label in after.labels.all()}
    assert agent_ready(agent.client())  # the real agent still holds the node's current token


def test_kill_9_and_restart_comes_back_as_the_same_approved_node_with_a_new_backend_token(
    cp_server, start_agents, tmp_path, settings
):
    settings.LOCALAI_AUTO_APPROVE_NODES = False
    (agent,) = start_agents(1)
    node = agent.node()
    approved_at = node.approved_at
    ModelConfigFactory(name="ident-m")
    place("ident-m")
    old = loaded("ident-m")
    old_token = backend_token_for(old.node)
    assert backend_health(old.address, old_token, timeout=5)

    agent.process.kill()  # kill -9: no drain, no deregister; its backends die with it
    agent.process.wait()
    again = RealAgent(cp_server, agent.name, tmp_path / "again.log", AGENT_ARGS, agent.state_dir)
    try:
        wait_until(
            lambda: Node.objects.filter(pk=node.pk, status=NodeStatus.HEALTHY).exclude(
                token_salt=node.token_salt
            ),
            timeout=60,
            message="the restarted agent to register again",
        )
        wait_until(
            lambda: agent_ready(again.client()), timeout=30, message="the restarted agent's gRPC server"
        )
        restarted = Node.objects.get(name=agent.name)
        assert restarted.pk == node.pk and restarted.approved_at == approved_at
        assert Node.objects.count() == 1

        place("ident-m")
        new = loaded("ident-m")
        new_token = backend_token_for(new.node)
        assert new_token != old_token
        assert backend_health(new.address, new_token, timeout=5)
        assert not backend_health(new.address, old_token, timeout=5)  # the old backend token is refused
    finally:
        again.stop()


def test_an_agent_registering_again_without_restart_restarts_its_backends(cp_server, start_agents):
    (agent,) = start_agents(1)
    ModelConfigFactory(name="rereg-m")
    place("rereg-m")
    old = loaded("rereg-m")
    old_token = backend_token_for(old.node)
    old_pid = {p.process_key: p.pid for p in agent.processes()}["rereg-m#0"]
    # Revoke the node token: the agent's next heartbeat gets 401 and it registers again, alive.
    Node.objects.filter(pk=old.node_id).update(token_hash="revoked")
    wait_until(
        lambda: Node.objects.filter(pk=old.node_id).exclude(token_hash="revoked").exists(),
        timeout=30,
        message="the agent to register again",
    )
    assert not ModelReplica.objects.filter(node_id=old.node_id).exists()  # rows of old-token backends go
    # The control plane commits the new registration before the agent has read its answer: until then the
    # agent still holds its old node token and refuses the new one.
    wait_until(
        lambda: agent_ready(agent.client()), timeout=30, message="the agent to take its new node token"
    )
    wait_until(lambda: not agent.processes(), timeout=30, message="its old backends stopped")
    assert not any(p.pid == old_pid for p in agent.processes())

    place("rereg-m")
    new = loaded("rereg-m")
    assert backend_health(new.address, backend_token_for(new.node), timeout=5)
    assert not backend_health(new.address, old_token, timeout=5)


def test_admin_drain_and_admin_labels_survive_the_agents_restart(cp_server, start_agents, tmp_path):
    (agent,) = start_agents(1, labels="tier=bronze,zone=z1")
    node = agent.node()
    node_labels_merge(node=node, labels={"tier": "gold"})
    node_drain(node=node)
    agent.stop()  # SIGTERM: the agent's own drain and deregistration
    wait_until(lambda: agent.node().status == NodeStatus.OFFLINE, timeout=30, message="offline")

    again = RealAgent(
        cp_server,
        agent.name,
        tmp_path / "again.log",
        [*AGENT_ARGS, "--node-labels", "tier=silver,zone=z2"],
        agent.state_dir,
    )
    try:
        wait_until(
            lambda: Node.objects.filter(pk=node.pk, labels__key="zone", labels__value="z2").exists(),
            timeout=60,
            message="the agent to register again",
        )
        restarted = Node.objects.get(pk=node.pk)
        assert restarted.status == NodeStatus.DRAINING  # the admin's drain outlived the restart
        labels = {label.key: (label.value, label.source) for label in restarted.labels.all()}
        assert labels["tier"] == ("gold", "admin")
        assert labels["zone"] == ("z2", "worker")
        assert labels["node.name"] == (agent.name, "auto")

        from nodes.apikeys import api_key_create

        key = api_key_create(name="ops", is_admin=True)[1]
        detail = httpx.get(
            f"{cp_server.url}/api/nodes/{node.pk}", headers={"Authorization": f"Bearer {key}"}, timeout=30
        ).json()
        assert detail["labels"]["tier"] == "gold"
        assert detail["label_sources"]["tier"] == "admin"
        assert detail["label_sources"]["zone"] == "worker"
        assert detail["label_sources"]["node.replica-slots"] == "auto"
        assert detail["status"] == "draining"

        node_resume(node=restarted)
        again.stop()
        wait_until(lambda: agent.node().status == NodeStatus.OFFLINE, timeout=30, message="offline again")
        assert not Node.objects.get(pk=node.pk).drained_by_admin
    finally:
        again.stop()
    assert os.path.exists(agent.state_dir / "node-credential.json")
