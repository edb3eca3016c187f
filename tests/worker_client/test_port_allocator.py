"""Backend ports: base + 1 upwards, lowest free first, reused (SCENARIOS 157-158)."""

from __future__ import annotations

import socket

import pytest

from worker_client.agent.ports import NoFreePort, PortAllocator, can_bind


def test_ports_start_after_the_agents_own_port() -> None:
    ports = PortAllocator(50051, lambda port: True)
    assert [ports.acquire() for _ in range(3)] == [50052, 50053, 50054]


def test_a_released_port_is_the_next_one_handed_out() -> None:
    ports = PortAllocator(50051, lambda port: True)
    first, second = ports.acquire(), ports.acquire()
    ports.release(first)
    assert ports.acquire() == first
    ports.release(second)
    ports.release(second)
    assert ports.acquire() == second
    assert ports.acquire() == 50054


def test_ports_busy_on_the_host_are_skipped() -> None:
    ports = PortAllocator(50051, lambda port: port != 50052)
    assert ports.acquire() == 50053


def test_running_out_of_ports_is_an_error() -> None:
    ports = PortAllocator(65534, lambda port: True)
    assert ports.acquire() == 65535
    with pytest.raises(NoFreePort):
        ports.acquire()


def test_can_bind_sees_a_listening_socket() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not can_bind("127.0.0.1", port)
    assert can_bind("127.0.0.1", port)
