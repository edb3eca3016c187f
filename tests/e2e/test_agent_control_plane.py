"""A real agent against the real control plane's `/api/node/` (issue 3's "done when")."""

from __future__ import annotations

import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import GiB

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


class LiveControlPlane:
    """Where the agent registers; the test reads the outcome from the database, not through gRPC."""

    node_token = ""

    def __init__(self, url: str) -> None:
        self.url = url


def test_agent_shows_up_as_a_node_with_its_slots_label_and_heartbeats(cp_server, start_agent) -> None:
    from nodes.models import Node

    agent = start_agent(LiveControlPlane(cp_server.url), "--max-replicas-per-model", "2", wait=False)
    node = wait_until(
        lambda: Node.objects.filter(address=agent.address).first(), timeout=60, message="the node"
    )
    assert node.worker_max_replicas_per_model == 2 and node.total_vram == 24 * GiB
    assert node.labels.get(key="node.replica-slots").value == "2"
    first_beat = node.last_heartbeat
    wait_until(
        lambda: Node.objects.get(pk=node.pk).last_heartbeat not in (None, first_beat),
        timeout=30,
        message="a heartbeat",
    )
    assert agent.stop() == 0
