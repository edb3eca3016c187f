"""A model that cannot load does not spawn a process per request (issue 12 item 3): a real agent, the echo
backend failing `LoadModel` (`fail_load:true`), requests through the real gateway. Time is driven by moving
the failure's `retry_at` into the past in the database, never by sleeping."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from django.db.models import F

from nodes.apikeys import api_key_create
from nodes.models import ModelReplica
from scheduling.models import LoadFailure
from tests.conftest import wait_until
from tests.e2e.gateway_support import start_agents_fixture  # noqa: F401
from tests.factories import GiB, ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def started(agent, model: str) -> int:
    """Backend processes the agent started for `model` (its log says so once per process)."""
    return len(re.findall(rf"{re.escape(model)}#\d+: started ", agent.log()))


def expire(model: str) -> None:
    LoadFailure.objects.filter(model_name=model).update(
        retry_at=F("retry_at") - timedelta(hours=1), last_failed_at=F("last_failed_at") - timedelta(hours=1)
    )


def assert_load_failed(answer: httpx.Response, *, at_most: int) -> None:
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "load_failed"
    assert "fail_load" in error["message"]  # the backend's own error
    assert 1 <= int(answer.headers["Retry-After"]) <= at_most


def test_a_model_that_cannot_load_starts_one_backend_until_its_cooldown_ends(
    cp_server, start_agents, settings
):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 10
    (agent,) = start_agents(1, slots=2)
    key = api_key_create(name="ops", is_admin=True)[1]
    headers = {"Authorization": f"Bearer {key}"}
    ModelConfigFactory(name="broken", vram_bytes=GiB, options={"options": ["fail_load:true"]})

    def chat() -> httpx.Response:
        body = {"model": "broken", "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(f"{cp_server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)

    first = chat()
    assert_load_failed(first, at_most=10)
    assert int(first.headers["Retry-After"]) == 10  # the whole first cooldown
    for _ in range(5):  # requests in a row, as a client retrying would send them
        assert_load_failed(chat(), at_most=10)
    with ThreadPoolExecutor(8) as pool:
        for answer in pool.map(lambda _i: chat(), range(8)):
            assert_load_failed(answer, at_most=10)
    assert started(agent, "broken") == 1
    assert LoadFailure.objects.get(model_name="broken").failures == 1
    assert not ModelReplica.objects.filter(model_name="broken").exists()

    expire("broken")  # the cooldown is over: one more process, and twice the cooldown
    second = chat()
    assert_load_failed(second, at_most=20)
    assert int(second.headers["Retry-After"]) == 20
    assert_load_failed(chat(), at_most=20)
    assert started(agent, "broken") == 2
    assert LoadFailure.objects.get(model_name="broken").failures == 2

    retried = httpx.post(f"{cp_server.url}/api/models/broken/retry-load", headers=headers, timeout=30)
    assert retried.status_code == 200 and retried.json()["load_failure"] is None
    assert_load_failed(chat(), at_most=10)  # tried at once, and the doubling starts over
    assert started(agent, "broken") == 3
    assert_load_failed(chat(), at_most=10)
    assert started(agent, "broken") == 3

    failure = httpx.get(f"{cp_server.url}/api/models/broken", headers=headers, timeout=30).json()[
        "load_failure"
    ]
    assert failure["failures"] == 1 and "fail_load" in failure["last_error"]

    # The fix is a catalog edit: it clears the backoff, and the next request loads and answers.
    fixed = httpx.patch(
        f"{cp_server.url}/api/models/broken", json={"options": {}}, headers=headers, timeout=30
    )
    assert fixed.status_code == 200 and fixed.json()["load_failure"] is None
    answer = chat()
    assert answer.status_code == 200, answer.text
    assert started(agent, "broken") == 4
    assert not LoadFailure.objects.exists()
    wait_until(lambda: len(agent.processes()) == 1, timeout=20, message="only the working backend running")
