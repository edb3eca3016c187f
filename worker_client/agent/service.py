"""The agent's gRPC server: `WorkerControl` (behind the node token) and the standard health service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from worker_client._generated import worker_pb2, worker_pb2_grpc
from worker_client.agent.artifacts import ArtifactFile, StagingError, check_relative_path
from worker_client.agent.config import ServerTls
from worker_client.agent.keys import SEPARATOR
from worker_client.agent.logstore import LogStore
from worker_client.agent.ports import NoFreePort
from worker_client.agent.supervisor import (
    LoadFailed,
    LoadRequest,
    ModelPathRefused,
    Replica,
    Supervisor,
    UnknownBackend,
)
from worker_client.auth import BearerTokenInterceptor
from worker_client.client import log_line_to_message

DEFAULT_LOAD_TIMEOUT = 300.0
DEFAULT_DOWNLOAD_TIMEOUT = 3600.0
_STAGING_CODES = {
    "checksum": grpc.StatusCode.FAILED_PRECONDITION,
    "source": grpc.StatusCode.FAILED_PRECONDITION,
    "budget": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
}


def artifact_files(messages: Any) -> tuple[ArtifactFile, ...]:
    return tuple(
        ArtifactFile(uri=m.uri, sha256=m.sha256.lower(), size=int(m.size), path=m.path) for m in messages
    )


_HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def _replica_message(replica: Replica) -> worker_pb2.ReplicaProcess:
    return worker_pb2.ReplicaProcess(
        process_key=replica.key,
        model_name=replica.model_name,
        replica_index=replica.replica_index,
        address=replica.address,
        pid=replica.pid,
        state=replica.state,
        started_at=replica.started_at,
        backend=replica.backend,
        vram_bytes=replica.vram_bytes,
    )


class WorkerControlService(worker_pb2_grpc.WorkerControlServicer):
    """Thin adapter from `WorkerControl` calls to the supervisor and the log store."""

    def __init__(self, supervisor: Supervisor, logs: LogStore, *, hosts_models: bool = True) -> None:
        self._supervisor = supervisor
        self._logs = logs
        self._hosts_models = hosts_models

    async def LoadReplica(
        self, request: worker_pb2.LoadReplicaRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadReplicaReply:
        if not self._hosts_models:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this node's type is agent: it hosts no models"
            )
        if not request.model_name or SEPARATOR in request.model_name or request.replica_index < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "model_name without '#' and replica_index >= 0"
            )
        load = LoadRequest(
            model_name=request.model_name,
            replica_index=request.replica_index,
            backend=request.backend,
            model_options=request.model_options,
            vram_bytes=request.vram_bytes,
            load_timeout=request.load_timeout_seconds or DEFAULT_LOAD_TIMEOUT,
            files=artifact_files(request.files),
            download_timeout=request.download_timeout_seconds or DEFAULT_DOWNLOAD_TIMEOUT,
        )
        try:
            replica = await self._supervisor.load(load)
        except StagingError as error:
            await context.abort(
                _STAGING_CODES.get(error.kind, grpc.StatusCode.FAILED_PRECONDITION), str(error)
            )
        except (UnknownBackend, ModelPathRefused) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except NoFreePort as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except LoadFailed as error:
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED if error.timed_out else grpc.StatusCode.FAILED_PRECONDITION
            )
            await context.abort(code, str(error))
        return worker_pb2.LoadReplicaReply(
            process_key=replica.key,
            address=replica.address,
            pid=replica.pid,
            load_seconds=replica.load_seconds,
        )

    async def StageFiles(
        self, request: worker_pb2.StageFilesRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.StageFilesReply:
        """Prefetch: starts staging the files in the background (one download per file, shared with loads)
        and answers at once which are held and which are downloading."""
        files = artifact_files(request.files)
        try:
            for file in files:
                check_relative_path(file.path)
        except StagingError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        store = self._supervisor.artifacts
        held = [file.path for file in files if store.is_staged(file)]
        missing = [file for file in files if file.path not in held]
        if missing:
            timeout = request.download_timeout_seconds or DEFAULT_DOWNLOAD_TIMEOUT
            task = asyncio.create_task(store.ensure(missing, timeout=timeout))
            _prefetches.add(task)
            task.add_done_callback(_prefetch_done)
        return worker_pb2.StageFilesReply(downloading=[file.path for file in missing], held=held)

    async def StopReplica(
        self, request: worker_pb2.StopReplicaRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.StopReplicaReply:
        return worker_pb2.StopReplicaReply(stopped=await self._supervisor.stop(request.id))

    async def ListReplicas(
        self, request: worker_pb2.ListReplicasRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ListReplicasReply:
        return worker_pb2.ListReplicasReply(
            replicas=[_replica_message(r) for r in self._supervisor.replicas()]
        )

    async def GetLogs(
        self, request: worker_pb2.GetLogsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetLogsReply:
        lines = self._logs.read(request.id, request.tail)
        return worker_pb2.GetLogsReply(lines=[log_line_to_message(line) for line in lines])

    async def StreamLogs(
        self, request: worker_pb2.StreamLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.LogLine]:
        """The buffered lines, then live ones: subscribed before the snapshot, de-duplicated by `seq`."""
        subscription = self._logs.subscribe(request.id)
        try:
            last_seq = 0
            for line in self._logs.read(request.id):
                last_seq = max(last_seq, line.seq)
                yield log_line_to_message(line)
            while True:
                if subscription.overflowed and subscription.queue.empty():
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "log consumer fell too far behind"
                    )
                line = await subscription.queue.get()
                if line.seq > last_seq:
                    yield log_line_to_message(line)
        finally:
            self._logs.unsubscribe(subscription)

    async def ListLogKeys(
        self, request: worker_pb2.ListLogKeysRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ListLogKeysReply:
        return worker_pb2.ListLogKeysReply(keys=self._logs.keys())


_prefetches: set[asyncio.Task[None]] = set()
log = logging.getLogger(__name__)


def _prefetch_done(task: asyncio.Task[None]) -> None:
    _prefetches.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("prefetch failed: %s", task.exception())


class CannotListen(Exception):
    """The agent's address is taken or invalid."""


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """TLS with the agent's certificate; with `client_ca`, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.client_ca is not None,
    )


async def start_server(
    address: str,
    service: WorkerControlService,
    node_token: Callable[[], str],
    tls: ServerTls | None = None,
) -> grpc.aio.Server:
    """The agent's running server: every `WorkerControl` call must present the current node token; health is
    open (to anyone who passes the TLS handshake, when `tls` is given)."""
    server = grpc.aio.server(
        interceptors=[BearerTokenInterceptor(node_token, open_methods=_HEALTH_METHODS)],
        options=[("grpc.so_reuseport", 0)],
    )
    worker_pb2_grpc.add_WorkerControlServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", worker_pb2.DESCRIPTOR.services_by_name["WorkerControl"].full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, server_credentials(tls))
    except RuntimeError as error:
        raise CannotListen(f"cannot listen on {address}: {error}") from error
    if not bound:
        raise CannotListen(f"cannot listen on {address}")
    await server.start()
    return server
