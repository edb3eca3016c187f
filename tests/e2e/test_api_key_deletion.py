"""Deleting API keys must not reopen the gateway (issue 11, item 6): keys are revoked, never deleted — not in
the Django admin, not through the ORM, not with SQL — so `/v1/*` on a live control plane stays closed."""

from __future__ import annotations

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.db import DatabaseError, connection, transaction
from django.test import Client

from nodes.apikeys import api_key_create
from nodes.models import ApiKey, ApiKeyNotDeletable

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_no_way_to_delete_keys_so_the_gateway_stays_closed(cp_server):
    assert httpx.get(f"{cp_server.url}/v1/models", timeout=30).status_code == 200  # open: no key yet
    api_key, raw = api_key_create(name="leaked")

    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("root", password="pw-root-123"))
    changelist = admin.get("/admin/nodes/apikey/")
    assert changelist.status_code == 200
    assert b"delete_selected" not in changelist.content
    assert admin.get(f"/admin/nodes/apikey/{api_key.pk}/delete/").status_code == 403
    bulk = admin.post(
        "/admin/nodes/apikey/",
        {"action": "delete_selected", "_selected_action": [api_key.pk], "post": "yes"},
    )
    assert bulk.status_code in (200, 302)

    with pytest.raises(ApiKeyNotDeletable):
        api_key.delete()
    with pytest.raises(ApiKeyNotDeletable):
        ApiKey.objects.all().delete()
    with (
        pytest.raises(DatabaseError, match="revoke them instead"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute("DELETE FROM nodes_apikey")

    assert ApiKey.objects.filter(pk=api_key.pk).exists()
    answer = httpx.get(f"{cp_server.url}/v1/models", timeout=30)
    assert answer.status_code == 401
    assert (
        httpx.get(f"{cp_server.url}/v1/models", headers={"Authorization": f"Bearer {raw}"}).status_code == 200
    )
