"""The API keys page `/ui/keys/` (issue 17 item 4): create (shown once), revoke (never delete), staff and CSRF
only, errors in the form, queries fixed whatever the number of keys."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from nodes.apikeys import api_key_authenticate, api_key_create, api_key_hash
from nodes.models import ApiKey
from tests.ui.conftest import HTMX

# `api_key_create` runs a durable transaction: these tests commit for real.
pytestmark = pytest.mark.django_db(transaction=True)


def toast_of(response) -> dict:
    return json.loads(response["HX-Trigger"])["toast"]


def raw_key_in(html: str) -> str:
    match = re.search(r'id="new-key"[^>]*value="(lac_[^"]+)"', html)
    assert match, "the new key is not shown"
    return match.group(1)


def test_create_shows_the_key_once_and_stores_only_its_hash(staff_client: Client) -> None:
    response = staff_client.post("/ui/keys/create", {"name": "chat-frontend", "scope": "inference"}, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    raw = raw_key_in(html)
    key = ApiKey.objects.get()
    assert key.name == "chat-frontend" and not key.is_admin
    assert key.key_hash == api_key_hash(raw) and raw not in key.prefix + key.key_hash
    assert 'data-copy="#new-key"' in html  # the copy button
    assert 'id="keys" class="table-wrap" aria-label="API keys" hx-swap-oob="true"' in html
    assert "created: copy it now" in toast_of(response)["message"]
    assert api_key_authenticate(raw) == key
    # Never again: the page lists the key by name and prefix only.
    page = staff_client.get("/ui/keys/").content.decode()
    assert "chat-frontend" in page and f"{key.prefix}…" in page and raw not in page


def test_admin_scope_and_the_plain_form_post(staff_client: Client) -> None:
    response = staff_client.post("/ui/keys/create", {"name": "ops-bot", "scope": "admin"})
    assert response.status_code == 200  # rendered, not redirected: the key must not travel in a redirect
    raw = raw_key_in(response.content.decode())
    assert ApiKey.objects.get(name="ops-bot").is_admin
    assert api_key_authenticate(raw).is_admin


@pytest.mark.parametrize(
    "data, error",
    [
        ({"name": "", "scope": "inference"}, "Give the key a name"),
        ({"name": "bad\x1bname", "scope": "inference"}, "Control characters are not allowed"),
        ({"name": "x" * 256, "scope": "inference"}, "at most 255 characters"),
        ({"name": "ok", "scope": "root"}, "Select a valid choice"),
    ],
)
def test_bad_input_is_reported_in_the_form(staff_client: Client, data, error) -> None:
    response = staff_client.post("/ui/keys/create", data, **HTMX)
    assert response.status_code == 422
    html = response.content.decode()
    assert '<form id="key-create"' in html and 'role="alert"' in html and error in html
    assert error in toast_of(response)["message"]
    assert not ApiKey.objects.exists()


def test_revoke_is_idempotent_and_the_key_stays_listed(staff_client: Client) -> None:
    key, raw = api_key_create(name="leaked")
    response = staff_client.post(f"/ui/keys/{key.pk}/revoke", **HTMX)
    assert response.status_code == 200
    assert toast_of(response)["message"] == "Key leaked revoked."
    key.refresh_from_db()
    first = key.revoked_at
    assert first is not None and api_key_authenticate(raw) is None
    html = response.content.decode()
    row = re.search(r'<tr data-key="leaked".*?</tr>', html, re.S).group(0)
    assert "revoked" in row and "Revoke" not in row  # no button on a revoked key
    again = staff_client.post(f"/ui/keys/{key.pk}/revoke", **HTMX)
    assert toast_of(again)["message"] == "Key leaked was already revoked."
    key.refresh_from_db()
    assert key.revoked_at == first
    assert ApiKey.objects.count() == 1
    missing = staff_client.post("/ui/keys/999999/revoke", **HTMX)
    assert missing.status_code == 404 and toast_of(missing)["level"] == "error"


def test_there_is_no_delete(staff_client: Client) -> None:
    key, _ = api_key_create(name="keep")
    assert staff_client.post(f"/ui/keys/{key.pk}/delete", **HTMX).status_code == 404
    html = staff_client.get("/ui/keys/").content.decode()
    assert not re.search(r"<button[^>]*>\s*Delete", html) and "/delete" not in html
    assert ApiKey.objects.filter(pk=key.pk).exists()


def test_staff_session_and_csrf_only(client: Client, plain_client: Client) -> None:
    key, _ = api_key_create(name="target")
    assert client.get("/ui/keys/").status_code == 302  # to the login page
    assert client.post("/ui/keys/create", {"name": "x", "scope": "admin"}).status_code == 302
    assert plain_client.get("/ui/keys/").status_code == 403
    assert plain_client.post("/ui/keys/create", {"name": "x", "scope": "admin"}).status_code == 403
    assert plain_client.post(f"/ui/keys/{key.pk}/revoke").status_code == 403
    # A staff session without the CSRF token (a cross-site form) is refused.
    staff = get_user_model().objects.create_user("csrf-ops", password="pw-ops-123", is_staff=True)
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(staff)
    assert strict.post("/ui/keys/create", {"name": "x", "scope": "admin"}).status_code == 403
    assert strict.post(f"/ui/keys/{key.pk}/revoke").status_code == 403
    assert ApiKey.objects.count() == 1
    key.refresh_from_db()
    assert key.revoked_at is None


def test_queries_fixed_in_the_number_of_keys(staff_client: Client, django_assert_max_num_queries) -> None:
    for index in range(2):
        api_key_create(name=f"k{index}")
    # session, user, the keys
    with django_assert_max_num_queries(3):
        staff_client.get("/ui/keys/")
    for index in range(2, 40):
        key, _ = api_key_create(name=f"k{index}", is_admin=index % 2 == 0)
        if index % 3 == 0:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=key.created_at)
    with django_assert_max_num_queries(3):
        assert staff_client.get("/ui/keys/").content.decode().count("<tr data-key=") == 40
    key = ApiKey.objects.first()
    # session, user, the key, its revocation (UPDATE and refresh), its audit entry, the keys; the revocation's
    # transaction is a savepoint pair inside the test's own transaction
    with django_assert_max_num_queries(9):
        staff_client.post(f"/ui/keys/{key.pk}/revoke", **HTMX)


def test_each_row_shows_name_scope_created_and_last_used(staff_client: Client) -> None:
    used, _ = api_key_create(name="used-key", is_admin=True)
    api_key_create(name="idle-key")
    stamp = timezone.make_aware(datetime(2026, 3, 4, 5, 6), timezone.get_current_timezone())
    ApiKey.objects.filter(pk=used.pk).update(created_at=stamp, last_used_at=stamp + timedelta(hours=1))
    html = staff_client.get("/ui/keys/").content.decode()

    def cell(name: str, label: str) -> str:
        row = html[html.index(f'<tr data-key="{name}"') :]
        row = row[: row.index("</tr>")]
        start = row.index(f'data-label="{label}">') + len(f'data-label="{label}">')
        return row[start : row.index("</td>", start)]

    assert cell("used-key", "Name") == "used-key" and "admin" in cell("used-key", "Scope")
    assert "2026-03-04 05:06" in cell("used-key", "Created")
    assert "2026-03-04 06:06" in cell("used-key", "Last used")
    assert "inference" in cell("idle-key", "Scope") and "never" in cell("idle-key", "Last used")
