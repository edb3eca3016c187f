"""Draining under a live stream, and a bounded wait on another process's never-ending load (SCENARIOS 105, 109)."""

from __future__ import annotations

import threading

import httpx
import pytest

from localai_cluster import locks
from nodes.models import ModelReplica
from tests.conftest import another_session_holding, wait_until
from tests.e2e.gateway_support import place, start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _chat(url: str, model: str, text: str = "hi") -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        json={"model": model, "messages": [{"role": "user", "content": text}]},
    )


def test_draining_node_finishes_its_stream_and_gets_no_new_request(cp_server, start_agents):  # 109
    from nodes.services import node_drain

    a, b = start_agents(2)
    ModelConfigFactory(name="drain-stream", options={"options": ["delay_ms:40"]})
    place("drain-stream", 2)
    body = {
        "model": "drain-stream",
        "stream": True,
        "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(60))}],
    }
    received: list[bytes] = []

    def stream() -> None:
        with httpx.stream("POST", f"{cp_server.url}/v1/chat/completions", json=body, timeout=60) as answer:
            received.extend(answer.iter_bytes())

    reader = threading.Thread(target=stream)
    reader.start()
    busy = wait_until(
        lambda: ModelReplica.objects.filter(model_name="drain-stream", in_flight=1).first(),
        message="the stream to hold a replica",
    )
    draining, other = (a, b) if busy.node.name == a.name else (b, a)
    node_drain(node=draining.node())
    predicts_before = _predicts(draining)

    for i in range(4):
        assert _chat(cp_server.url, "drain-stream", f"during drain {i}").status_code == 200
    reader.join(timeout=60)

    assert b"".join(received).rstrip().endswith(b"data: [DONE]")  # the stream completed normally
    assert _predicts(draining) == predicts_before  # nothing new reached the draining node
    assert _predicts(other) >= 4
    wait_until(lambda: ModelReplica.objects.get(pk=busy.pk).in_flight == 0, message="its in-flight back to 0")


def _predicts(agent) -> int:
    return sum(1 for line in agent.client().get_logs("drain-stream") if line.text.startswith("Predict"))


def test_waiting_on_a_load_that_never_finishes_answers_503_after_the_load_timeout(cp_server, settings):  # 105
    settings.LOCALAI_LOAD_TIMEOUT = 1.5
    ModelConfigFactory(name="stuck")
    # Another web process holds the model's load lock and never finishes its load.
    with another_session_holding(locks.NAMESPACE_MODEL_LOAD, locks.model_key("stuck")):
        answer = _chat(cp_server.url, "stuck")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"]
    assert "timed out" in answer.json()["error"]["message"]  # it waited for the load timeout, then gave up
    assert not ModelReplica.objects.filter(model_name="stuck").exists()
