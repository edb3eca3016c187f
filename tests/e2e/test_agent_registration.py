"""Registration, heartbeats, re-registration, orphans and the CLI (SCENARIOS 166-170)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import grpc
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import REPO_ROOT, AgentProcess, FakeControlPlane, GiB
from worker_client.errors import WorkerError

pytestmark = pytest.mark.e2e


def test_registration_body_carries_slots_labels_and_resources(
    control_plane: FakeControlPlane, start_agent
) -> None:
    agent = start_agent(control_plane, "--max-replicas-per-model", "4", "--node-labels", "tier=fast,gpu=a100")
    call = control_plane.calls_to("/register")[0]
    assert call.token == ""  # no registration token configured
    body = call.body
    assert body["max_replicas_per_model"] == 4
    assert body["labels"] == {"tier": "fast", "gpu": "a100", "node.replica-slots": "4"}
    assert body["address"] == agent.address and body["node_type"] == "backend" and body["replicas"] == []
    assert body["total_vram"] == body["available_vram"] == 24 * GiB
    assert body["total_ram"] >= body["available_ram"] > 0


def test_registration_defaults_to_one_slot_and_presents_the_registration_token(
    control_plane: FakeControlPlane, start_agent
) -> None:
    start_agent(control_plane, env={"LOCALAI_REGISTRATION_TOKEN": "join-me", "LOCALAI_NODE_NAME": "gpu-7"})
    call = control_plane.calls_to("/register")[0]
    assert call.token == "join-me"
    assert call.body["name"] == "gpu-7"
    assert call.body["max_replicas_per_model"] == 1 and call.body["labels"] == {"node.replica-slots": "1"}


@pytest.mark.parametrize("value", ["0", "abc"])
def test_bad_replica_slots_exit_with_one_line_naming_the_flag(value: str) -> None:
    command = [sys.executable, "-m", "worker_client.agent", "--register-to", "http://127.0.0.1:9"]
    result = subprocess.run(
        [*command, "--max-replicas-per-model", value],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--max-replicas-per-model" in result.stderr


def test_agent_waits_for_a_control_plane_that_starts_late(start_agent) -> None:
    late = FakeControlPlane()
    try:
        agent = start_agent(late, wait=False)
        wait_until(
            lambda: agent.log().count("registration failed") >= 3, timeout=60, message="registration retries"
        )
        assert agent.process.poll() is None
        late.start()
        agent.wait_registered()
        assert agent.stop() == 0
    finally:
        late.stop()


def test_heartbeats_about_every_interval_listing_replicas(control_plane: FakeControlPlane, agent) -> None:
    agent.client().load_replica("m", 0, "echo", {"Model": "m"})
    count = len(control_plane.calls_to("/heartbeat"))
    wait_until(
        lambda: len(control_plane.calls_to("/heartbeat")) >= count + 5, timeout=30, message="5 heartbeats"
    )
    beats = control_plane.calls_to("/heartbeat")[-4:]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(beats)]
    # Only a lower bound, and a causal one: the agent sends a heartbeat an interval (0.5 s) after the previous
    # one was answered, so no load on the machine can bring two closer; a busy machine only spaces them more.
    assert all(gap >= 0.45 for gap in gaps), gaps
    assert beats[-1].body["replicas"] == [
        {"key": "m#0", "address": f"127.0.0.1:{agent.port + 1}", "state": "running"}
    ]
    assert all(call.token == control_plane.node_token for call in beats)


def test_heartbeat_interval_comes_from_the_control_plane_without_the_flag(start_agent) -> None:
    control_plane = FakeControlPlane()
    control_plane.heartbeat_interval = 0.2
    control_plane.start()
    try:
        agent = start_agent(control_plane, heartbeat_interval=None)
        wait_until(lambda: len(control_plane.calls_to("/heartbeat")) >= 3, timeout=8, message="3 heartbeats")
        assert agent.stop() == 0
    finally:
        control_plane.stop()


@pytest.mark.parametrize("status", [401, 403, 404])
def test_heartbeat_refused_makes_the_agent_register_again(
    control_plane: FakeControlPlane, agent: AgentProcess, status: int
) -> None:
    old_token = control_plane.node_token
    control_plane.heartbeat_statuses = [status]
    wait_until(lambda: len(control_plane.calls_to("/register")) == 2, timeout=30, message="re-registration")
    new_token = control_plane.node_token
    wait_until(
        lambda: any(c.token == new_token for c in control_plane.calls_to("/heartbeat")), message="heartbeat"
    )
    assert agent.client().list_replicas() == []
    with pytest.raises(WorkerError) as failure:
        agent.client(old_token).list_replicas()
    assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_orphans_are_stopped_after_two_consecutive_heartbeat_answers(
    control_plane: FakeControlPlane, agent: AgentProcess
) -> None:
    client = agent.client()
    client.load_replica("m", 0, "echo", {"Model": "m"})
    client.load_replica("m", 1, "echo", {"Model": "m"})
    control_plane.orphans = ["m#1"]
    wait_until(
        lambda: [r.process_key for r in client.list_replicas()] == ["m#0"], timeout=30, message="m#1 gone"
    )


def test_an_orphan_listed_in_one_answer_only_is_kept(
    control_plane: FakeControlPlane, agent: AgentProcess
) -> None:
    client = agent.client()
    client.load_replica("m", 0, "echo", {"Model": "m"})
    count = len(control_plane.calls_to("/heartbeat"))
    control_plane.heartbeat_orphans = [["m#0"], [], ["m#0"], []]
    wait_until(
        lambda: len(control_plane.calls_to("/heartbeat")) >= count + 6, timeout=30, message="heartbeats"
    )
    assert [r.process_key for r in client.list_replicas()] == ["m#0"]
