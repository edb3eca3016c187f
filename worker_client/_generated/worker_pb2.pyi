from . import backend_pb2 as _backend_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactFile(_message.Message):
    __slots__ = ("uri", "sha256", "size", "path")
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    uri: str
    sha256: str
    size: int
    path: str
    def __init__(self, uri: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class StageFilesRequest(_message.Message):
    __slots__ = ("model_name", "files", "download_timeout_seconds")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    files: _containers.RepeatedCompositeFieldContainer[ArtifactFile]
    download_timeout_seconds: float
    def __init__(self, model_name: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ArtifactFile, _Mapping]]] = ..., download_timeout_seconds: _Optional[float] = ...) -> None: ...

class StageFilesReply(_message.Message):
    __slots__ = ("downloading", "held")
    DOWNLOADING_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    downloading: _containers.RepeatedScalarFieldContainer[str]
    held: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, downloading: _Optional[_Iterable[str]] = ..., held: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadReplicaRequest(_message.Message):
    __slots__ = ("model_name", "replica_index", "backend", "model_options", "vram_bytes", "load_timeout_seconds", "files", "download_timeout_seconds")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    replica_index: int
    backend: str
    model_options: _backend_pb2.ModelOptions
    vram_bytes: int
    load_timeout_seconds: float
    files: _containers.RepeatedCompositeFieldContainer[ArtifactFile]
    download_timeout_seconds: float
    def __init__(self, model_name: _Optional[str] = ..., replica_index: _Optional[int] = ..., backend: _Optional[str] = ..., model_options: _Optional[_Union[_backend_pb2.ModelOptions, _Mapping]] = ..., vram_bytes: _Optional[int] = ..., load_timeout_seconds: _Optional[float] = ..., files: _Optional[_Iterable[_Union[ArtifactFile, _Mapping]]] = ..., download_timeout_seconds: _Optional[float] = ...) -> None: ...

class LoadReplicaReply(_message.Message):
    __slots__ = ("process_key", "address", "pid", "load_seconds")
    PROCESS_KEY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    process_key: str
    address: str
    pid: int
    load_seconds: float
    def __init__(self, process_key: _Optional[str] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class StopReplicaRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class StopReplicaReply(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stopped: _Optional[_Iterable[str]] = ...) -> None: ...

class ListReplicasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaProcess(_message.Message):
    __slots__ = ("process_key", "model_name", "replica_index", "address", "pid", "state", "started_at", "backend", "vram_bytes")
    PROCESS_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    process_key: str
    model_name: str
    replica_index: int
    address: str
    pid: int
    state: str
    started_at: float
    backend: str
    vram_bytes: int
    def __init__(self, process_key: _Optional[str] = ..., model_name: _Optional[str] = ..., replica_index: _Optional[int] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., started_at: _Optional[float] = ..., backend: _Optional[str] = ..., vram_bytes: _Optional[int] = ...) -> None: ...

class ListReplicasReply(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaProcess]
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaProcess, _Mapping]]] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("process_key", "timestamp", "stream", "text", "seq")
    PROCESS_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    process_key: str
    timestamp: float
    stream: str
    text: str
    seq: int
    def __init__(self, process_key: _Optional[str] = ..., timestamp: _Optional[float] = ..., stream: _Optional[str] = ..., text: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class GetLogsRequest(_message.Message):
    __slots__ = ("id", "tail")
    ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    id: str
    tail: int
    def __init__(self, id: _Optional[str] = ..., tail: _Optional[int] = ...) -> None: ...

class GetLogsReply(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    def __init__(self, lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ...) -> None: ...

class StreamLogsRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListLogKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLogKeysReply(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...
