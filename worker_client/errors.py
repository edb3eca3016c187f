"""The one error type of `worker_client.client`."""

from __future__ import annotations

import grpc

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Substrings gRPC puts in an UNAVAILABLE status when no connection could be made at all.
_CONNECT_FAILURE_HINTS = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "dns resolution failed",
)


class WorkerError(Exception):
    """A call to an agent or a backend failed.

    `retryable` says whether trying again (here or on another replica) can help; `connect_failed` says the
    call never reached the server, so not a byte of the request was processed; `unavailable` says the server
    could not be reached or the connection to it broke (status `UNAVAILABLE`: refused, reset, closed, stream
    removed), whatever the message's wording; `details` is the server's status message (for a failed
    `LoadReplica`, it ends with the backend's last stderr lines).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        retryable: bool = False,
        connect_failed: bool = False,
        details: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.connect_failed = connect_failed
        self.details = details

    @property
    def unavailable(self) -> bool:
        return self.code == grpc.StatusCode.UNAVAILABLE

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, *, address: str, method: str) -> WorkerError:
        """Translate a gRPC failure of `method` on `address`."""
        code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        details: str = error.details() or ""  # type: ignore[attr-defined]
        connect_failed = code == grpc.StatusCode.UNAVAILABLE and any(
            hint in details.lower() for hint in _CONNECT_FAILURE_HINTS
        )
        return cls(
            f"{method} on {address} failed: {code.name}: {details}",
            code=code,
            retryable=code in _RETRYABLE,
            connect_failed=connect_failed,
            details=details,
        )
