"""Worker self-service API `/api/node/*` (CONTRACT §3.1, SCENARIOS 40–47)."""

from __future__ import annotations

import uuid

import pytest

from nodes import services
from nodes.choices import NodeStatus, ReplicaState
from nodes.models import Node
from nodes.tokens import backend_token_for
from tests.factories import NodeFactory, ReplicaFactory

pytestmark = pytest.mark.django_db
GiB = 1024**3


def auth(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def registered(register, name: str = "w1", **fields) -> tuple[str, str]:
    answer = register(name, **fields)
    assert answer.status_code in (200, 201), answer.json()
    return answer.json()["id"], answer.json()["node_token"]


def assert_error(answer, status: int, field: str | None = None) -> None:
    assert answer.status_code == status, answer.content
    body = answer.json()
    assert set(body) == {"error", "details"}
    assert isinstance(body["error"], str) and body["error"]
    if field is not None:
        assert field in body["details"], body


# --- registration ---------------------------------------------------------------------------------------


def test_registration_token_is_required_when_set(settings, register):
    settings.LOCALAI_REGISTRATION_TOKEN = "s3cret"
    assert register("a", token="s3cret").status_code == 201
    assert_error(register("b", token="wrong"), 401)
    assert_error(register("c"), 401)
    assert register("c").headers["WWW-Authenticate"].startswith("Bearer")


def test_registration_is_open_when_the_token_setting_is_empty(settings, register):
    settings.LOCALAI_REGISTRATION_TOKEN = ""
    assert register("a").status_code == 201


def test_register_answers_201_then_200_with_the_same_id(settings, register):
    settings.LOCALAI_HEARTBEAT_INTERVAL = 10
    first = register("w1")
    assert first.status_code == 201
    body = first.json()
    assert set(body) == {
        "id",
        "name",
        "status",
        "node_token",
        "max_replicas_per_model",
        "heartbeat_interval",
        "backend_token",
    }
    assert body["name"] == "w1"
    assert body["status"] == NodeStatus.PENDING
    assert body["max_replicas_per_model"] == 1
    assert body["heartbeat_interval"] == 10
    assert body["backend_token"] == backend_token_for(Node.objects.get(name="w1"))
    again = register("w1")
    assert again.status_code == 200
    assert again.json()["id"] == body["id"]


def test_register_answers_the_effective_cap(register):
    NodeFactory(name="w1", max_replicas_override=4)
    assert register("w1", max_replicas_per_model=2).json()["max_replicas_per_model"] == 4


def test_agent_node_registers_without_address(api):
    answer = api.post("/api/node/register", {"name": "a1", "node_type": "agent"}, format="json")
    assert answer.status_code == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"address": "127.0.0.1:1"}, "name"),
        ({"name": "", "address": "127.0.0.1:1"}, "name"),
        ({"name": "x" * 256, "address": "127.0.0.1:1"}, "name"),
        ({"name": 5, "address": "127.0.0.1:1"}, "name"),
        ({"name": "w"}, "address"),
        ({"name": "w", "node_type": "backend", "address": ""}, "address"),
        ({"name": "w", "address": "no-port"}, "address"),
        ({"name": "w", "address": "host:99999"}, "address"),
        ({"name": "w", "address": "127.0.0.1:1", "node_type": "invalid"}, "node_type"),
        ({"name": "w", "address": "127.0.0.1:1", "max_replicas_per_model": 0}, "max_replicas_per_model"),
        ({"name": "w", "address": "127.0.0.1:1", "max_replicas_per_model": -1}, "max_replicas_per_model"),
        ({"name": "w", "address": "127.0.0.1:1", "max_replicas_per_model": "2"}, "max_replicas_per_model"),
        ({"name": "w", "address": "127.0.0.1:1", "max_replicas_per_model": 2**31}, "max_replicas_per_model"),
        ({"name": "w", "address": "127.0.0.1:1", "total_vram": -1}, "total_vram"),
        ({"name": "w", "address": "127.0.0.1:1", "total_vram": 2**63}, "total_vram"),
        ({"name": "w", "address": "127.0.0.1:1", "total_vram": 1.5}, "total_vram"),
        ({"name": "w", "address": "127.0.0.1:1", "available_ram": True}, "available_ram"),
        ({"name": "w", "address": "127.0.0.1:1", "available_vram": None}, "available_vram"),
        ({"name": "w", "address": "127.0.0.1:1", "labels": ["a=b"]}, "labels"),
        ({"name": "w", "address": "127.0.0.1:1", "labels": {"a": 1}}, "labels"),
        ({"name": "w", "address": "127.0.0.1:1", "labels": {"a": {"b": "c"}}}, "labels"),
        ({"name": "w", "address": "127.0.0.1:1", "labels": {"k" * 256: "v"}}, "labels"),
        ({"name": "w", "address": "127.0.0.1:1", "labels": {"": "v"}}, "labels"),
        ({"name": "w", "address": "127.0.0.1:1", "replicas": "m#0"}, "replicas"),
        ({"name": "w", "address": "127.0.0.1:1", "replicas": [1]}, "replicas"),
        ({"name": "w", "address": "127.0.0.1:1", "gpu_vendor": "v" * 65}, "gpu_vendor"),
    ],
)
def test_register_refuses_invalid_bodies_naming_the_field(api, body, field):
    assert_error(api.post("/api/node/register", body, format="json"), 400, field)
    assert not Node.objects.exists()


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"name"', b"null", b"42"])
def test_register_refuses_bodies_that_are_not_a_json_object(api, raw):
    answer = api.post("/api/node/register", raw, content_type="application/json")
    assert_error(answer, 400)


def test_register_accepts_large_sizes_and_labels(api):
    body = {
        "name": "big",
        "address": "[::1]:50051",
        "total_vram": 2**63 - 1,
        "available_vram": 80 * GiB,
        "labels": {"zone": "z1", "rack": ""},
        "max_replicas_per_model": 8,
        "replicas": ["m#0"],
    }
    assert api.post("/api/node/register", body, format="json").status_code == 201


# --- node token -----------------------------------------------------------------------------------------

ROUTES = [
    ("post", "heartbeat"),
    ("post", "drain"),
    ("post", "deregister"),
    ("get", "models"),
]


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_node_routes_refuse_another_nodes_token_and_no_token(api, register, method, route):
    _, token_a = registered(register, "a")
    id_b, _ = registered(register, "b")
    call = getattr(api, method)
    assert_error(call(f"/api/node/{id_b}/{route}", {}, format="json", **auth(token_a)), 403)
    answer = call(f"/api/node/{id_b}/{route}", {}, format="json")
    assert_error(answer, 401)
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(call(f"/api/node/{id_b}/{route}", {}, format="json", **auth("made-up")), 401)


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_node_routes_answer_404_for_unknown_ids(api, register, method, route):
    _, token = registered(register, "a")
    call = getattr(api, method)
    for node_id in (uuid.uuid4(), "not-a-uuid"):
        assert_error(call(f"/api/node/{node_id}/{route}", {}, format="json", **auth(token)), 404)


def test_previous_token_is_refused_after_registering_again(api, register):
    node_id, old = registered(register, "w1")
    _, new = registered(register, "w1")
    assert_error(api.post(f"/api/node/{node_id}/heartbeat", {}, format="json", **auth(old)), 401)
    assert api.post(f"/api/node/{node_id}/heartbeat", {}, format="json", **auth(new)).status_code == 200


def test_heartbeat_of_an_admin_deleted_node_answers_404(api, register):
    node_id, token = registered(register, "w1")
    services.node_delete(node=Node.objects.get(pk=node_id))
    assert_error(api.post(f"/api/node/{node_id}/heartbeat", {}, format="json", **auth(token)), 404)


# --- heartbeat ------------------------------------------------------------------------------------------


def test_heartbeat_answers_status_effective_cap_and_orphans(api, register):
    node_id, token = registered(register, "w1")
    services.node_override_set(node=Node.objects.get(pk=node_id), value=4)
    body = {
        "available_vram": 8 * GiB,
        "total_vram": 10 * GiB,
        "available_ram": GiB,
        "total_ram": 2 * GiB,
        "gpu_vendor": "nvidia",
        "replicas": [{"key": "m#0", "address": "127.0.0.1:1", "state": "running"}],
    }
    answer = api.post(f"/api/node/{node_id}/heartbeat", body, format="json", **auth(token))
    assert answer.status_code == 200
    assert answer.json() == {
        "status": "pending",
        "max_replicas_per_model": 4,
        "orphans": ["m#0"],
        "send_replicas": True,  # an orphan: the agent lists its replicas again next time
    }
    assert Node.objects.get(pk=node_id).available_vram == 8 * GiB


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"available_vram": -1}, "available_vram"),
        ({"available_vram": "lots"}, "available_vram"),
        ({"total_vram": 2**64}, "total_vram"),
        ({"replicas": "m#0"}, "replicas"),
        ({"replicas": [{"address": "x"}]}, "replicas"),
        ({"replicas": [{"key": 5}]}, "replicas"),
        ({"replicas": [{"key": "m#0", "state": 1}]}, "replicas"),
        ({"replicas": [7]}, "replicas"),
        ({"gpu_vendor": ["nvidia"]}, "gpu_vendor"),
    ],
)
def test_heartbeat_refuses_invalid_bodies_naming_the_field(api, register, body, field):
    node_id, token = registered(register, "w1")
    assert_error(api.post(f"/api/node/{node_id}/heartbeat", body, format="json", **auth(token)), 400, field)


@pytest.mark.parametrize("raw", [b"{oops", b"[]", b"3"])
def test_heartbeat_refuses_bodies_that_are_not_a_json_object(api, register, raw):
    node_id, token = registered(register, "w1")
    answer = api.post(f"/api/node/{node_id}/heartbeat", raw, content_type="application/json", **auth(token))
    assert_error(answer, 400)


# --- drain, deregister, models ----------------------------------------------------------------------------


def test_worker_drain_answers_draining(api, register):
    node_id, token = registered(register, "w1")
    Node.objects.filter(pk=node_id).update(status=NodeStatus.HEALTHY, approved_at="2024-01-01T00:00:00Z")
    answer = api.post(f"/api/node/{node_id}/drain", **auth(token))
    assert answer.status_code == 200
    assert answer.json() == {"id": node_id, "status": "draining"}


def test_worker_drain_of_a_pending_node_answers_409(api, register):
    node_id, token = registered(register, "w1")
    assert_error(api.post(f"/api/node/{node_id}/drain", **auth(token)), 409)
    assert Node.objects.get(pk=node_id).status == NodeStatus.PENDING


def test_worker_deregister_answers_offline_and_keeps_the_node(api, register):
    node_id, token = registered(register, "w1")
    ReplicaFactory(node=Node.objects.get(pk=node_id))
    answer = api.post(f"/api/node/{node_id}/deregister", **auth(token))
    assert answer.status_code == 200
    assert answer.json() == {"id": node_id, "status": "offline"}
    node = Node.objects.get(pk=node_id)
    assert not node.replicas.exists()


def test_draining_node_sees_its_replicas_with_in_flight_counts(api, register):
    node_id, token = registered(register, "w1", max_replicas_per_model=2)
    node = Node.objects.get(pk=node_id)
    Node.objects.filter(pk=node_id).update(status=NodeStatus.DRAINING, approved_at="2024-01-01T00:00:00Z")
    ReplicaFactory(node=node, model_name="m", replica_index=0, in_flight=1, address="127.0.0.1:7")
    ReplicaFactory(node=node, model_name="m", replica_index=1, state=ReplicaState.LOADING)
    answer = api.get(f"/api/node/{node_id}/models", **auth(token))
    assert answer.status_code == 200
    rows = answer.json()
    assert [(row["model_name"], row["replica_index"], row["in_flight"]) for row in rows] == [
        ("m", 0, 1),
        ("m", 1, 0),
    ]
    assert {
        "id",
        "model_name",
        "replica_index",
        "state",
        "address",
        "in_flight",
        "last_used",
        "loaded_at",
        "backend",
    } <= set(rows[0])


def test_openapi_schema_documents_the_worker_routes(api):
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    register = schema["paths"]["/api/node/register"]["post"]
    assert {"200", "201", "400", "401"} <= set(register["responses"])
    heartbeat = schema["paths"]["/api/node/{node_id}/heartbeat"]["post"]
    assert {"200", "400", "401", "403", "404"} <= set(heartbeat["responses"])
    assert "orphans" in schema["components"]["schemas"]["HeartbeatResponse"]["properties"]
