"""Embeddings with many inputs (issue 12 item 6): up to the documented 2,048 inputs answer in order, with a
bounded number of `Embedding` calls in flight; the first failure stops the rest, and no call reaches the
backend after the answer. Real web process, agent and echo backend."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import wait_until
from tests.e2e.gateway_support import in_flight, place, start_agents_fixture  # noqa: F401
from tests.e2e.request_faults_support import web_fixture  # noqa: F401
from tests.factories import ModelConfigFactory
from worker_client.backends.echo.server import embedding_of

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

_COUNT = re.compile(r"^Embedding #(\d+) ")


def embed(web, model: str, texts: list[str]) -> httpx.Response:
    return httpx.post(f"{web.url}/v1/embeddings", json={"model": model, "input": texts}, timeout=120)


def calls_so_far(web, agent, model: str) -> int:
    """How many `Embedding` calls the backend has received, read through one more (marker) call: the
    marker's running count, less itself. Calls sent before the marker on the same channel arrive before it."""
    before = _last_count(agent, model)
    assert embed(web, model, ["marker"]).status_code == 200
    return (
        wait_until(
            lambda: (count := _last_count(agent, model)) > before and count,
            message="the marker's Embedding line",
        )
        - 1
    )


def _last_count(agent, model: str) -> int:
    counts = [int(m.group(1)) for line in agent.client().get_logs(model) if (m := _COUNT.match(line.text))]
    return counts[-1] if counts else 0


def test_2048_inputs_answer_in_order_and_2049_are_refused(web, start_agents):
    (agent,) = start_agents(1)
    ModelConfigFactory(name="emb-many")
    place("emb-many")
    texts = [f"input number {i}" for i in range(2048)]

    answer = embed(web, "emb-many", texts)

    assert answer.status_code == 200, answer.text[:500]
    data = answer.json()["data"]
    assert [item["index"] for item in data] == list(range(2048))
    for item, text in zip(data, texts, strict=True):
        assert item["embedding"] == pytest.approx(embedding_of(text), rel=1e-6)
    wait_until(lambda: in_flight("emb-many") == [0], message="the unit back")
    # Exactly one call per input reached the backend, none after the answer.
    assert calls_so_far(web, agent, "emb-many") == 2048
    assert calls_so_far(web, agent, "emb-many") == 2049  # the first marker, and nothing else, since

    refused = embed(web, "emb-many", [*texts, "one too many"])
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "invalid_request_error"


def test_the_first_failure_stops_the_other_calls(web, start_agents):
    (agent,) = start_agents(1)
    ModelConfigFactory(name="emb-fail", options={"options": ["fail_embedding:boom"]})
    place("emb-fail")
    texts = ["boom", *(f"input number {i}" for i in range(2047))]

    answer = embed(web, "emb-fail", texts)

    assert answer.status_code == 502, answer.text[:500]
    assert answer.json()["error"]["code"] == "backend_error"
    assert "fail_embedding:boom" in answer.json()["error"]["message"]
    wait_until(lambda: in_flight("emb-fail") == [0], message="the unit back")
    made = calls_so_far(web, agent, "emb-fail")
    print(f"calls that reached the backend: {made}")
    # The failing input went first: the calls under way were cancelled and the rest never started (with 16
    # in flight at a time, a few dozen at most got through before the failure came back, never the 2,048).
    assert made < 1024, made
    # And nothing of that request reaches the backend later.
    assert calls_so_far(web, agent, "emb-fail") == made + 1
