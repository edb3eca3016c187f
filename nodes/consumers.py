"""`WS /ws/nodes/{id}/backend-logs/{key}` (CONTRACT §3.5): relays a node's backend logs to a staff browser.

The first message is `{"type": "initial", "lines": [...]}` with the lines the agent holds, then one
`{"type": "line", "line": {...}}` per new line. The agent's `StreamLogs` sends its buffered lines and then live
ones without marking where the first part ends, so the initial batch comes from `GetLogs` and the stream's lines
with a `seq` at or below the batch's last are dropped: `seq` grows with every line an agent stores, so nothing
is lost or sent twice at the seam. Leaving the page cancels the gRPC stream.

Close codes: 4403 not staff, 4404 unknown node or key, 4502 the agent cannot be reached (the page reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import asdict
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from nodes.agent_clients import async_worker_control_client
from nodes.models import Node
from nodes.tokens import node_token_for
from worker_client.client import LogLine
from worker_client.errors import WorkerError

logger = logging.getLogger(__name__)

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_AGENT_UNAVAILABLE = 4502


def line_payload(line: LogLine) -> dict[str, Any]:
    return asdict(line)


@database_sync_to_async
def _node_target(node_id: Any) -> tuple[str, str, str] | None:
    """(name, address, token) of the node, or None."""
    try:
        node = Node.objects.filter(pk=uuid.UUID(str(node_id))).first()
    except ValueError:
        return None
    if node is None:
        return None
    return node.name, node.address, node_token_for(node)


class BackendLogsConsumer(AsyncJsonWebsocketConsumer):
    """One browser watching one process key (`model#N`) or a bare model's replicas merged."""

    relay: asyncio.Task | None = None

    async def connect(self) -> None:
        await self.accept()
        user = self.scope.get("user")
        if user is None or not (user.is_authenticated and user.is_active and user.is_staff):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        kwargs = self.scope["url_route"]["kwargs"]
        key = str(kwargs.get("key", ""))
        target = await _node_target(kwargs.get("node_id"))
        if target is None or not key:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        name, address, token = target
        self.relay = asyncio.create_task(self._relay(name, address, token, key))

    async def disconnect(self, code: int) -> None:
        if self.relay is not None and not self.relay.done():
            self.relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.relay

    async def _relay(self, name: str, address: str, token: str, key: str) -> None:
        client = async_worker_control_client(address, token, timeout=settings.LOCALAI_AGENT_CALL_TIMEOUT)
        try:
            initial = await client.get_logs(key)
            last_seq = max((line.seq for line in initial), default=0)
            await self.send_json({"type": "initial", "lines": [line_payload(line) for line in initial]})
            stream = client.stream_logs(key)
            try:
                async for line in stream:
                    if line.seq <= last_seq:
                        continue  # already in the initial batch
                    last_seq = line.seq
                    await self.send_json({"type": "line", "line": line_payload(line)})
            finally:
                await stream.aclose()
            # The agent ended the stream (it is shutting down): let the page reconnect.
            await self.close(code=CLOSE_AGENT_UNAVAILABLE)
        except asyncio.CancelledError:
            raise
        except WorkerError as error:
            logger.info("backend logs of %r on %r: %s", key, name, error)
            with contextlib.suppress(Exception):
                await self.send_json({"type": "error", "message": f"The agent of {name} cannot be reached."})
                await self.close(code=CLOSE_AGENT_UNAVAILABLE)
        except Exception:
            logger.exception("backend logs of %r on %r failed", key, name)
            with contextlib.suppress(Exception):
                await self.close(code=CLOSE_AGENT_UNAVAILABLE)
