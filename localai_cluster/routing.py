"""WebSocket routes (Channels)."""

from __future__ import annotations

from django.urls import path

from nodes.consumers import BackendLogsConsumer

websocket_urlpatterns: list = [
    # `key` is `model#N` (sent as `model%23N`) or a bare model name, which may contain `/`.
    path("ws/nodes/<uuid:node_id>/backend-logs/<path:key>", BackendLogsConsumer.as_asgi()),
]
