"""The OpenAPI schema is valid, and a schema-driven fuzz run (schemathesis) finds no 5xx."""

from __future__ import annotations

import io

import pytest
import schemathesis
from django.core.management import call_command
from hypothesis import HealthCheck, settings

from nodes.apikeys import api_key_create
from tests.factories import NodeFactory, ReplicaFactory, RuleFactory

pytestmark = pytest.mark.django_db


def test_schema_generates_without_warnings(tmp_path):
    call_command(
        "spectacular",
        "--validate",
        "--fail-on-warn",
        "--file",
        str(tmp_path / "schema.yaml"),
        stderr=io.StringIO(),
    )
    text = (tmp_path / "schema.yaml").read_text()
    for route in (
        "/api/nodes/{node_id}/models/unload",
        "/api/nodes/scheduling/{model_name}",
        "/api/models/{name}",
    ):
        assert route in text


@pytest.fixture
def web_schema(db):
    """The schema, loaded through the WSGI app. As Django's test client does, requests must not close the
    database connection: the test's transaction lives on it."""
    from django.core import signals
    from django.core.wsgi import get_wsgi_application
    from django.db import close_old_connections

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def fuzz_world(db) -> dict:
    """An admin key and some objects, so generated requests also hit existing ones."""
    node = NodeFactory(address="")  # no agent: log routes answer 502, stops are skipped
    ReplicaFactory(node=node, model_name="m")
    RuleFactory(model_name="m", min_replicas=1)
    return {"key": api_key_create(name="fuzz", is_admin=True)[1], "node_id": str(node.id)}


schema = schemathesis.pytest.from_fixture("web_schema")


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case, fuzz_world):
    if case.path_parameters and "node_id" in case.path_parameters and len(str(case.body)) % 2:
        case.path_parameters["node_id"] = fuzz_world["node_id"]  # about half the time, a node that exists
    response = case.call(headers={"Authorization": f"Bearer {fuzz_world['key']}"})
    agent_route = "backend-logs" in case.path
    assert response.status_code < 500 or (agent_route and response.status_code == 502), (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    )
    if response.status_code >= 400 and response.headers.get("Content-Type", "").startswith(
        "application/json"
    ):
        body = response.json()
        if case.path.startswith("/api/"):
            assert "error" in body, body


HOSTILE_BODIES = {
    "deep": "[" * 1000 + "]" * 1000,
    "deep-in-a-field": '{"name": ' + "[" * 900 + "]" * 900 + "}",
    "surrogate": '{"name": "a\\ud800", "model_name": "\\udfff", "labels": {"k\\ud800": "v"}, "value": "\\ud800"}',
    "nul": '{"name": "a\\u0000", "model_name": "m\\u0000", "labels": {"k": "v\\u0000"}, "value": "\\u0000"}',
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_BODIES))
def test_every_route_with_a_body_refuses_hostile_json_with_a_4xx(fuzz_world, kind):
    """Each POST/PUT/PATCH route of the schema, sent a 1,000-deep body or lone surrogates / NUL in its string
    fields: a 4xx in the `{"error", "details"}` shape, never a 5xx."""
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {fuzz_world['key']}")
    schema = client.get("/api/schema/", {"format": "json"}).json()
    sent = 0
    for route, operations in schema["paths"].items():
        for method, operation in operations.items():
            if "requestBody" not in operation:
                continue
            path = route.replace("{node_id}", fuzz_world["node_id"]).replace("{model_name}", "m")
            path = path.replace("{name}", "m").replace("{key}", "env").replace("{id}", fuzz_world["node_id"])
            response = getattr(client, method)(path, HOSTILE_BODIES[kind], content_type="application/json")
            assert 400 <= response.status_code < 500, f"{method} {path}: {response.status_code}"
            assert set(response.json()) == {"error", "details"}, f"{method} {path}: {response.content[:300]}"
            sent += 1
    assert sent >= 10
