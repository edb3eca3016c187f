"""Who may call the admin API, and API keys themselves."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from nodes.apikeys import api_key_authenticate, api_key_create, api_key_hash, api_key_revoke, api_keys_exist
from nodes.models import ApiKey
from tests.api.conftest import bearer_client

pytestmark = pytest.mark.django_db

ADMIN_ROUTES = ["/api/nodes", "/api/models", "/api/nodes/scheduling"]


@pytest.mark.parametrize("url", ADMIN_ROUTES)
def test_staff_session_and_admin_key_allowed_others_refused(
    url, staff_client, api, user_client, inference_client, node_token_client
):
    # SCENARIO 52, plus the node token and every admin list route.
    assert staff_client.get(url).status_code == 200
    assert api.get(url).status_code == 200
    for client in (user_client, inference_client, node_token_client):
        response = client.get(url)
        assert response.status_code == 403
        assert set(response.json()) == {"error", "details"}
    anonymous = APIClient().get(url)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]
    assert anonymous["WWW-Authenticate"].startswith("Bearer")


def test_unknown_malformed_and_revoked_keys_are_401(admin_key):
    assert bearer_client("lac_not-a-key").get("/api/nodes").status_code == 401
    malformed = APIClient()
    malformed.credentials(HTTP_AUTHORIZATION="Bearer two words")
    assert malformed.get("/api/nodes").status_code == 401
    api_key_revoke(api_key=ApiKey.objects.get())
    response = bearer_client(admin_key).get("/api/nodes")
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]


def test_session_writes_need_csrf(staff_client):
    body = {"model_name": "m"}
    assert staff_client.post("/api/nodes/scheduling", body, format="json").status_code == 403
    staff_client.get("/api/nodes")  # a page view sets the CSRF cookie in a browser; here take it directly
    from django.middleware.csrf import _get_new_csrf_string

    token = _get_new_csrf_string()
    staff_client.cookies["csrftoken"] = token
    response = staff_client.post("/api/nodes/scheduling", body, format="json", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 200


def test_keys_are_stored_hashed_and_authenticate():
    assert not api_keys_exist()
    api_key, raw = api_key_create(name="x")
    assert raw.startswith("lac_") and len(raw) > 40
    assert api_key.key_hash == api_key_hash(raw) and raw not in api_key.key_hash
    assert api_key.prefix == raw[:8]
    assert api_keys_exist()
    assert api_key_authenticate(raw) == api_key
    assert ApiKey.objects.get().last_used_at is not None
    assert api_key_authenticate(raw + "x") is None
    api_key_revoke(api_key=api_key)
    assert api_key_authenticate(raw) is None
    assert api_keys_exist()  # a revoked key still closes the gateway


def test_create_api_key_prints_the_key_once_on_its_last_line():
    out = io.StringIO()
    call_command("create_api_key", "--name", "ci", "--admin", stdout=out, stderr=io.StringIO())
    raw = out.getvalue().strip().splitlines()[-1]
    key = ApiKey.objects.get()
    assert key.is_admin and key.name == "ci" and key.key_hash == api_key_hash(raw)
    assert bearer_client(raw).get("/api/nodes").status_code == 200

    out = io.StringIO()
    call_command("create_api_key", "--name", "app", stdout=out, stderr=io.StringIO())
    inference = out.getvalue().strip().splitlines()[-1]
    assert not ApiKey.objects.get(name="app").is_admin
    assert bearer_client(inference).get("/api/nodes").status_code == 403


def test_last_used_is_refreshed_lazily(admin_key):
    ApiKey.objects.update(last_used_at=timezone.now() - timezone.timedelta(hours=1))
    bearer_client(admin_key).get("/api/nodes")
    assert timezone.now() - ApiKey.objects.get().last_used_at < timezone.timedelta(minutes=1)
