"""`LOCALAI_EXPOSE_ROUTING_HEADERS` (issue 13 item 4): `/v1` answers name the node and replica that served them,
only when turned on. Real control plane, agent and echo backend."""

from __future__ import annotations

import httpx
import pytest

from nodes.models import ModelReplica
from tests.e2e.gateway_support import start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_routing_headers_only_when_turned_on(cp_server, start_agents, settings):
    start_agents(1)
    ModelConfigFactory(name="echo-h")
    chat = {"model": "echo-h", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    off = httpx.post(f"{cp_server.url}/v1/chat/completions", json=chat, timeout=60)
    assert off.status_code == 200
    assert "x-localai-node" not in off.headers and "x-localai-replica" not in off.headers

    settings.LOCALAI_EXPOSE_ROUTING_HEADERS = True
    replica = ModelReplica.objects.select_related("node").get(model_name="echo-h")
    on = httpx.post(f"{cp_server.url}/v1/chat/completions", json=chat, timeout=60)
    assert on.status_code == 200
    assert on.headers["x-localai-node"] == replica.node.name
    assert on.headers["x-localai-replica"] == "echo-h#0"
    embeddings = httpx.post(
        f"{cp_server.url}/v1/embeddings", json={"model": "echo-h", "input": "a"}, timeout=60
    )
    assert embeddings.headers["x-localai-replica"] == "echo-h#0"
    with httpx.stream(
        "POST",
        f"{cp_server.url}/v1/completions",
        json={"model": "echo-h", "prompt": "a", "stream": True},
        timeout=60,
    ) as stream:
        assert stream.headers["x-localai-node"] == replica.node.name
        assert stream.read().endswith(b"data: [DONE]\n\n")


def test_the_503_no_capacity_message_names_each_nodes_verdict(cp_server, start_agents):
    from nodes.models import Node
    from scheduling.models import PlacementDecision
    from tests.factories import RuleFactory

    start_agents(1)
    ModelConfigFactory(name="echo-x")
    RuleFactory(model_name="echo-x", node_selector={"gpu": "a100"})
    chat = {"model": "echo-x", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(f"{cp_server.url}/v1/chat/completions", json=chat, timeout=60)
    assert answer.status_code == 503
    error = answer.json()["error"]
    node = Node.objects.get()
    assert error["code"] == "no_capacity"
    assert (
        error["message"]
        == f"cannot place echo-x: no node matches the selector ({node.name}: selector gpu=a100 missing)"
    )
    record = PlacementDecision.objects.get()
    assert (record.trigger, record.outcome, record.message) == ("request", "no_capacity", error["message"])
