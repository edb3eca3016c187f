"""The control plane's typed client for the worker agents (`WorkerControl`) and their backends (`Backend`).

Plain Python (no Django). Every call has a deadline and presents `authorization: Bearer <token>`; every
failure is raised as `WorkerError`. Channels are reused: sync ones per (address, TLS), `grpc.aio` ones per
(address, TLS, event loop), since an aio channel belongs to the loop it was made on. WorkerControl channels
use TLS when given a `ChannelTls`; backend channels are always plaintext (LocalAI's backends serve no TLS).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from worker_client._generated import backend_pb2, backend_pb2_grpc, worker_pb2, worker_pb2_grpc
from worker_client.auth import bearer_metadata
from worker_client.errors import WorkerError

DEFAULT_TIMEOUT = 10.0
DEFAULT_LOAD_TIMEOUT = 300.0
DEFAULT_BACKEND_TIMEOUT = 300.0
DEFAULT_HEALTH_TIMEOUT = 2.0

# Short reconnect backoff: a replaced backend comes back on the same port within a second or two.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Not `grpc.min_reconnect_backoff_ms`: gRPC also takes it as the minimum connect timeout, and at 100 ms a
    # busy agent's handshake times out ("timed out before receiving SETTINGS frame"); the default is 20 s.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_metadata_size", 64 * 1024),  # room for a failed load's stderr lines in the status message
    # Subchannels of this channel only: gRPC shares them process-wide by default, so a channel made to replace
    # one whose connection failed (`_renew_aio_channel`) would inherit its reconnect backoff.
    ("grpc.use_local_subchannel_pool", 1),
)

T = TypeVar("T")


@dataclass(frozen=True)
class LoadResult:
    """A backend process that answers `Health` and has loaded its model."""

    process_key: str
    address: str
    pid: int
    load_seconds: float


@dataclass(frozen=True)
class ReplicaProcess:
    """One backend process an agent runs; `state` is "loading" or "running"."""

    process_key: str
    model_name: str
    replica_index: int
    address: str
    pid: int
    state: str
    started_at: float
    backend: str
    vram_bytes: int


@dataclass(frozen=True)
class LogLine:
    """One line a backend wrote; `stream` is "stdout" or "stderr", `timestamp` Unix seconds."""

    process_key: str
    timestamp: float
    stream: str
    text: str
    seq: int = 0


@dataclass(frozen=True)
class Reply:
    """A backend's answer (or, in a stream, one piece of it)."""

    message: str
    tokens: int
    prompt_tokens: int


# --- channels -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelTls:
    """TLS for WorkerControl channels, as PEM contents.

    `root_certificates`: the CA that signed the agents' certificates (the agent's certificate must name the
    host dialed in its subjectAltName, an IP address or a DNS name, unless `server_name` is given: then that
    name is checked instead, for every agent). `certificate_chain` and `private_key`: the control plane's
    client certificate, for agents that require one (mTLS).
    """

    root_certificates: bytes
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def options(self) -> tuple[tuple[str, Any], ...]:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()


_ChannelKey = tuple[str, ChannelTls | None]
_sync_channels: dict[_ChannelKey, grpc.Channel] = {}
_sync_channels_lock = threading.Lock()
_aio_channels: dict[int, tuple[asyncio.AbstractEventLoop, dict[_ChannelKey, grpc.aio.Channel]]] = {}


def _sync_channel(address: str, tls: ChannelTls | None = None) -> grpc.Channel:
    with _sync_channels_lock:
        channel = _sync_channels.get((address, tls))
        if channel is None:
            if tls is None:
                channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
            else:
                options = _CHANNEL_OPTIONS + tls.options()
                channel = grpc.secure_channel(address, tls.credentials(), options=options)
            _sync_channels[(address, tls)] = channel
        return channel


def _aio_channel(address: str, tls: ChannelTls | None = None) -> grpc.aio.Channel:
    """The channel to `address` on the running loop; forgets the channels of loops that have closed."""
    loop = asyncio.get_running_loop()
    for key, (other_loop, _) in list(_aio_channels.items()):
        if other_loop.is_closed():
            del _aio_channels[key]
    _, channels = _aio_channels.setdefault(id(loop), (loop, {}))
    channel = channels.get((address, tls))
    if channel is None:
        if tls is None:
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        else:
            options = _CHANNEL_OPTIONS + tls.options()
            channel = grpc.aio.secure_channel(address, tls.credentials(), options=options)
        channels[(address, tls)] = channel
    return channel


def _renew_aio_channel(address: str, tls: ChannelTls | None = None) -> None:
    """After an `UNAVAILABLE` failure on `address`: the running loop's channel to it, unless connected, is
    replaced by a new one at the next call. A channel whose connection failed stays in TRANSIENT_FAILURE for
    its reconnect backoff and fails every call at once meanwhile, even when a new process already listens there
    (a replica loaded again on the same port after its backend died). The old one closes once its calls end."""
    loop = asyncio.get_running_loop()
    _, channels = _aio_channels.get(id(loop), (loop, {}))
    channel = channels.get((address, tls))
    if channel is None or channel.get_state() == grpc.ChannelConnectivity.READY:
        return
    del channels[(address, tls)]
    closing = loop.create_task(channel.close(grace=DEFAULT_BACKEND_TIMEOUT))
    _closing_channels.add(closing)
    closing.add_done_callback(_closing_channels.discard)


_closing_channels: set[asyncio.Task[None]] = set()


def _forget_sync_channel(address: str, channel: grpc.Channel) -> None:
    """`_renew_aio_channel` for the sync channel a backend probe used (no other call uses a backend's)."""
    with _sync_channels_lock:
        if _sync_channels.get((address, None)) is channel:
            del _sync_channels[(address, None)]
    channel.close()


# --- messages -------------------------------------------------------------------------------------------


def _load_request(
    model_name: str,
    replica_index: int,
    backend: str,
    model_options: Mapping[str, Any] | None,
    vram_bytes: int,
    load_timeout: float,
    files: Sequence[Mapping[str, Any]] = (),
    download_timeout: float = 0.0,
) -> worker_pb2.LoadReplicaRequest:
    return worker_pb2.LoadReplicaRequest(
        model_name=model_name,
        replica_index=replica_index,
        backend=backend,
        model_options=backend_pb2.ModelOptions(**(model_options or {})),
        vram_bytes=vram_bytes,
        load_timeout_seconds=load_timeout,
        files=artifact_messages(files),
        download_timeout_seconds=download_timeout,
    )


def artifact_messages(files: Sequence[Mapping[str, Any]]) -> list[worker_pb2.ArtifactFile]:
    """Catalog `files` entries (`uri`, `sha256`, `size`, `path`) as protocol messages."""
    return [
        worker_pb2.ArtifactFile(
            uri=str(f.get("uri", "")),
            sha256=str(f.get("sha256") or ""),
            size=int(f.get("size") or 0),
            path=str(f.get("path", "")),
        )
        for f in files
    ]


def _load_result(reply: worker_pb2.LoadReplicaReply) -> LoadResult:
    return LoadResult(reply.process_key, reply.address, reply.pid, reply.load_seconds)


def _replicas(reply: worker_pb2.ListReplicasReply) -> list[ReplicaProcess]:
    return [
        ReplicaProcess(
            process_key=r.process_key,
            model_name=r.model_name,
            replica_index=r.replica_index,
            address=r.address,
            pid=r.pid,
            state=r.state,
            started_at=r.started_at,
            backend=r.backend,
            vram_bytes=r.vram_bytes,
        )
        for r in reply.replicas
    ]


def log_line_from_message(line: worker_pb2.LogLine) -> LogLine:
    """The dataclass of a `worker.LogLine` message."""
    return LogLine(line.process_key, line.timestamp, line.stream, line.text, line.seq)


def log_line_to_message(line: LogLine) -> worker_pb2.LogLine:
    """The `worker.LogLine` message of a dataclass."""
    return worker_pb2.LogLine(
        process_key=line.process_key,
        timestamp=line.timestamp,
        stream=line.stream,
        text=line.text,
        seq=line.seq,
    )


def _predict_options(
    options: Mapping[str, Any] | None, fields: Mapping[str, Any]
) -> backend_pb2.PredictOptions:
    """`PredictOptions` from field names, e.g. {"Messages": [{"role": "user", "content": "hi"}], "Tokens": 8}."""
    return backend_pb2.PredictOptions(**{**(options or {}), **fields})


def _reply(reply: backend_pb2.Reply) -> Reply:
    return Reply(reply.message.decode("utf-8", errors="replace"), reply.tokens, reply.prompt_tokens)


_SERVING = health_pb2.HealthCheckResponse.SERVING

# --- WorkerControl --------------------------------------------------------------------------------------


class _Caller:
    """Address, token and default deadline of one server; wraps gRPC failures in `WorkerError`."""

    def __init__(self, address: str, token: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = bearer_metadata(token)

    def _error(self, error: grpc.RpcError, method: str) -> WorkerError:
        return WorkerError.from_rpc_error(error, address=self.address, method=method)

    def _aerror(self, error: grpc.RpcError, method: str) -> WorkerError:
        """`_error` of an aio call; after `UNAVAILABLE`, the next call gets a fresh channel."""
        failure = self._error(error, method)
        if failure.unavailable:
            _renew_aio_channel(self.address)
        return failure

    def _call(self, stub: Any, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error, method) from error

    async def _acall(self, stub: Any, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            call: Awaitable[Any] = getattr(stub, method)(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
            return await call
        except grpc.RpcError as error:
            raise self._aerror(error, method) from error

    async def _astream(
        self, stub: Any, method: str, request: Any, convert: Callable[[Any], T], timeout: float | None
    ) -> AsyncGenerator[T, None]:
        """Yields converted messages; an error after the first message is never `connect_failed`."""
        call = getattr(stub, method)(request, timeout=timeout, metadata=self._metadata)
        received = False
        try:
            async for message in call:
                received = True
                yield convert(message)
        except grpc.RpcError as error:
            failure = self._aerror(error, method)
            failure.connect_failed = failure.connect_failed and not received
            raise failure from error
        finally:
            call.cancel()


class LogStream:
    """The lines of a `StreamLogs` call; `cancel()`, from any thread, ends the iteration quietly.

    Use as `with client.stream_logs(key) as lines: for line in lines: ...`.
    """

    def __init__(self, call: Any, error: Callable[[grpc.RpcError], WorkerError]) -> None:
        self._call = call
        self._error = error
        self._cancelled = False

    def __iter__(self) -> Iterator[LogLine]:
        return self

    def __next__(self) -> LogLine:
        try:
            return log_line_from_message(next(self._call))
        except grpc.RpcError as error:
            if self._cancelled:
                raise StopIteration from None
            raise self._error(error) from error

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> LogStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class WorkerControlClient(_Caller):
    """Blocking client of one agent's `WorkerControl` service; over TLS when given `tls`."""

    def __init__(
        self, address: str, token: str, timeout: float = DEFAULT_TIMEOUT, *, tls: ChannelTls | None = None
    ) -> None:
        super().__init__(address, token, timeout)
        channel = _sync_channel(address, tls)
        self._stub = worker_pb2_grpc.WorkerControlStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    def load_replica(
        self,
        model_name: str,
        replica_index: int,
        backend: str,
        model_options: Mapping[str, Any] | None = None,
        vram_bytes: int = 0,
        load_timeout: float = DEFAULT_LOAD_TIMEOUT,
        *,
        files: Sequence[Mapping[str, Any]] = (),
        download_timeout: float = 0.0,
    ) -> LoadResult:
        """Starts `<model_name>#<replica_index>` and loads it; waits up to `load_timeout` (+ the deadline), plus
        `download_timeout` when it has `files` to stage first."""
        request = _load_request(
            model_name,
            replica_index,
            backend,
            model_options,
            vram_bytes,
            load_timeout,
            files,
            download_timeout,
        )
        wait = load_timeout + self.timeout + (download_timeout if files else 0.0)
        return _load_result(self._call(self._stub, "LoadReplica", request, wait))

    def stage_files(
        self, model_name: str, files: Sequence[Mapping[str, Any]], download_timeout: float = 0.0
    ) -> tuple[list[str], list[str]]:
        """Asks the agent to stage `files` in the background; answers (downloading paths, held paths)."""
        request = worker_pb2.StageFilesRequest(
            model_name=model_name, files=artifact_messages(files), download_timeout_seconds=download_timeout
        )
        reply = self._call(self._stub, "StageFiles", request)
        return list(reply.downloading), list(reply.held)

    def stop_replica(self, id: str) -> list[str]:
        """Stops `model#N`, or every replica of a bare model name; answers the keys stopped."""
        return list(self._call(self._stub, "StopReplica", worker_pb2.StopReplicaRequest(id=id)).stopped)

    def list_replicas(self) -> list[ReplicaProcess]:
        """The backend processes the agent runs."""
        return _replicas(self._call(self._stub, "ListReplicas", worker_pb2.ListReplicasRequest()))

    def get_logs(self, id: str, tail: int = 0) -> list[LogLine]:
        """Buffered lines of a key or of a bare model's replicas merged by time; `tail` > 0 keeps the last N."""
        reply = self._call(self._stub, "GetLogs", worker_pb2.GetLogsRequest(id=id, tail=tail))
        return [log_line_from_message(line) for line in reply.lines]

    def log_keys(self) -> list[str]:
        """Process keys with log buffers, stopped processes' included."""
        return list(self._call(self._stub, "ListLogKeys", worker_pb2.ListLogKeysRequest()).keys)

    def stream_logs(self, id: str, timeout: float | None = None) -> LogStream:
        """Buffered lines, then live ones, until cancelled (or `timeout` seconds, when given)."""
        call = self._stub.StreamLogs(
            worker_pb2.StreamLogsRequest(id=id), timeout=timeout, metadata=self._metadata
        )
        return LogStream(call, functools.partial(self._error, method="StreamLogs"))

    def health(self) -> bool:
        """Whether the agent's standard gRPC health service answers SERVING."""
        try:
            reply = self._call(self._health, "Check", health_pb2.HealthCheckRequest())
        except WorkerError:
            return False
        return bool(reply.status == _SERVING)


class AsyncWorkerControlClient(_Caller):
    """`grpc.aio` client of one agent's `WorkerControl` service (for async views and Channels consumers): the
    calls they make (replica list, logs); loads and stops go through the sync `WorkerControlClient`.

    It may be made anywhere and used on any event loop: each call takes the channel of the running loop.
    Over TLS when given `tls`.
    """

    def __init__(
        self, address: str, token: str, timeout: float = DEFAULT_TIMEOUT, *, tls: ChannelTls | None = None
    ) -> None:
        super().__init__(address, token, timeout)
        self._tls = tls

    @property
    def _stub(self) -> worker_pb2_grpc.WorkerControlStub:
        return worker_pb2_grpc.WorkerControlStub(_aio_channel(self.address, self._tls))

    async def list_replicas(self) -> list[ReplicaProcess]:
        """See `WorkerControlClient.list_replicas`."""
        return _replicas(await self._acall(self._stub, "ListReplicas", worker_pb2.ListReplicasRequest()))

    async def get_logs(self, id: str, tail: int = 0) -> list[LogLine]:
        """See `WorkerControlClient.get_logs`."""
        reply = await self._acall(self._stub, "GetLogs", worker_pb2.GetLogsRequest(id=id, tail=tail))
        return [log_line_from_message(line) for line in reply.lines]

    def stream_logs(self, id: str, timeout: float | None = None) -> AsyncGenerator[LogLine, None]:
        """See `WorkerControlClient.stream_logs`: `async for line in client.stream_logs(key)`."""
        request = worker_pb2.StreamLogsRequest(id=id)
        return self._astream(self._stub, "StreamLogs", request, log_line_from_message, timeout)


# --- Backend --------------------------------------------------------------------------------------------


_BACKEND_STUB = "_localai_backend_stub"


class BackendClient(_Caller):
    """`grpc.aio` client of one backend process (LocalAI's `Backend` service), for the gateway and the agent.

    Predict options are `PredictOptions` field names, given as a mapping, as keyword arguments, or both.
    """

    def __init__(self, address: str, token: str, timeout: float = DEFAULT_BACKEND_TIMEOUT) -> None:
        super().__init__(address, token, timeout)

    @property
    def _stub(self) -> backend_pb2_grpc.BackendStub:
        # Built once per channel and kept on it (its constructor builds one callable per RPC: the gateway paid
        # that on every request); a renewed channel, or another event loop's, gets its own.
        channel = _aio_channel(self.address)
        stub = channel.__dict__.get(_BACKEND_STUB)
        if stub is None:
            stub = channel.__dict__[_BACKEND_STUB] = backend_pb2_grpc.BackendStub(channel)
        return stub

    async def predict(
        self, options: Mapping[str, Any] | None = None, /, *, timeout: float | None = None, **fields: Any
    ) -> Reply:
        """The whole answer."""
        return _reply(await self._acall(self._stub, "Predict", _predict_options(options, fields), timeout))

    def predict_stream(
        self, options: Mapping[str, Any] | None = None, /, *, timeout: float | None = None, **fields: Any
    ) -> AsyncGenerator[Reply, None]:
        """The answer piece by piece; `timeout` bounds the whole stream."""
        request = _predict_options(options, fields)
        return self._astream(self._stub, "PredictStream", request, _reply, timeout or self.timeout)

    async def embedding(self, text: str, timeout: float | None = None) -> list[float]:
        """The embedding vector of `text`."""
        request = backend_pb2.PredictOptions(Embeddings=text, Prompt=text)
        return list((await self._acall(self._stub, "Embedding", request, timeout)).embeddings)

    async def load_model(
        self, model_options: Mapping[str, Any] | backend_pb2.ModelOptions, timeout: float | None = None
    ) -> tuple[bool, str]:
        """`LoadModel` with `ModelOptions` (a message, or its fields by name): (success, message)."""
        if not isinstance(model_options, backend_pb2.ModelOptions):
            model_options = backend_pb2.ModelOptions(**model_options)
        result = await self._acall(self._stub, "LoadModel", model_options, timeout)
        return result.success, result.message

    async def health(self, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> bool:
        """Whether `Health` answers OK within `timeout`."""
        try:
            reply = await self._acall(self._stub, "Health", backend_pb2.HealthMessage(), timeout)
        except WorkerError:
            return False
        return bool(reply.message == b"OK")


def backend_health(address: str, token: str, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> bool:
    """Blocking probe: whether the backend at `address` answers `Health` with OK within `timeout`."""
    channel = _sync_channel(address)
    stub = backend_pb2_grpc.BackendStub(channel)
    try:
        reply = stub.Health(backend_pb2.HealthMessage(), timeout=timeout, metadata=bearer_metadata(token))
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
            _forget_sync_channel(address, channel)
        return False
    return bool(reply.message == b"OK")
