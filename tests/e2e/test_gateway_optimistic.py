"""Optimistic dispatch through the gateway (`scheduling.optimistic`), end to end on loopback: steady sequential
traffic gets its backend call (a whole answer or a stream) started beside the claim, and a change of what the claim may pick — a drain, a
revoked key — costs at most one dropped call, never a wrong answer or a leaked unit."""

from __future__ import annotations

import json

import httpx
import pytest

from localai_cluster import metrics
from nodes.apikeys import api_key_create, api_key_revoke
from scheduling import optimistic
from tests.e2e.gateway_support import (  # noqa: F401
    place,
    predict_count,
    start_agents_fixture,
    wait_in_flight_zero,
)
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def chat(url: str, model: str, key: str | None = None, *, stream: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    if stream and answer.status_code == 200:  # the whole stream, well formed
        assert answer.text.endswith("data: [DONE]\n\n")
        events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
        text = "".join(event["choices"][0]["delta"].get("content", "") for event in events)
        assert text.split() == ["echo:", "hi"]
    return answer


def count(outcome: str) -> float:
    return metrics.GATEWAY_OPTIMISTIC_CALLS.labels(outcome)._value.get()


@pytest.fixture(autouse=True)
def steady(monkeypatch):
    """Sequential requests count as steady traffic however slow this machine is today."""
    monkeypatch.setattr(optimistic, "RECENT", 600.0)


@pytest.mark.parametrize("stream", [False, True], ids=["whole answers", "streams"])
def test_sequential_requests_are_answered_early_and_a_drain_costs_at_most_one_dropped_call(
    cp_server, start_agents, settings, stream
):
    from nodes.services import node_drain

    settings.LOCALAI_EXPOSE_ROUTING_HEADERS = True
    a, b = start_agents(2)
    ModelConfigFactory(name="early")
    place("early", 2)
    used = count("used")
    answers = [chat(cp_server.url, "early", stream=stream) for _ in range(2 * optimistic.TRUST_AFTER + 4)]
    assert [answer.status_code for answer in answers] == [200] * len(answers)
    assert {answer.headers["x-localai-node"] for answer in answers} == {a.name, b.name}  # they take turns
    assert count("used") > used  # the two replicas' turns were learned, then called early
    assert predict_count(a, "early") + predict_count(b, "early") == len(answers)  # no call made twice

    node_drain(node=a.node())
    on_a = predict_count(a, "early")
    used = count("used")
    after = [chat(cp_server.url, "early", stream=stream) for _ in range(optimistic.TRUST_AFTER - 2)]
    assert [answer.status_code for answer in after] == [200] * len(after)
    assert {answer.headers["x-localai-node"] for answer in after} == {b.name}  # the claim decides
    assert predict_count(a, "early") - on_a <= 1  # at most the one early call the miss dropped
    assert count("used") == used  # the miss closed the gate: too few right guesses since
    wait_in_flight_zero("early")


def test_a_revoked_key_is_refused_though_its_call_had_started(cp_server, start_agents):
    start_agents(1)
    ModelConfigFactory(name="early-keyed")
    place("early-keyed")
    api_key, raw = api_key_create(name="client")
    used = count("used")
    for _ in range(optimistic.TRUST_AFTER + 3):
        assert chat(cp_server.url, "early-keyed", raw).status_code == 200
    assert count("used") > used

    api_key_revoke(api_key=api_key)
    discarded = count("discarded")
    answer = chat(cp_server.url, "early-keyed", raw)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert count("discarded") == discarded + 1  # its early call was cancelled, its answer dropped
    wait_in_flight_zero("early-keyed")

    assert chat(cp_server.url, "early-keyed", "lac_never-accepted").status_code == 401
    assert count("discarded") == discarded + 1  # a key never accepted here gets no early call


def test_turned_off_nothing_is_called_early(cp_server, start_agents, settings):
    settings.LOCALAI_OPTIMISTIC_DISPATCH = False
    start_agents(1)
    ModelConfigFactory(name="early-off")
    place("early-off")
    calls = sum(count(outcome) for outcome in ("used", "discarded", "failed"))
    for _ in range(optimistic.TRUST_AFTER + 3):
        assert chat(cp_server.url, "early-off").status_code == 200
    assert sum(count(outcome) for outcome in ("used", "discarded", "failed")) == calls
