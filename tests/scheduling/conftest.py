from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import free_port, wait_until
from tests.scheduling.fake_agent import FakeAgent, FakeAgentServer
from worker_client.client import backend_health


@pytest.fixture
def echo_backend() -> Iterator[Callable[[str], tuple[str, subprocess.Popen]]]:
    """Start real echo backend processes on 127.0.0.1: `address, process = echo_backend(token)`."""
    processes: list[subprocess.Popen] = []

    def start(token: str) -> tuple[str, subprocess.Popen]:
        address = f"127.0.0.1:{free_port()}"
        process = subprocess.Popen(
            [sys.executable, "-m", "worker_client.backends.echo", "--addr", address],
            env={**os.environ, "LOCALAI_GRPC_AUTH_TOKEN": token},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_until(lambda: backend_health(address, token, timeout=1), timeout=30, message="echo backend")
        return address, process

    yield start
    for process in processes:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    """A real in-process gRPC WorkerControl server that records LoadReplica and StopReplica calls."""
    fake = FakeAgent()
    with FakeAgentServer(fake) as server:
        fake.address = server.address
        yield fake
