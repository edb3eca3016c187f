"""A dead replica costs no request (issue 12 item 2): kill -9 of a real echo backend, then a request at once.

Before any byte reached the client, a call that fails with `UNAVAILABLE` (connection reset, refused, closed) is
retried once on another replica or a fresh load, and the dead replica is removed and its key stopped. After
the first byte, the client gets the error in the stream's shape and the replica is probed at once."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django.db.models import F

from nodes.models import ModelReplica
from tests.conftest import wait_until
from tests.e2e.conftest import is_alive
from tests.e2e.gateway_support import in_flight, place, start_agents_fixture  # noqa: F401
from tests.e2e.request_faults_support import backend_lines, chat_body, web_fixture  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHAT = "/v1/chat/completions"


def next_pick(model: str) -> ModelReplica:
    """The replica the router picks next among idle replicas of one node: least recently used first."""
    return (
        ModelReplica.objects.filter(model_name=model, state="loaded")
        .order_by(F("last_used").asc(nulls_first=True), "id")
        .first()
    )


def kill_backend(agent, replica: ModelReplica) -> int:
    (process,) = [p for p in agent.processes() if p.process_key == replica.process_key]
    os.kill(process.pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(process.pid), interval=0.002, message=f"pid {process.pid} to die")
    return process.pid


def test_requests_right_after_a_kill_succeed(web, start_agents):
    (agent,) = start_agents(1, slots=2)
    ModelConfigFactory(name="dead-m")
    place("dead-m", 2)

    for round_ in range(5):  # round 0 goes to the second replica, the others to a fresh load
        victim = next_pick("dead-m")
        kill_backend(agent, victim)
        stream = round_ % 2 == 1
        answer = httpx.post(f"{web.url}{CHAT}", json=chat_body("dead-m", stream=stream), timeout=60)

        assert answer.status_code == 200, answer.text
        if stream:
            assert answer.text.rstrip().endswith("data: [DONE]")
        else:
            assert answer.json()["choices"][0]["message"]["content"] == "echo: hello there"
        # The dead replica was removed (and its key stopped) before the retry.
        assert not ModelReplica.objects.filter(pk=victim.pk).exists()
        wait_until(lambda: in_flight("dead-m") == [0] * len(in_flight("dead-m")), message="units back")
    assert "is unavailable" in web.log()
    # The fresh replica that served the last round is running (the stop of the dead key did not hit it).
    answer = httpx.post(f"{web.url}{CHAT}", json=chat_body("dead-m"), timeout=60)
    assert answer.status_code == 200, answer.text


def test_a_kill_mid_stream_ends_the_stream_with_an_error_and_removes_the_replica(web, start_agents):
    (agent,) = start_agents(1)
    ModelConfigFactory(name="dead-mid", options={"options": ["delay_ms:100"]})
    (placed,) = place("dead-mid")
    body = chat_body("dead-mid", " ".join(["word"] * 200), stream=True)

    events = []
    with httpx.stream("POST", f"{web.url}{CHAT}", json=body, timeout=60) as answer:
        assert answer.status_code == 200
        lines = answer.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                break
        kill_backend(agent, ModelReplica.objects.get(pk=placed.replica_id))
        events += [line for line in lines if line.startswith("data: ")]

    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "backend_error" and error["type"] == "server_error"
    assert len(events) < 200
    wait_until(
        lambda: not ModelReplica.objects.filter(pk=placed.replica_id).exists(),
        message="the dead replica to be removed",
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole-answer", "stream-before-first-piece"])
def test_a_kill_during_the_call_before_any_byte_is_retried(web, start_agents, stream):
    """The connection breaks under a call in flight ("Stream removed", "Socket closed": `UNAVAILABLE`, not a
    refused connection): the replica is probed, found dead, removed, and the call retried on a fresh load."""
    (agent,) = start_agents(1)
    ModelConfigFactory(name="dead-call", options={"options": ["delay_ms:1000"]})
    (placed,) = place("dead-call")
    replica = ModelReplica.objects.get(pk=placed.replica_id)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            httpx.post, f"{web.url}{CHAT}", json=chat_body("dead-call", stream=stream), timeout=60
        )
        wait_until(
            lambda: backend_lines(agent, "dead-call", "Predict"), message="the call to reach the backend"
        )
        kill_backend(agent, replica)
        answer = pending.result()

    assert answer.status_code == 200, answer.text
    if stream:
        assert answer.text.rstrip().endswith("data: [DONE]")
        assert "echo:" in answer.text
    else:
        assert answer.json()["choices"][0]["message"]["content"] == "echo: hello there"
    assert not ModelReplica.objects.filter(pk=replica.pk).exists()
    assert "failed its health probe" in web.log()
    wait_until(lambda: in_flight("dead-call") == [0], message="the unit back")
