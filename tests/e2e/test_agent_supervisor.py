"""Supervisor scenarios 150-156 and 159 against a real agent and real echo backends (SCENARIOS §7)."""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import BACKEND_TOKEN, AgentProcess, FakeControlPlane, GiB, child_pids, is_alive
from worker_client.client import BackendClient, WorkerControlClient, backend_health
from worker_client.errors import WorkerError

pytestmark = pytest.mark.e2e


def load(client: WorkerControlClient, model: str, index: int, **kwargs) -> object:
    return client.load_replica(
        model, index, kwargs.pop("backend", "echo"), {"Model": f"{model}.bin"}, **kwargs
    )


def keys(client: WorkerControlClient) -> list[str]:
    return [replica.process_key for replica in client.list_replicas()]


def predict(address: str, text: str) -> str:
    async def call() -> str:
        reply = await BackendClient(address, BACKEND_TOKEN, timeout=30).predict(Prompt=text)
        return reply.message

    return asyncio.run(call())


def test_two_replicas_get_distinct_keys_and_the_first_ports_after_the_agent(agent: AgentProcess) -> None:
    client = agent.client()
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda index: load(client, "m", index), (0, 1))
    assert (first.process_key, second.process_key) == ("m#0", "m#1")
    assert {first.address, second.address} == {f"127.0.0.1:{agent.port + 1}", f"127.0.0.1:{agent.port + 2}"}
    assert first.pid != second.pid and first.load_seconds > 0
    assert all(backend_health(r.address, BACKEND_TOKEN) for r in (first, second))
    assert keys(client) == ["m#0", "m#1"]
    assert {r.state for r in client.list_replicas()} == {"running"}


def test_load_of_a_live_process_returns_it_unchanged(agent: AgentProcess) -> None:
    client = agent.client()
    first = load(client, "m", 0)
    again = load(client, "m", 0)
    assert (again.pid, again.address) == (first.pid, first.address)
    assert child_pids(agent.pid) == {first.pid}


def test_a_killed_process_is_replaced_on_the_same_port(agent: AgentProcess) -> None:
    client = agent.client()
    first = load(client, "m", 0)
    os.kill(first.pid, signal.SIGKILL)
    wait_until(lambda: keys(client) == [], message="ListReplicas to drop the killed process")
    again = load(client, "m", 0)
    assert again.pid != first.pid and again.address == first.address
    assert backend_health(again.address, BACKEND_TOKEN)


def test_load_right_after_a_kill_replaces_the_process(agent: AgentProcess) -> None:
    client = agent.client()
    first = load(client, "m", 0)
    os.kill(first.pid, signal.SIGKILL)
    again = load(client, "m", 0)
    assert again.pid != first.pid
    assert backend_health(again.address, BACKEND_TOKEN)


def test_failed_start_carries_the_last_20_stderr_lines_and_frees_key_and_port(agent: AgentProcess) -> None:
    client = agent.client()
    with pytest.raises(WorkerError) as failure:
        load(client, "bad", 0, backend="stderr30")
    assert failure.value.code == grpc.StatusCode.FAILED_PRECONDITION and not failure.value.retryable
    stderr_lines = [line for line in failure.value.details.splitlines() if line.startswith("err line")]
    assert stderr_lines == [f"err line {i}" for i in range(10, 30)]
    assert keys(client) == []
    assert load(client, "m", 0).address == f"127.0.0.1:{agent.port + 1}"


def test_fail_load_option_fails_with_the_reason_and_leaves_no_process(agent: AgentProcess) -> None:
    client = agent.client()
    with pytest.raises(WorkerError) as failure:
        client.load_replica("m", 0, "echo", {"Model": "m.bin", "Options": ["fail_load:true"]})
    assert "LoadModel failed: fail_load:true" in failure.value.details
    assert keys(client) == [] and child_pids(agent.pid) == set()


def test_a_backend_never_healthy_fails_after_the_load_timeout_and_is_stopped(agent: AgentProcess) -> None:
    client = agent.client()
    with pytest.raises(WorkerError) as failure:
        load(client, "slow", 0, backend="mute", load_timeout=1.5)
    assert failure.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "load timeout" in failure.value.details
    assert keys(client) == [] and child_pids(agent.pid) == set()


def test_unknown_backend_is_invalid_argument(agent: AgentProcess) -> None:
    with pytest.raises(WorkerError) as failure:
        load(agent.client(), "m", 0, backend="nope")
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_calls_without_the_tokens_are_unauthenticated(agent: AgentProcess) -> None:
    for token in ("", "wrong"):
        with pytest.raises(WorkerError) as failure:
            agent.client(token).list_replicas()
        assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert agent.client("").health()  # the standard health service is open
    replica = load(agent.client(), "m", 0)

    async def predict_with(token: str) -> None:
        await BackendClient(replica.address, token).predict(Prompt="hi")

    with pytest.raises(WorkerError) as failure:
        asyncio.run(predict_with(""))
    assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert not backend_health(replica.address, "wrong")


def test_stopping_one_replica_keeps_its_sibling_serving(agent: AgentProcess) -> None:
    client = agent.client()
    first, second = load(client, "m", 0), load(client, "m", 1)
    assert client.stop_replica("m#0") == ["m#0"]
    assert not is_alive(first.pid)
    assert keys(client) == ["m#1"]
    assert predict(second.address, "still here") == "echo: still here"


def test_stopping_a_bare_model_stops_all_its_replicas_and_no_other_model(agent: AgentProcess) -> None:
    client = agent.client()
    for model, index in (("q", 0), ("q", 1), ("q3", 0)):
        load(client, model, index)
    assert client.stop_replica("q") == ["q#0", "q#1"]
    assert keys(client) == ["q3#0"]


def test_stopping_an_unmatched_key_stops_nothing(agent: AgentProcess) -> None:
    client = agent.client()
    load(client, "m", 0)
    assert client.stop_replica("m#5") == []
    assert client.stop_replica("not-loaded") == []
    assert keys(client) == ["m#0"]


def test_free_vram_is_net_of_running_and_loading_replicas(
    control_plane: FakeControlPlane, agent: AgentProcess
) -> None:
    client = agent.client()
    client.load_replica("big", 0, "echo", {"Model": "big.bin"}, vram_bytes=6 * GiB)
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(
            client.load_replica, "slow", 0, "echo", {"Model": "s", "Options": ["load_ms:4000"]}, 4 * GiB
        )

        def heartbeat_with_loading() -> dict | None:
            bodies = [call.body for call in control_plane.calls_to("/heartbeat")]
            return next((b for b in reversed(bodies) if {"key": "slow#0"} in _keys_only(b)), None)

        body = wait_until(heartbeat_with_loading, timeout=30, message="a heartbeat listing slow#0")
        assert body["available_vram"] == 14 * GiB and body["total_vram"] == 24 * GiB
        assert {r["key"]: r["state"] for r in body["replicas"]} == {"big#0": "running", "slow#0": "loading"}
        loading.result()


def _keys_only(body: dict) -> list[dict]:
    return [{"key": replica["key"]} for replica in body["replicas"]]
