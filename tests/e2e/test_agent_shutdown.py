"""SIGTERM drains, waits for in-flight, stops backends and deregisters; no backend outlives the agent (171)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import AgentProcess, FakeControlPlane, child_pids, is_alive

pytestmark = pytest.mark.e2e


def test_sigterm_drains_waits_for_in_flight_stops_backends_and_deregisters(
    control_plane: FakeControlPlane, agent: AgentProcess
) -> None:
    client = agent.client()
    pids = {client.load_replica("m", index, "echo", {"Model": "m"}).pid for index in (0, 1)}
    backends_alive_at_deregister = []
    control_plane.on_call["/deregister"] = lambda: backends_alive_at_deregister.append(
        any(map(is_alive, pids))
    )
    control_plane.in_flight = 1
    agent.process.send_signal(signal.SIGTERM)
    wait_until(lambda: len(control_plane.calls_to("/models")) >= 2, timeout=30, message="in-flight polls")
    assert control_plane.calls_to("/drain") and not control_plane.calls_to("/deregister")
    assert agent.process.poll() is None and all(map(is_alive, pids))  # waiting for the in-flight request
    control_plane.in_flight = 0
    assert agent.process.wait(30) == 0
    assert backends_alive_at_deregister == [False]
    assert control_plane.calls[-1].path == f"/api/node/{control_plane.node_id}/deregister"
    assert control_plane.calls[-1].token == control_plane.node_token


def test_in_flight_wait_is_bounded_by_the_drain_timeout(control_plane: FakeControlPlane, start_agent) -> None:
    agent = start_agent(control_plane, "--drain-timeout", "1s")
    control_plane.in_flight = 3
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(30) == 0
    assert control_plane.calls_to("/deregister")


def test_backends_die_with_a_killed_agent(agent: AgentProcess) -> None:
    pids = {agent.client().load_replica("m", index, "echo", {"Model": "m"}).pid for index in (0, 1)}
    assert child_pids(agent.pid) == pids
    os.kill(agent.pid, signal.SIGKILL)
    agent.process.wait(30)
    wait_until(lambda: not any(is_alive(pid) for pid in pids), timeout=30, message="backends to die")


def test_an_unreachable_control_plane_does_not_hold_the_shutdown(
    control_plane: FakeControlPlane, start_agent
) -> None:
    """The in-flight count lives in the control plane: when it cannot be reached the agent cannot wait for it, so
    it does not sit out its drain timeout (an hour here; the wait below is far shorter); backends still stop."""
    agent = start_agent(control_plane, "--drain-timeout", "1h", "--max-replicas-per-model", "2")
    pids = {agent.client().load_replica("m", index, "echo", {"Model": "m"}).pid for index in (0, 1)}
    control_plane.in_flight = 1
    control_plane.stop()  # connections refused from now on
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(60) == 0
    assert not any(map(is_alive, pids))
    log = agent.log()
    assert "drain failed" in log and "not waiting for in-flight requests" in log
    assert "deregister failed" in log
