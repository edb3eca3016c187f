"""Read replicas (issue 16): with a `replica` alias, the pages, the `/api/nodes` lists and the `/metrics`
gauges read from it; the claim, the reconciler and every write stay on the primary. The alias here is a
second, separate connection to the same test database, so each statement is seen on the alias it used."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from django.conf import settings
from django.db import connections
from django.test.utils import CaptureQueriesContext

from localai_cluster.db_router import REPLICA, replica_reads
from nodes.choices import NodeStatus
from nodes.models import Node
from scheduling.pipeline import replica_claim
from scheduling.reconciler import reconcile_tick
from tests.api.conftest import give_token
from tests.factories import ModelConfigFactory, NodeFactory, ReplicaFactory, RuleFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def replica() -> Iterator[None]:
    """A `replica` alias on the test database (what `DATABASE_REPLICA_URL` configures), removed after."""
    default = connections.settings["default"]
    options = {key: value for key, value in default["OPTIONS"].items() if key != "pool"}
    settings.DATABASES[REPLICA] = {**default, "OPTIONS": options}
    try:
        # Connected here, as a test case does for the aliases it declares (this one is added at run time).
        connections[REPLICA].connect()
        yield
    finally:
        connections[REPLICA].close()
        del connections[REPLICA]
        del settings.DATABASES[REPLICA]


class Statements:
    """The statements each alias ran inside the block, by the table they name."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.primary = CaptureQueriesContext(connections["default"])
        self.replica = CaptureQueriesContext(connections[REPLICA])

    def __enter__(self) -> Statements:
        self._stack.enter_context(self.primary)
        self._stack.enter_context(self.replica)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @staticmethod
    def _naming(captured: CaptureQueriesContext, table: str) -> list[str]:
        return [q["sql"] for q in captured.captured_queries if f'"{table}"' in q["sql"]]

    def on_primary(self, table: str) -> list[str]:
        return self._naming(self.primary, table)

    def on_replica(self, table: str) -> list[str]:
        return self._naming(self.replica, table)


def test_the_nodes_list_reads_the_replica(replica, api):
    NodeFactory(name="n1")
    with Statements() as seen:
        answer = api.get("/api/nodes")
    assert answer.status_code == 200
    assert [node["name"] for node in answer.json()["results"]] == ["n1"]
    assert seen.on_replica("nodes_node")
    assert not seen.on_primary("nodes_node")
    assert seen.on_primary("nodes_apikey")  # the key is checked on the primary (a new key works at once)


def test_the_metrics_gauges_read_the_replica(replica, client):
    NodeFactory(name="n1")
    with Statements() as seen:
        answer = client.get("/metrics")
    assert answer.status_code == 200
    assert b'localai_cluster_node_vram_total_bytes{node="n1"}' in answer.content
    assert seen.on_replica("nodes_node") and seen.on_replica("nodes_modelreplica")
    assert not seen.on_primary("nodes_node")


def test_a_page_reads_the_replica_and_its_form_writes_the_primary(replica, staff_client):
    node = NodeFactory(name="n1", status=NodeStatus.PENDING, approved_at=None)
    with Statements() as seen:
        assert staff_client.get("/ui/nodes/").status_code == 200
    assert seen.on_replica("nodes_node")
    assert not seen.on_primary("nodes_node")
    assert seen.on_primary("auth_user")  # who is logged in is never read from a lagging copy

    csrf = staff_client.get("/ui/nodes/").cookies["csrftoken"].value
    with Statements() as seen:
        answer = staff_client.post(f"/ui/nodes/{node.pk}/approve", HTTP_X_CSRFTOKEN=csrf)
    assert answer.status_code in (200, 302)
    assert Node.objects.get(pk=node.pk).status == NodeStatus.HEALTHY
    assert seen.on_primary("nodes_node")
    assert not seen.on_replica("nodes_node")


def test_the_reconciler_and_the_claim_never_read_the_replica(replica):
    ModelConfigFactory(name="m")
    RuleFactory(model_name="m", min_replicas=1)
    node = NodeFactory(name="n1")
    with replica_reads(), Statements() as seen:
        reconcile_tick()
        claim = replica_claim(node_id=node.pk, model_name="other")
    assert claim.replica is not None
    assert seen.replica.captured_queries == []
    assert seen.on_primary("nodes_node") and seen.on_primary("scheduling_schedulingrule")


def test_a_heartbeat_writes_and_reads_the_primary(replica, client):
    node = NodeFactory(name="n1")
    ReplicaFactory(node=node, model_name="m")
    token = give_token(node)
    with Statements() as seen:
        answer = client.post(
            f"/api/node/{node.pk}/heartbeat",
            {"replicas": ["m#0"]},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )
    assert answer.status_code == 200, answer.content
    assert seen.replica.captured_queries == []


def test_without_a_replica_every_read_is_the_primary(api):
    NodeFactory(name="n1")
    assert REPLICA not in settings.DATABASES
    with CaptureQueriesContext(connections["default"]) as primary:
        assert api.get("/api/nodes").status_code == 200
    assert any('"nodes_node"' in q["sql"] for q in primary.captured_queries)
