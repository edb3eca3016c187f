"""The worker API under attack (issue 11, items 1 and 3): a known name without its proof gets 409 in the
API's error shape and changes nothing; the backend token is answered to the node's own registration only;
labels, names and process keys are bounded and clean, refused with 400 in `{error, details}`, never a 5xx."""

from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from nodes import services
from nodes.models import Node, NodeLabel
from nodes.tokens import backend_token_for
from tests.factories import TEST_CREDENTIAL

pytestmark = pytest.mark.django_db
NAME_TAKEN = "node w1 is registered by another agent; delete it first or present its credential"


def assert_error(answer, status: int, field: str | None = None) -> dict:
    assert answer.status_code == status, answer.content[:500]
    body = answer.json()
    assert set(body) == {"error", "details"}
    if field is not None:
        assert field in body["details"], body
    return body


def post_raw(api: APIClient, path: str, body: str, **headers):
    """A JSON body as text, so it can carry escapes (`\\ud800`, `\\u0000`) a dict could not hold."""
    return api.post(path, body, content_type="application/json", **headers)


def test_stealing_a_registered_name_answers_409_and_leaks_nothing(settings, api, register):
    settings.LOCALAI_REGISTRATION_TOKEN = "reg-secret"
    settings.LOCALAI_AUTO_APPROVE_NODES = False
    first = register("w1", token="reg-secret", address="10.0.0.1:50051", labels={"zone": "a"})
    assert first.status_code == 201
    node = Node.objects.get(name="w1")
    services.node_approve(node=node)
    node.refresh_from_db()
    backend_token = backend_token_for(node)
    attack = {"name": "w1", "address": "6.6.6.6:50051", "labels": {"zone": "evil"}}
    answer = api.post("/api/node/register", attack, format="json", HTTP_AUTHORIZATION="Bearer reg-secret")
    body = assert_error(answer, 409)
    assert body["error"] == NAME_TAKEN
    assert backend_token not in answer.content.decode()
    after = Node.objects.get(name="w1")
    assert (after.address, after.token_hash, after.token_salt) == (
        node.address,
        node.token_hash,
        node.token_salt,
    )
    assert after.approved_at == node.approved_at
    assert dict(NodeLabel.objects.filter(node=after).values_list("key", "value"))["zone"] == "a"


def test_backend_token_is_answered_only_to_the_registration(settings, register):
    from nodes.apikeys import api_key_create
    from tests.api.conftest import bearer_client

    answer = register("w1")
    node = Node.objects.get(name="w1")
    assert answer.json()["backend_token"] == backend_token_for(node)
    admin = bearer_client(api_key_create(name="ops", is_admin=True)[1])
    for path in (f"/api/nodes/{node.pk}", "/api/nodes", f"/api/nodes/{node.pk}/labels"):
        shown = admin.get(path)
        assert shown.status_code == 200
        assert backend_token_for(node) not in shown.content.decode()
        assert answer.json()["node_token"] not in shown.content.decode()


def test_registration_answer_carries_a_new_backend_token_each_time(register):
    first = register("w1").json()["backend_token"]
    second = register("w1").json()["backend_token"]
    assert first != second


def test_a_hundred_thousand_labels_are_refused(api):
    labels = {f"k{i}": "v" for i in range(100_000)}
    answer = api.post(
        "/api/node/register",
        {"name": "w1", "address": "127.0.0.1:1", "labels": labels},
        format="json",
    )
    assert_error(answer, 400, "labels")
    assert not Node.objects.exists()


def test_256_labels_are_accepted_and_257_refused(api):
    body = {"name": "w1", "address": "127.0.0.1:1", "node_credential": TEST_CREDENTIAL}
    labels = {f"k{i}": "v" for i in range(257)}
    assert_error(api.post("/api/node/register", {**body, "labels": labels}, format="json"), 400, "labels")
    labels.pop("k0")
    assert api.post("/api/node/register", {**body, "labels": labels}, format="json").status_code == 201


@pytest.mark.parametrize(
    "fields, field",
    [
        ('"name": "w1\\nINFO forged line"', "name"),
        ('"name": "w1\\r"', "name"),
        ('"name": "w\\u0000"', "name"),
        ('"name": "w\\ud800"', "name"),
        ('"name": "w\\u2028x"', "name"),
        ('"name": "w\\u202ex"', "name"),
        ('"labels": {"a\\nb": "v"}', "labels"),
        ('"labels": {"a\\u0000": "v"}', "labels"),
        ('"labels": {"a\\udfff": "v"}', "labels"),
        ('"labels": {"a": "v\\u0000"}', "labels"),
        ('"labels": {"a": "\\ud800"}', "labels"),
        ('"labels": {"a": "x\\ny"}', "labels"),
        ('"replicas": ["m#0\\u0000"]', "replicas"),
        ('"replicas": ["m\\ud800#0"]', "replicas"),
        ('"replicas": ["m\\n#0"]', "replicas"),
        ('"gpu_vendor": "nv\\u0000"', "gpu_vendor"),
        ('"gpu_vendor": "\\udc80"', "gpu_vendor"),
        ('"node_credential": "\\ud800' + "x" * 40 + '"', "node_credential"),
        ('"node_token": "\\u0000"', "node_token"),
        ('"replicas": [' + ",".join(['"m#0"'] * 5000) + "]", "replicas"),
    ],
)
def test_register_refuses_bad_text_with_400(api, fields, field):
    base = '"address": "127.0.0.1:1"' + ("" if '"name"' in fields else ', "name": "w1"')
    assert_error(post_raw(api, "/api/node/register", "{" + base + ", " + fields + "}"), 400, field)
    assert not Node.objects.exists()


@pytest.mark.parametrize(
    "replicas",
    [
        '[{"key": "m#0\\u0000"}]',
        '[{"key": "m\\ud800#0"}]',
        '[{"key": "m\\n#0"}]',
        '[{"key": "m#0", "address": "\\u0000"}]',
        '[{"key": "m#0", "state": "\\udfff"}]',
        '["m#0\\r\\nINFO forged"]',
        "[" + ",".join(['"m#0"'] * 5000) + "]",
    ],
)
def test_heartbeat_refuses_bad_replica_keys_with_400(api, register, replicas):
    answer = register("w1").json()
    heartbeat = post_raw(
        api,
        f"/api/node/{answer['id']}/heartbeat",
        '{"replicas": ' + replicas + "}",
        HTTP_AUTHORIZATION=f"Bearer {answer['node_token']}",
    )
    assert_error(heartbeat, 400, "replicas")


def test_heartbeat_refuses_a_nul_vendor(api, register):
    answer = register("w1").json()
    heartbeat = post_raw(
        api,
        f"/api/node/{answer['id']}/heartbeat",
        json.dumps({"gpu_vendor": "nv\x00"}),
        HTTP_AUTHORIZATION=f"Bearer {answer['node_token']}",
    )
    assert_error(heartbeat, 400, "gpu_vendor")


def test_a_name_with_unicode_letters_and_punctuation_is_fine(api):
    body = {"name": "gpu-01.é_ü/rack:3", "address": "127.0.0.1:1"}
    assert api.post("/api/node/register", body, format="json").status_code == 201
