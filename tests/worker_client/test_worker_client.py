"""The typed client's error mapping and channel reuse."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import free_port
from worker_client import client as client_module
from worker_client.client import BackendClient, WorkerControlClient, backend_health
from worker_client.errors import WorkerError


async def test_refused_connection_is_retryable_and_connect_failed() -> None:
    with pytest.raises(WorkerError) as failure:
        await BackendClient(f"127.0.0.1:{free_port()}", "t").predict(Prompt="hi")
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert failure.value.retryable and failure.value.connect_failed


async def test_refused_stream_is_connect_failed() -> None:
    with pytest.raises(WorkerError) as failure:
        [reply async for reply in BackendClient(f"127.0.0.1:{free_port()}", "t").predict_stream(Prompt="hi")]
    assert failure.value.connect_failed


def test_sync_calls_map_errors_too() -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(WorkerError) as failure:
        WorkerControlClient(address, "t", timeout=5).list_replicas()
    assert failure.value.retryable and failure.value.connect_failed
    assert not WorkerControlClient(address, "t", timeout=5).health()
    assert not backend_health(address, "t", timeout=1)


def test_async_channels_are_kept_per_event_loop() -> None:
    address = f"127.0.0.1:{free_port()}"

    async def channel() -> grpc.aio.Channel:
        return client_module._aio_channel(address)

    async def twice() -> tuple[grpc.aio.Channel, grpc.aio.Channel]:
        return await channel(), await channel()

    first, same = asyncio.run(twice())
    other = asyncio.run(channel())
    assert first is same and other is not first


async def test_a_backend_stub_is_built_once_per_channel() -> None:
    """The gateway's `BackendClient` per request reuses the stub of the channel; a renewed channel (after a
    failure to connect) gets a stub of its own."""
    address = f"127.0.0.1:{free_port()}"
    stub = BackendClient(address, "a")._stub
    assert BackendClient(address, "b")._stub is stub
    client_module._renew_aio_channel(address)  # not connected: replaced at the next call
    renewed = BackendClient(address, "a")._stub
    assert renewed is not stub and renewed is BackendClient(address, "a")._stub
