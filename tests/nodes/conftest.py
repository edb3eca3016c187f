"""Fixtures of the registry tests: an API client, a registration helper, a recorder of capacity events, and a
real in-process WorkerControl gRPC server standing in for an agent."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from rest_framework.test import APIClient

from nodes.signals import cluster_capacity_changed
from tests.conftest import free_port
from tests.factories import TEST_CREDENTIAL
from worker_client._generated import worker_pb2, worker_pb2_grpc

GiB = 1024**3


@pytest.fixture
def api() -> APIClient:
    return APIClient()


@pytest.fixture
def register(api: APIClient) -> Callable[..., Any]:
    """POST /api/node/register with a minimal valid body (with the factories' node credential) merged with
    `fields`."""

    def _register(name: str = "w1", *, token: str | None = None, **fields: Any):
        body = {"name": name, "address": "127.0.0.1:50051", "node_credential": TEST_CREDENTIAL, **fields}
        headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
        return api.post("/api/node/register", body, format="json", **headers)

    return _register


@pytest.fixture
def capacity_events() -> Iterator[list[str]]:
    """The `reason` of every `cluster_capacity_changed` sent while the test runs."""
    reasons: list[str] = []

    def record(sender: Any, reason: str = "", **kwargs: Any) -> None:
        reasons.append(reason)

    cluster_capacity_changed.connect(record, weak=False, dispatch_uid="tests.nodes.capacity_events")
    try:
        yield reasons
    finally:
        cluster_capacity_changed.disconnect(dispatch_uid="tests.nodes.capacity_events")


@dataclass
class FakeAgent(worker_pb2_grpc.WorkerControlServicer):
    """A real gRPC WorkerControl server that records `StopReplica` calls and the bearer token presented."""

    address: str = ""
    stopped: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def StopReplica(self, request, context):
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.tokens.append(metadata.get("authorization", "").removeprefix("Bearer "))
            self.stopped.append(request.id)
        return worker_pb2.StopReplicaReply(stopped=[request.id])


@pytest.fixture
def fake_agent() -> Iterator[FakeAgent]:
    agent = FakeAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerControlServicer_to_server(agent, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    agent.address = f"127.0.0.1:{port}"
    try:
        yield agent
    finally:
        server.stop(grace=None)
