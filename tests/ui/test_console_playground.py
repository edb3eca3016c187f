"""The playground page and its gateway door (issue 17 item 2): a staff session with Django's CSRF token, never
anyone else; the catalog rendered by the server; body errors in OpenAI's shape."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from nodes.apikeys import api_key_create
from tests.factories import ModelConfigFactory

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "echo-x", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def post(client: Client, path: str, body: dict, **extra):
    return client.post(path, json.dumps(body), content_type="application/json", **extra)


def test_the_page_lists_the_catalog(staff_client: Client, django_assert_max_num_queries) -> None:
    ModelConfigFactory(name="echo-a")
    ModelConfigFactory(name="embed-b")
    # session, user, the catalog's names
    with django_assert_max_num_queries(3):
        html = staff_client.get("/ui/playground/").content.decode()
    assert '<option value="echo-a">echo-a</option>' in html
    assert '<option value="embed-b">embed-b</option>' in html
    assert '<label for="pg-model">Model</label>' in html and '<label for="pg-prompt"' in html
    for index in range(30):
        ModelConfigFactory(name=f"m-{index:02}")
    with django_assert_max_num_queries(3):
        assert staff_client.get("/ui/playground/").content.decode().count("<option value=") == 32


def test_no_model_no_send(staff_client: Client) -> None:
    html = staff_client.get("/ui/playground/").content.decode()
    assert "No model in the catalog" in html and 'id="pg-send" disabled' in html


@pytest.mark.parametrize("path", ["/ui/playground/chat", "/ui/playground/embeddings"])
def test_only_a_staff_session_with_its_csrf_token(client: Client, plain_client: Client, path: str) -> None:
    # Keys exist, so `/v1` is closed: the door must not be a way around them.
    _, raw = api_key_create(name="someone")
    ModelConfigFactory(name="echo-x")
    body = CHAT if path.endswith("chat") else {"model": "echo-x", "input": ["a", "b"]}
    anonymous = post(client, path, body)
    assert anonymous.status_code == 403 and anonymous.json()["error"]["code"] == "forbidden"
    # An API key is not a session: the page's door takes sessions only.
    keyed = post(client, path, body, HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert keyed.status_code == 403
    assert post(plain_client, path, body).status_code == 403
    staff = get_user_model().objects.create_user("csrf-ops", password="pw-ops-123", is_staff=True)
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(staff)
    refused = post(strict, path, body)  # a cross-site request: no CSRF token
    assert refused.status_code == 403 and b"CSRF" in refused.content
    assert Client().get(path).status_code == 405


def test_body_errors_in_openai_shape(staff_client: Client) -> None:
    ModelConfigFactory(name="echo-x")
    missing = post(staff_client, "/ui/playground/chat", {"model": "echo-x"})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_messages"
    unknown = post(staff_client, "/ui/playground/chat", {**CHAT, "model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    form = staff_client.post("/ui/playground/embeddings", {"model": "echo-x", "input": "a"})
    assert form.status_code == 415
