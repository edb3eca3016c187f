"""The control plane's `WorkerControl` clients: the one place that applies `LOCALAI_GRPC_TLS_*`.

`worker_client` takes TLS material as arguments (the agent side must not import Django); this module reads
the settings, loads the PEM files (again when one changes on disk, so certificates can be rotated without a
restart) and hands them to every client the control plane makes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from worker_client.client import AsyncWorkerControlClient, ChannelTls, WorkerControlClient


def _modified(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns if path else 0
    except OSError:
        return 0


def _read(name: str, path: str) -> bytes | None:
    try:
        return Path(path).read_bytes() if path else None
    except OSError as error:
        raise ImproperlyConfigured(f"{name}: cannot read {path!r}: {error.strerror}") from None


@functools.lru_cache(maxsize=4)
def _load(ca: str, cert: str, key: str, server_name: str, _mtimes: tuple[int, ...]) -> ChannelTls:
    return ChannelTls(
        root_certificates=_read("LOCALAI_GRPC_TLS_CA", ca) or b"",
        certificate_chain=_read("LOCALAI_GRPC_TLS_CLIENT_CERT", cert),
        private_key=_read("LOCALAI_GRPC_TLS_CLIENT_KEY", key),
        server_name=server_name,
    )


def agent_channel_tls() -> ChannelTls | None:
    """The TLS material for agent channels, or None (plaintext) while `LOCALAI_GRPC_TLS_CA` is unset."""
    ca = settings.LOCALAI_GRPC_TLS_CA
    if not ca:
        return None
    cert, key = settings.LOCALAI_GRPC_TLS_CLIENT_CERT, settings.LOCALAI_GRPC_TLS_CLIENT_KEY
    mtimes = (_modified(ca), _modified(cert), _modified(key))
    return _load(ca, cert, key, settings.LOCALAI_GRPC_TLS_SERVER_NAME, mtimes)


def worker_control_client(address: str, token: str, timeout: float) -> WorkerControlClient:
    """A blocking client of the agent at `address`, over TLS when configured."""
    return WorkerControlClient(address, token, timeout, tls=agent_channel_tls())


def async_worker_control_client(address: str, token: str, timeout: float) -> AsyncWorkerControlClient:
    """A `grpc.aio` client of the agent at `address`, over TLS when configured."""
    return AsyncWorkerControlClient(address, token, timeout, tls=agent_channel_tls())
