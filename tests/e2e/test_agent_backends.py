"""Agents report their backends at registration (issue 17 item 1): the built-in `echo` plus every entry of
`--backends-config`, in the registration body, stored on the node and answered by `GET /api/nodes/{id}`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from nodes.apikeys import api_key_create
from tests.api.conftest import bearer_client
from tests.e2e.conftest import FakeControlPlane
from tests.e2e.gateway_support import start_agents_fixture  # noqa: F401

pytestmark = pytest.mark.e2e


def test_the_registration_body_lists_echo_and_the_configured_backends(
    control_plane: FakeControlPlane, start_agent
) -> None:
    start_agent(control_plane)  # with the suite's backends config: `stderr30` and `mute`
    assert control_plane.calls_to("/register")[0].body["backends"] == ["echo", "mute", "stderr30"]


def test_a_real_agent_with_a_backends_config_shows_its_backends_in_the_admin_api(
    start_agents, tmp_path: Path
) -> None:
    config = tmp_path / "backends.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "llama-cpp": {"command": [sys.executable, "-c", "pass"]},
                "whisper": {"command": [sys.executable, "-c", "pass"], "env": {"X": "1"}},
            }
        )
    )
    (agent,) = start_agents(1, args=("--backends-config", str(config)))
    (plain,) = start_agents(1)
    node = agent.node()
    assert node.backends == ["echo", "llama-cpp", "whisper"]
    assert plain.node().backends == ["echo"]
    admin = bearer_client(api_key_create(name="ops", is_admin=True)[1])
    assert admin.get(f"/api/nodes/{node.pk}").json()["backends"] == ["echo", "llama-cpp", "whisper"]


def test_load_one_now_and_unload_all_through_the_api_with_a_real_agent(start_agents) -> None:
    from nodes.models import ModelReplica
    from tests.conftest import wait_until
    from tests.factories import ModelConfigFactory

    (agent,) = start_agents(1, slots=2)
    ModelConfigFactory(name="org/echo:1", backend="echo")
    admin = bearer_client(api_key_create(name="ops", is_admin=True)[1])
    first = admin.post("/api/models/org/echo:1/load")
    assert first.status_code == 200, first.content
    body = first.json()
    assert (body["outcome"], body["node"], body["process_key"]) == ("placed", agent.name, "org/echo:1#0")
    assert body["decision"]["trigger"] == "admin" and body["decision"]["outcome"] == "placed"
    assert body["decision"]["candidates"][0] == {
        "node": agent.name,
        "verdict": "chosen",
        "detail": body["decision"]["candidates"][0]["detail"],
    }
    second = admin.post("/api/models/org/echo:1/load").json()
    assert second["process_key"] == "org/echo:1#1"  # one more each time, through the same pipeline
    assert set(ModelReplica.objects.values_list("state", flat=True)) == {"loaded"}
    assert sorted(p.process_key for p in agent.processes()) == ["org/echo:1#0", "org/echo:1#1"]
    third = admin.post("/api/models/org/echo:1/load")  # both slots taken: refused, every node's verdict
    assert third.status_code == 503 and "2/2 slots used" in third.json()["error"]

    unloaded = admin.post("/api/models/org/echo:1/unload", {}, format="json")
    assert unloaded.status_code == 200
    assert [r["process_key"] for r in unloaded.json()["unloaded"]] == ["org/echo:1#0", "org/echo:1#1"]
    assert not ModelReplica.objects.exists()
    wait_until(lambda: agent.processes() == [], timeout=30, message="the agent to stop both replicas")
