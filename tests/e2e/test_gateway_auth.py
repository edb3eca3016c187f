"""API keys on the chat path, where the key check runs in the same statement as the replica claim."""

from __future__ import annotations

import httpx
import pytest

from nodes.apikeys import api_key_create, api_key_revoke
from nodes.models import ApiKey, ModelReplica
from tests.e2e.gateway_support import place, start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _chat(url: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "keyed", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_chat_keys_open_then_enforced_revocation_and_nothing_claimed_on_401(cp_server, start_agents):  # 108
    start_agents(1)
    ModelConfigFactory(name="keyed")
    place("keyed")
    assert _chat(cp_server.url).status_code == 200  # open while no key exists

    api_key, raw = api_key_create(name="client")
    for key in (None, "lac_not-a-key", "x" * 600):
        answer = _chat(cp_server.url, key)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
    assert ModelReplica.objects.get(model_name="keyed").in_flight == 0  # a refused request claims nothing

    assert _chat(cp_server.url, raw).status_code == 200
    api_key.refresh_from_db()
    assert api_key.last_used_at is not None

    api_key_revoke(api_key=api_key)
    assert _chat(cp_server.url, raw).status_code == 401  # revoked: refused, and still "a key exists"
    assert ApiKey.objects.count() == 1
