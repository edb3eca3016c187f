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
