"""`/api/nodes/*` (CONTRACT §3.2, SCENARIOS 48-56)."""

from __future__ import annotations

import uuid

import pytest
from rest_framework.test import APIClient

from nodes.choices import LABEL_NODE_NAME, LABEL_REPLICA_SLOTS, NodeStatus, ReplicaState
from nodes.models import ModelReplica, Node, NodeLabel
from tests.factories import GiB, NodeFactory, NodeLabelFactory, ReplicaFactory

pytestmark = pytest.mark.django_db

NODE_FIELDS = {
    "id",
    "name",
    "node_type",
    "address",
    "status",
    "labels",
    "max_replicas_per_model",
    "max_replicas_per_model_manually_set",
    "worker_max_replicas_per_model",
    "total_vram",
    "available_vram",
    "reserved_vram",
    "total_ram",
    "available_ram",
    "gpu_vendor",
    "last_heartbeat",
    "model_count",
    "in_flight_count",
    "created_at",
}


def register(name: str, **extra) -> dict:
    body = {"name": name, "address": f"127.0.0.1:{50000 + len(name)}", "max_replicas_per_model": 2, **extra}
    response = APIClient().post("/api/node/register", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_list_empty_then_registered_nodes(api):
    # SCENARIO 48
    response = api.get("/api/nodes")
    assert response.status_code == 200 and response.json()["results"] == []
    register("alpha", total_vram=8 * GiB, available_vram=8 * GiB, labels={"env": "prod"})
    register("beta")
    nodes = {node["name"]: node for node in api.get("/api/nodes").json()["results"]}
    assert set(nodes) == {"alpha", "beta"}
    alpha = nodes["alpha"]
    assert set(alpha) >= NODE_FIELDS
    assert alpha["max_replicas_per_model"] == 2 and alpha["worker_max_replicas_per_model"] == 2
    assert alpha["max_replicas_per_model_manually_set"] is False
    assert alpha["reserved_vram"] == 0 and alpha["model_count"] == 0 and alpha["in_flight_count"] == 0
    assert alpha["labels"]["env"] == "prod" and alpha["labels"][LABEL_REPLICA_SLOTS] == "2"


def test_list_counts_replicas_and_in_flight_in_constant_queries(api, django_assert_max_num_queries):
    for i in range(6):
        node = NodeFactory(name=f"n{i}", max_replicas_override=3 if i % 2 else None, reserved_vram=i * GiB)
        NodeLabelFactory(node=node, key="env", value="prod")
        NodeLabelFactory(node=node, key="tier", value=str(i))
        for index in range(i % 3):
            ReplicaFactory(node=node, model_name="m", replica_index=index, in_flight=2)
    api.get("/api/nodes")  # the key's first use also stamps last_used_at
    # the key (1), the page's count (1), nodes with their counts (1), their labels (1): the same for any
    # number of nodes
    with django_assert_max_num_queries(4):
        response = api.get("/api/nodes")
    nodes = response.json()["results"]
    assert len(nodes) == 6
    assert [n["model_count"] for n in nodes] == [i % 3 for i in range(6)]
    assert [n["in_flight_count"] for n in nodes] == [2 * (i % 3) for i in range(6)]
    assert [n["max_replicas_per_model_manually_set"] for n in nodes] == [bool(i % 2) for i in range(6)]
    assert [n["reserved_vram"] for n in nodes] == [i * GiB for i in range(6)]
    assert all(n["labels"]["env"] == "prod" for n in nodes)


def test_detail(api):
    node = NodeFactory(worker_max_replicas_per_model=2)
    ReplicaFactory(node=node, in_flight=3)
    body = api.get(f"/api/nodes/{node.id}").json()
    assert body["id"] == str(node.id) and body["model_count"] == 1 and body["in_flight_count"] == 3


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("get", ""),
        ("delete", ""),
        ("post", "/approve"),
        ("post", "/drain"),
        ("post", "/resume"),
        ("get", "/models"),
        ("post", "/models/unload"),
        ("get", "/labels"),
        ("put", "/labels"),
        ("patch", "/labels"),
        ("delete", "/labels/env"),
        ("put", "/max-replicas-per-model"),
        ("delete", "/max-replicas-per-model"),
        ("get", "/backend-logs"),
        ("get", "/backend-logs/m%230"),
    ],
)
@pytest.mark.parametrize("node_id", [uuid.uuid4(), "not-a-uuid", "%00"])
def test_unknown_node_is_404(api, method, suffix, node_id):
    # SCENARIO 49 (and every other node route)
    body = {"value": 2} if "max" in suffix else {"model_name": "m"} if "unload" in suffix else {}
    response = getattr(api, method)(f"/api/nodes/{node_id}{suffix}", body, format="json")
    assert response.status_code == 404, response.content
    assert set(response.json()) == {"error", "details"}


def test_delete_removes_node_labels_and_replicas(api):
    node = NodeFactory(address="")
    NodeLabelFactory(node=node)
    ReplicaFactory(node=node)
    assert api.delete(f"/api/nodes/{node.id}").status_code == 204
    assert not Node.objects.exists() and not NodeLabel.objects.exists() and not ModelReplica.objects.exists()


def test_approve_pending_then_conflict(api):
    # SCENARIO 50
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    response = api.post(f"/api/nodes/{node.id}/approve")
    assert response.status_code == 200 and response.json()["status"] == "healthy"
    before = Node.objects.get(pk=node.pk)
    response = api.post(f"/api/nodes/{node.id}/approve")
    assert response.status_code == 409 and set(response.json()) == {"error", "details"}
    after = Node.objects.get(pk=node.pk)
    assert (after.status, after.approved_at) == (before.status, before.approved_at)


def test_resume_pending_is_409_and_stays_pending(api):
    # SCENARIO 51
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    assert api.post(f"/api/nodes/{node.id}/resume").status_code == 409
    node.refresh_from_db()
    assert node.status == NodeStatus.PENDING and node.approved_at is None


def test_drain_and_resume(api):
    node = NodeFactory()
    response = api.post(f"/api/nodes/{node.id}/drain")
    assert response.status_code == 200 and response.json()["status"] == "draining"
    response = api.post(f"/api/nodes/{node.id}/resume")
    assert response.status_code == 200 and response.json()["status"] == "healthy"
    assert api.post(f"/api/nodes/{node.id}/resume").status_code == 409


def test_models_list(api):
    node = NodeFactory()
    ReplicaFactory(node=node, model_name="org/m:v1", replica_index=1, in_flight=2)
    ReplicaFactory(node=node, model_name="org/m:v1", replica_index=0, state=ReplicaState.LOADING)
    ReplicaFactory(model_name="org/m:v1")  # another node
    rows = api.get(f"/api/nodes/{node.id}/models").json()
    assert [(r["model_name"], r["replica_index"], r["state"]) for r in rows] == [
        ("org/m:v1", 0, "loading"),
        ("org/m:v1", 1, "loaded"),
    ]
    assert set(rows[0]) >= {"id", "address", "in_flight", "last_used", "loaded_at", "backend"}


# --- unload --------------------------------------------------------------------------------------------


@pytest.fixture
def stopped(monkeypatch) -> list[tuple[str, str]]:
    """Process keys the agent was asked to stop, as (node name, key)."""
    calls: list[tuple[str, str]] = []

    def fake_stop(*, node, process_key):
        calls.append((node.name, process_key))
        return [process_key]

    monkeypatch.setattr("nodes.services.replica_stop_on_agent", fake_stop)
    return calls


def test_unload_one_replica_by_index(api, stopped, django_capture_on_commit_callbacks):
    # SCENARIO 53
    node = NodeFactory(worker_max_replicas_per_model=2)
    first = ReplicaFactory(node=node, replica_index=0)
    ReplicaFactory(node=node, replica_index=1)
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(
            f"/api/nodes/{node.id}/models/unload", {"model_name": "m", "replica_index": 1}, format="json"
        )
    assert response.status_code == 200 and response.json() == {"unloaded": ["m#1"]}
    assert list(ModelReplica.objects.values_list("id", flat=True)) == [first.id]
    assert stopped == [(node.name, "m#1")]


def test_unload_every_replica_of_the_model_on_that_node(api, stopped, django_capture_on_commit_callbacks):
    # SCENARIO 54
    node = NodeFactory(worker_max_replicas_per_model=2)
    ReplicaFactory(node=node, replica_index=0)
    ReplicaFactory(node=node, replica_index=1)
    ReplicaFactory(node=node, model_name="other")
    elsewhere = ReplicaFactory(replica_index=0)
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(f"/api/nodes/{node.id}/models/unload", {"model_name": "m"}, format="json")
    assert response.json() == {"unloaded": ["m#0", "m#1"]}
    assert sorted(stopped) == [(node.name, "m#0"), (node.name, "m#1")]
    assert set(ModelReplica.objects.values_list("model_name", "node_id")) == {
        ("other", node.id),
        ("m", elsewhere.node_id),
    }


def test_unload_unknown_replica_is_404_and_bad_body_400(api, stopped):
    node = NodeFactory()
    ReplicaFactory(node=node)
    url = f"/api/nodes/{node.id}/models/unload"
    assert api.post(url, {"model_name": "m", "replica_index": 3}, format="json").status_code == 404
    assert api.post(url, {"model_name": "nope"}, format="json").status_code == 404
    for body in (
        {},
        {"model_name": ""},
        {"model_name": "m", "replica_index": -1},
        {"model_name": 5},
        {"model_name": "m", "replica_index": "x"},
    ):
        response = api.post(url, body, format="json")
        assert response.status_code == 400, body
        assert response.json()["details"]
    assert stopped == [] and ModelReplica.objects.count() == 1


def test_unload_survives_an_unreachable_agent(api, django_capture_on_commit_callbacks):
    node = NodeFactory(address="127.0.0.1:1")
    ReplicaFactory(node=node)
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(f"/api/nodes/{node.id}/models/unload", {"model_name": "m"}, format="json")
    assert response.status_code == 200 and not ModelReplica.objects.exists()


# --- labels --------------------------------------------------------------------------------------------


def labelled_node() -> Node:
    node = NodeFactory(worker_max_replicas_per_model=2)
    NodeLabelFactory(node=node, key="env", value="dev")
    NodeLabelFactory(node=node, key="region", value="eu")
    NodeLabelFactory(node=node, key=LABEL_REPLICA_SLOTS, value="2")
    return node


def test_labels_get_patch_put_delete(api):
    node = labelled_node()
    url = f"/api/nodes/{node.id}/labels"
    assert api.get(url).json() == {"env": "dev", "region": "eu", LABEL_REPLICA_SLOTS: "2"}
    auto = {LABEL_REPLICA_SLOTS: "2", LABEL_NODE_NAME: node.name}  # writes refresh the auto-labels
    # SCENARIO 55
    response = api.patch(url, {"tier": "fast"}, format="json")
    assert response.status_code == 200
    assert response.json() == {"env": "dev", "region": "eu", "tier": "fast", **auto}
    # SCENARIO 19 through the API
    assert api.patch(url, {"env": "prod"}, format="json").json()["env"] == "prod"
    assert NodeLabel.objects.filter(node=node, key="env").count() == 1
    # SCENARIO 21
    response = api.put(url, {"new-a": "1", "new-b": "2"}, format="json")
    assert response.json() == {"new-a": "1", "new-b": "2", **auto}
    # SCENARIO 20
    response = api.delete(f"{url}/new-a")
    assert response.status_code == 200 and response.json() == {"new-b": "2", **auto}
    assert api.delete(f"{url}/new-a").status_code == 404


def test_label_keys_with_slashes_and_dots(api):
    node = NodeFactory()
    url = f"/api/nodes/{node.id}/labels"
    api.patch(url, {"topology.kubernetes.io/zone": "a"}, format="json")
    assert api.delete(f"{url}/topology.kubernetes.io/zone").status_code == 200
    assert "topology.kubernetes.io/zone" not in api.get(url).json()


def test_auto_labels_belong_to_their_owner(api):
    node = labelled_node()
    url = f"/api/nodes/{node.id}/labels"
    for method in ("put", "patch"):
        response = getattr(api, method)(url, {LABEL_REPLICA_SLOTS: "9"}, format="json")
        assert response.status_code == 400 and LABEL_REPLICA_SLOTS in response.json()["details"]
    assert api.delete(f"{url}/{LABEL_REPLICA_SLOTS}").status_code == 400
    # the current value round-trips (GET, edit, PUT back)
    labels = api.get(url).json() | {"tier": "gold"}
    assert api.put(url, labels, format="json").status_code == 200
    assert api.get(url).json()[LABEL_REPLICA_SLOTS] == "2"


@pytest.mark.parametrize(
    "body",
    [
        [],
        "x",
        {"": "v"},
        {"k": 1},
        {"k": None},
        {"k": {"a": "b"}},
        {"k" * 256: "v"},
        {"k": "v" * 256},
        {"k\x00": "v"},
        {"k": "v\x00"},
    ],
)
def test_labels_bad_bodies_are_400(api, body):
    node = NodeFactory()
    for method in ("put", "patch"):
        response = getattr(api, method)(f"/api/nodes/{node.id}/labels", body, format="json")
        assert response.status_code == 400, (method, body, response.content)
        assert set(response.json()) == {"error", "details"}


# --- capacity override ---------------------------------------------------------------------------------


def test_override_put_and_delete(api):
    # SCENARIO 56 and 29
    node = NodeFactory(worker_max_replicas_per_model=1)
    url = f"/api/nodes/{node.id}/max-replicas-per-model"
    for body in ({"value": 0}, {}, {"value": -1}, {"value": "x"}, {"value": 10**12}):
        response = api.put(url, body, format="json")
        assert response.status_code == 400 and "value" in response.json()["details"], body
    assert (
        api.put(f"/api/nodes/{uuid.uuid4()}/max-replicas-per-model", {"value": 4}, format="json").status_code
        == 404
    )
    response = api.put(url, {"value": 4}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["max_replicas_per_model"] == 4 and body["max_replicas_per_model_manually_set"] is True
    assert body["labels"][LABEL_REPLICA_SLOTS] == "4"
    body = api.delete(url).json()
    assert body["max_replicas_per_model"] == 1 and body["max_replicas_per_model_manually_set"] is False
    assert body["labels"][LABEL_REPLICA_SLOTS] == "1"


# --- bad input -----------------------------------------------------------------------------------------


def test_malformed_json_is_400(api):
    node = NodeFactory()
    for url in (f"/api/nodes/{node.id}/labels", f"/api/nodes/{node.id}/max-replicas-per-model"):
        response = api.put(url, "{not json", content_type="application/json")
        assert response.status_code == 400 and set(response.json()) == {"error", "details"}
