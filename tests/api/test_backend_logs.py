"""`/api/nodes/{id}/backend-logs*` (SCENARIOS 63-64) against a real agent registered with the real control
plane, and the error path when the agent cannot be reached."""

from __future__ import annotations

import pytest

from tests.api.conftest import bearer_client
from tests.conftest import agent_ready, wait_until
from tests.factories import NodeFactory

pytestmark = pytest.mark.django_db


def test_unreachable_agent_is_502_with_the_error_shape(api):
    for address in ("127.0.0.1:1", ""):
        node = NodeFactory(address=address)
        for url in (f"/api/nodes/{node.id}/backend-logs", f"/api/nodes/{node.id}/backend-logs/m%230"):
            response = api.get(url)
            assert response.status_code == 502, response.content
            assert set(response.json()) == {"error", "details"}


def test_bad_tail_is_400(api):
    node = NodeFactory(address="127.0.0.1:1")
    response = api.get(f"/api/nodes/{node.id}/backend-logs/m?tail=-1")
    assert response.status_code == 400 and "tail" in response.json()["details"]


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_keys_and_lines_from_a_real_agent(cp_server, start_agent):
    from nodes.apikeys import api_key_create
    from nodes.models import Node
    from nodes.tokens import node_token_for
    from tests.e2e.test_agent_control_plane import LiveControlPlane
    from worker_client.client import WorkerControlClient

    agent = start_agent(LiveControlPlane(cp_server.url), "--max-replicas-per-model", "2", wait=False)
    node = wait_until(
        lambda: Node.objects.filter(address=agent.address).first(), timeout=60, message="the node"
    )
    client = WorkerControlClient(agent.address, node_token_for(node), 30)
    wait_until(lambda: agent_ready(client), timeout=30, message="the agent's gRPC server")
    for model, index in (("model-a", 0), ("model-a", 1), ("model-b", 0)):
        client.load_replica(model, index, "echo", {"Model": model})
    api = bearer_client(api_key_create(name="ops", is_admin=True)[1])

    # SCENARIO 63
    response = api.get(f"/api/nodes/{node.id}/backend-logs")
    assert response.status_code == 200 and response.json() == ["model-a#0", "model-a#1", "model-b#0"]

    # SCENARIO 64
    own = api.get(f"/api/nodes/{node.id}/backend-logs/model-a%230").json()
    assert own and {line["process_key"] for line in own} == {"model-a#0"}
    assert set(own[0]) == {"timestamp", "stream", "text", "process_key"}
    assert own[0]["stream"] in ("stdout", "stderr")
    merged = api.get(f"/api/nodes/{node.id}/backend-logs/model-a").json()
    assert {line["process_key"] for line in merged} == {"model-a#0", "model-a#1"}
    assert [line["timestamp"] for line in merged] == sorted(line["timestamp"] for line in merged)
    assert api.get(f"/api/nodes/{node.id}/backend-logs/model-a?tail=1").json() == merged[-1:]
    assert api.get(f"/api/nodes/{node.id}/backend-logs/nothing%239").json() == []
