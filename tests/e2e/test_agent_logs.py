"""Backend logs through the agent: per key, merged per model, streamed (sync and async), kept after a stop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import BACKEND_TOKEN, AgentProcess
from worker_client.client import AsyncWorkerControlClient, BackendClient, LogLine

pytestmark = pytest.mark.e2e


def predict(address: str, text: str) -> None:
    async def call() -> None:
        await BackendClient(address, BACKEND_TOKEN, timeout=30).predict(Prompt=text)

    asyncio.run(call())


def texts(lines: list[LogLine]) -> list[str]:
    return [line.text for line in lines]


def test_logs_per_key_and_merged_per_model(agent: AgentProcess) -> None:
    client = agent.client()
    first = client.load_replica("q", 0, "echo", {"Model": "q"})
    second = client.load_replica("q", 1, "echo", {"Model": "q"})
    client.load_replica("q3", 0, "echo", {"Model": "q3"})
    predict(first.address, "one two")
    predict(second.address, "three")
    wait_until(
        lambda: "Predict prompt_tokens=1 tokens=2" in texts(client.get_logs("q#1")), message="q#1's line"
    )

    own = client.get_logs("q#0")
    assert {line.process_key for line in own} == {"q#0"}
    assert "Predict prompt_tokens=2 tokens=3" in texts(own)
    assert all(line.stream in ("stdout", "stderr") and line.timestamp > 0 for line in own)
    merged = client.get_logs("q")
    assert {line.process_key for line in merged} == {"q#0", "q#1"}
    assert [line.timestamp for line in merged] == sorted(line.timestamp for line in merged)
    assert len(merged) == len(own) + len(client.get_logs("q#1"))
    assert client.get_logs("q", tail=1) == merged[-1:]
    assert client.get_logs("unknown") == [] and client.get_logs("q#9") == []
    assert client.log_keys() == ["q#0", "q#1", "q3#0"]


def test_logs_of_a_stopped_process_stay_until_its_key_starts_again(agent: AgentProcess) -> None:
    client = agent.client()
    client.load_replica("q", 1, "echo", {"Model": "q"})
    client.stop_replica("q#1")
    assert client.log_keys() == ["q#1"]
    assert "LoadModel model='q' options=[]" in texts(client.get_logs("q#1"))
    client.load_replica("q", 1, "echo", {"Model": "again"})
    lines = texts(client.get_logs("q#1"))
    assert "LoadModel model='again' options=[]" in lines and "LoadModel model='q' options=[]" not in lines


def test_stream_sends_buffered_then_live_lines_once_each(agent: AgentProcess) -> None:
    client = agent.client()
    first = client.load_replica("q", 0, "echo", {"Model": "q"})
    client.load_replica("other", 0, "echo", {"Model": "o"})
    received: list[LogLine] = []
    stream = client.stream_logs("q")
    consumer = threading.Thread(target=lambda: received.extend(stream))
    consumer.start()
    wait_until(lambda: any("LoadModel" in line.text for line in received), message="the buffered lines")
    second = client.load_replica("q", 1, "echo", {"Model": "q"})
    for address in (first.address, second.address):
        predict(address, "live")
    wait_until(lambda: sum("Predict" in line.text for line in received) == 2, message="both live lines")
    stream.cancel()
    consumer.join(30)
    assert not consumer.is_alive()
    assert {line.process_key for line in received} == {"q#0", "q#1"}
    seqs = [line.seq for line in received]
    assert len(seqs) == len(set(seqs))
    assert seqs == [line.seq for line in client.get_logs("q") if line.seq <= max(seqs)]


async def test_async_stream_for_one_key(agent: AgentProcess) -> None:
    client = agent.client()
    replica = await asyncio.to_thread(client.load_replica, "q", 0, "echo", {"Model": "q"})
    await asyncio.to_thread(client.load_replica, "q", 1, "echo", {"Model": "q"})
    stream = AsyncWorkerControlClient(agent.address, agent.control_plane.node_token).stream_logs("q#0")
    assert (await anext(stream)).text.startswith("echo backend listening")
    await BackendClient(replica.address, BACKEND_TOKEN).predict(Prompt="async")
    line = await asyncio.wait_for(_first_predict_line(stream), 30)
    assert line.process_key == "q#0"
    await stream.aclose()


async def _first_predict_line(stream) -> LogLine:
    async for line in stream:
        if line.text.startswith("Predict"):
            return line
    raise AssertionError("stream ended")
