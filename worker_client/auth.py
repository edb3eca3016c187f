"""Bearer-token check shared by the agent's and the backends' gRPC servers."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

AUTH_METADATA_KEY = "authorization"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting `token`; none when the token is empty."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


def _presented_token(metadata: tuple[Any, ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ")
    return None


def _denied_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, as UNAUTHENTICATED, every call whose `authorization: Bearer` is not the current token.

    `current_token` is asked on every call, so a token that changes (re-registration) takes effect at once;
    while it returns an empty string every call is refused. Methods in `open_methods` are not checked.
    """

    def __init__(self, current_token: Callable[[], str], open_methods: frozenset[str] = frozenset()) -> None:
        self._current_token = current_token
        self._open_methods = open_methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._open_methods:  # type: ignore[attr-defined]
            return handler
        expected = self._current_token()
        presented = _presented_token(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        if expected and presented is not None and hmac.compare_digest(presented, expected):
            return handler
        return _denied_like(handler)
