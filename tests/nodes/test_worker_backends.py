"""Agents report the backends they can start at registration (issue 17 item 1): stored on the node sorted
without duplicates, bounded and clean like the rest of the worker's input (400 in the error shape, nothing
changed), replaced at each registration, answered by `GET /api/nodes` and `GET /api/nodes/{id}`."""

from __future__ import annotations

import pytest

from nodes.models import Node
from tests.nodes.test_worker_input import assert_error

pytestmark = pytest.mark.django_db


def test_backends_are_stored_sorted_without_duplicates_and_replaced_at_each_registration(register) -> None:
    assert register("w1", backends=["llama-cpp", "echo", "llama-cpp", "whisper"]).status_code == 201
    assert Node.objects.get(name="w1").backends == ["echo", "llama-cpp", "whisper"]
    assert register("w1", backends=["echo"]).status_code == 200
    assert Node.objects.get(name="w1").backends == ["echo"]
    # An agent that sends no list reports none.
    assert register("w1").status_code == 200
    assert Node.objects.get(name="w1").backends == []


@pytest.mark.parametrize(
    "backends, why",
    [
        ("echo", "a string, not a list"),
        ([""], "an empty name"),
        (["x" * 65], "a name longer than a catalog backend"),
        (["bad\nname"], "a line break"),
        (["ok", 3], "a number"),
        ([f"b{i}" for i in range(257)], "more than 256"),
        (["nul\u0000"], "NUL"),
    ],
)
def test_bad_backend_lists_are_refused_with_400_and_change_nothing(register, backends, why) -> None:
    assert register("w1", backends=["echo"]).status_code == 201
    answer = register("w1", backends=backends)
    assert_error(answer, 400, "backends")
    assert Node.objects.get(name="w1").backends == ["echo"], why


def test_the_admin_api_answers_the_backends(register) -> None:
    from nodes.apikeys import api_key_create
    from tests.api.conftest import bearer_client

    register("w1", backends=["echo", "vllm"])
    node = Node.objects.get(name="w1")
    admin = bearer_client(api_key_create(name="ops", is_admin=True)[1])
    assert admin.get(f"/api/nodes/{node.pk}").json()["backends"] == ["echo", "vllm"]
    assert admin.get("/api/nodes").json()["results"][0]["backends"] == ["echo", "vllm"]
