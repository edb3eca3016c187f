"""`WS /ws/nodes/{id}/backend-logs/{key}` against a real agent and echo backends (SCENARIO 65)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import Client

from localai_cluster.asgi import application
from tests.factories import NodeFactory
from tests.ui.agents import AgentNode

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]  # real agents


def session_cookie(*, staff: bool) -> bytes:
    user = get_user_model().objects.create_user(f"user-{staff}", password="pw-12345678", is_staff=staff)
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


def communicator(path: str, cookie: bytes | None) -> WebsocketCommunicator:
    headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, path, headers=headers)


async def receive(ws: WebsocketCommunicator, timeout: float = 20) -> dict:
    return await ws.receive_json_from(timeout=timeout)


async def closed_with(ws: WebsocketCommunicator) -> int:
    connected, _ = await ws.connect(timeout=10)
    assert connected
    output = await ws.receive_output(timeout=10)
    assert output["type"] == "websocket.close"
    return output["code"]


async def test_non_staff_and_anonymous_are_closed_with_4403() -> None:
    node = await sync_to_async(NodeFactory)()
    path = f"/ws/nodes/{node.pk}/backend-logs/m%230"
    plain = await sync_to_async(session_cookie)(staff=False)
    assert await closed_with(communicator(path, plain)) == 4403
    assert await closed_with(communicator(path, None)) == 4403


async def test_unknown_node_is_closed_with_4404() -> None:
    cookie = await sync_to_async(session_cookie)(staff=True)
    path = "/ws/nodes/6f0c1b1e-0000-4000-8000-000000000000/backend-logs/m%230"
    assert await closed_with(communicator(path, cookie)) == 4404


async def test_unreachable_agent_says_so_and_closes_for_a_reconnect() -> None:
    node = await sync_to_async(NodeFactory)(address="127.0.0.1:1")
    cookie = await sync_to_async(session_cookie)(staff=True)
    ws = communicator(f"/ws/nodes/{node.pk}/backend-logs/m%230", cookie)
    connected, _ = await ws.connect(timeout=10)
    assert connected
    assert (await receive(ws))["type"] == "error"
    output = await ws.receive_output(timeout=10)
    assert output == {"type": "websocket.close", "code": 4502}


async def test_initial_batch_then_live_lines_none_lost_or_twice_at_the_seam(start_agent_node) -> None:
    agent_node: AgentNode = await sync_to_async(start_agent_node)()
    address = await asyncio.to_thread(agent_node.load, "model-a", 0)
    await asyncio.to_thread(agent_node.load, "model-a", 1)
    for index in range(3):
        await asyncio.to_thread(agent_node.predict, address, f"before {index}")
    cookie = await sync_to_async(session_cookie)(staff=True)

    # Lines keep coming while the socket opens: the seam between the batch and the stream is crossed live.
    writing = threading.Event()

    def write_during_connect() -> None:
        writing.set()
        for index in range(30):
            agent_node.predict(address, "x " * (index + 1))

    writer = threading.Thread(target=write_during_connect)
    writer.start()
    writing.wait()
    ws = communicator(f"/ws/nodes/{agent_node.node.pk}/backend-logs/model-a%230", cookie)
    connected, _ = await ws.connect(timeout=10)
    assert connected
    first = await receive(ws)
    assert first["type"] == "initial"
    received = list(first["lines"])
    assert sum(line["text"].startswith("Predict") for line in received) >= 3
    await asyncio.to_thread(writer.join)
    await asyncio.to_thread(agent_node.predict, address, "after")
    while sum(line["text"].startswith("Predict") for line in received) < 34:
        message = await receive(ws)
        assert message["type"] == "line"
        received.append(message["line"])

    assert {line["process_key"] for line in received} == {"model-a#0"}  # never model-a#1's lines
    seqs = [line["seq"] for line in received]
    assert seqs == sorted(set(seqs))  # each line once, in order
    buffered = await asyncio.to_thread(agent_node.client().get_logs, "model-a#0")
    assert seqs == [line.seq for line in buffered]  # and none missing
    assert set(received[-1]) == {"process_key", "timestamp", "stream", "text", "seq"}
    await ws.disconnect(timeout=10)


async def test_merged_key_relays_every_replica_and_leaving_cancels_the_stream(start_agent_node) -> None:
    agent_node: AgentNode = await sync_to_async(start_agent_node)()
    first = await asyncio.to_thread(agent_node.load, "model-a", 0)
    second = await asyncio.to_thread(agent_node.load, "model-a", 1)
    cookie = await sync_to_async(session_cookie)(staff=True)
    ws = communicator(f"/ws/nodes/{agent_node.node.pk}/backend-logs/model-a", cookie)
    connected, _ = await ws.connect(timeout=10)
    assert connected
    initial = await receive(ws)
    assert {line["process_key"] for line in initial["lines"]} == {"model-a#0", "model-a#1"}
    await asyncio.to_thread(agent_node.predict, second, "live")
    line = (await receive(ws))["line"]
    assert line["process_key"] == "model-a#1" and line["text"].startswith("Predict")
    await ws.disconnect(timeout=10)
    # The agent keeps serving other watchers after this one left.
    await asyncio.to_thread(agent_node.predict, first, "still")
    again = communicator(f"/ws/nodes/{agent_node.node.pk}/backend-logs/model-a%230", cookie)
    connected, _ = await again.connect(timeout=10)
    assert connected
    texts = [line["text"] for line in (await receive(again))["lines"]]
    assert any(text.startswith("Predict") for text in texts)
    await again.disconnect(timeout=10)
