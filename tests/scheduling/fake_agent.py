"""A real in-process gRPC `WorkerControl` server that records calls, for placement tests without agents."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from tests.conftest import free_port
from worker_client._generated import worker_pb2, worker_pb2_grpc


@dataclass
class FakeAgent(worker_pb2_grpc.WorkerControlServicer):
    """Answers `LoadReplica` with a made-up backend address (or fails when `fail` is set); `on_load` runs
    inside the call (e.g. to look at the database while the control plane waits). The first
    `unauthenticated` calls are refused as an agent refuses them before it holds its node token."""

    fail: str = ""
    unauthenticated: int = 0
    load_seconds: float = 0.0
    on_load: Callable[[worker_pb2.LoadReplicaRequest], None] | None = None
    loads: list = field(default_factory=list)
    stops: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def LoadReplica(self, request, context):
        with self.lock:
            self.loads.append(request)
            refuse = self.unauthenticated > 0
            self.unauthenticated -= refuse
        if refuse:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong node token")
        if self.on_load:
            self.on_load(request)
        if self.load_seconds:
            if self.load_seconds > request.load_timeout_seconds:
                time.sleep(request.load_timeout_seconds)
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "backend did not become ready in time")
            time.sleep(self.load_seconds)
        if self.fail:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.fail)
        key = f"{request.model_name}#{request.replica_index}"
        return worker_pb2.LoadReplicaReply(
            process_key=key, address=f"127.0.0.1:{50000 + request.replica_index}"
        )

    def StopReplica(self, request, context):
        with self.lock:
            self.stops.append(request.id)
        return worker_pb2.StopReplicaReply(stopped=[request.id])


class FakeAgentServer:
    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.address = f"127.0.0.1:{free_port()}"
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        worker_pb2_grpc.add_WorkerControlServicer_to_server(agent, self.server)
        self.server.add_insecure_port(self.address)

    def __enter__(self) -> FakeAgentServer:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None)
