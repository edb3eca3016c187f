"""Placement refuses a node whose agent cannot start the model's backend: real agents (one with a
`--backends-config` entry, one with only the built-in `echo`), requests through the real gateway. A model no
registered agent can start is a 503 `no_capacity` naming the backend — no process started, no load-failure
cooldown — and once an agent offering the backend registers, the next request loads there."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import yaml

import worker_client
from nodes.apikeys import api_key_create
from nodes.models import ModelReplica
from scheduling.models import LoadFailure, PlacementDecision
from tests.e2e.gateway_support import start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_model_is_placed_only_on_the_agent_that_offers_its_backend(cp_server, start_agents, tmp_path):
    config = tmp_path / "backends.yaml"
    package_root = str(Path(worker_client.__file__).resolve().parent.parent)
    # `echo2`: the echo backend under another name, which only the second agent offers.
    config.write_text(
        yaml.safe_dump(
            {
                "echo2": {
                    "command": [sys.executable, "-m", "worker_client.backends.echo"],
                    "env": {"PYTHONPATH": package_root},
                }
            }
        )
    )
    (plain,) = start_agents(1, slots=2)
    key = api_key_create(name="ops", is_admin=True)[1]
    headers = {"Authorization": f"Bearer {key}"}
    ModelConfigFactory(name="aliased", backend="echo2")

    def chat() -> httpx.Response:
        body = {"model": "aliased", "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(f"{cp_server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)

    refused = chat()
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "no_capacity"
    assert error["message"] == (
        f"cannot place aliased: no node offers backend echo2 ({plain.name}: backend echo2 not offered "
        "(offers: echo))"
    )
    assert plain.load_count("aliased") == 0 and plain.processes() == []
    assert not LoadFailure.objects.exists() and not ModelReplica.objects.exists()
    record = PlacementDecision.objects.get()
    assert record.candidates == [
        {
            "node": plain.name,
            "verdict": "backend_missing",
            "detail": "backend echo2 not offered (offers: echo)",
        }
    ]

    (offering,) = start_agents(1, slots=2, args=("--backends-config", str(config)))
    assert offering.node().backends == ["echo", "echo2"]
    for _ in range(3):
        answer = chat()
        assert answer.status_code == 200, answer.text
    # Loaded on the agent that offers it (the next two requests use that replica); the plain agent, its two
    # slots free, was never asked.
    assert list(ModelReplica.objects.values_list("node__name", "state")) == [(offering.name, "loaded")]
    assert plain.load_count("aliased") == 0 and plain.processes() == []
    assert not LoadFailure.objects.exists()
