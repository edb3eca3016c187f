"""The `/api/*` error shape for faults that are not the client's: the database going away answers a JSON 503."""

from __future__ import annotations

import pytest
from django.db import OperationalError

pytestmark = pytest.mark.django_db


def test_database_unavailable_is_a_json_503_not_an_html_500(client, monkeypatch):
    from nodes import services

    registered = services.node_register(name="w1", address="127.0.0.1:50051")
    node, token = registered.node, registered.node_token

    def database_gone(**kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(services, "node_heartbeat", database_gone)
    answer = client.post(
        f"/api/node/{node.id}/heartbeat",
        data={},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert answer.status_code == 503
    assert answer["Retry-After"] == "5"
    assert answer.json() == {
        "error": "The control plane's database is unavailable; retry shortly.",
        "details": {},
    }
