"""Worker self-service API (`/api/node/*`, CONTRACT §3.1): thin views over `nodes.services`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from localai_cluster.api import Conflict
from nodes import services
from nodes.api.auth import NodeTokenAuthentication, RegistrationTokenAuthentication, bearer_token
from nodes.api.serializers import (
    DownloadsSerializer,
    ErrorSerializer,
    HeartbeatResponseSerializer,
    HeartbeatSerializer,
    NodeStatusSerializer,
    RegisterResponseSerializer,
    RegisterSerializer,
    ReplicaSerializer,
)
from nodes.exceptions import InvalidTransition, InvalidValue, NameTaken
from nodes.models import Node
from nodes.selectors import node_replica_list
from nodes.tokens import backend_token_for
from worker_client.agent.keys import replica_digest

TAG = "worker"
NODE_ID = OpenApiParameter("node_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The node's id.")
ERR_400 = OpenApiResponse(ErrorSerializer, description="Invalid input; `details` names each field.")
ERR_401 = OpenApiResponse(ErrorSerializer, description="No credential, or a wrong or revoked token.")
ERR_403 = OpenApiResponse(ErrorSerializer, description="A token of another node.")
ERR_404 = OpenApiResponse(ErrorSerializer, description="Unknown node (deleted by an admin: register again).")
ERR_409 = OpenApiResponse(ErrorSerializer, description="The node's status does not allow this.")
ERR_409_NAME = OpenApiResponse(
    ErrorSerializer,
    description="A known name without its proof (the node's credential or current node token): nothing "
    "changed. An admin hands a name over by deleting the node.",
)


def _api_errors(error: Exception) -> exceptions.APIException:
    if isinstance(error, InvalidTransition | NameTaken):
        return Conflict(str(error))
    if isinstance(error, InvalidValue):
        return exceptions.ValidationError(error.details)
    if isinstance(error, Node.DoesNotExist):
        return exceptions.NotFound("Unknown node: register again.")
    raise error


class WorkerAPIView(APIView):
    """Base of the worker routes: the registry's errors become 400/404/409 in the API's error shape."""

    permission_classes: list = []

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, InvalidTransition | InvalidValue | NameTaken | Node.DoesNotExist):
            exc = _api_errors(exc)
        return super().handle_exception(exc)


class NodeAPIView(WorkerAPIView):
    """A route of one node, called with that node's token; `request.auth` is the node."""

    authentication_classes = [NodeTokenAuthentication]


class RegisterView(WorkerAPIView):
    """A new name answers 201 with a new node; a known name 200 with the same id when it presents the node's
    credential or current node token, else 409 and nothing changes. Every registration issues a new node
    token and backend token (the previous ones stop working), refreshes labels and resources, and removes
    the node's replica rows. The backend token is answered here only."""

    authentication_classes = [RegistrationTokenAuthentication]

    @extend_schema(
        tags=[TAG],
        operation_id="node_register",
        summary="Register a worker (by name)",
        request=RegisterSerializer,
        responses={
            201: OpenApiResponse(RegisterResponseSerializer, description="A new node."),
            200: OpenApiResponse(RegisterResponseSerializer, description="A known name: the same node."),
            400: ERR_400,
            401: ERR_401,
            409: ERR_409_NAME,
        },
    )
    def post(self, request: Request) -> Response:
        serializer = RegisterSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        result = services.node_register(**serializer.validated_data)
        node = result.node
        body = {
            "id": node.id,
            "name": node.name,
            "status": node.status,
            "node_token": result.node_token,
            "max_replicas_per_model": node.effective_max_replicas,
            "heartbeat_interval": float(settings.LOCALAI_HEARTBEAT_INTERVAL),
            "backend_token": backend_token_for(node),
        }
        return Response(
            RegisterResponseSerializer(body).data,
            status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK,
        )


class HeartbeatView(NodeAPIView):
    """Refreshes resources and `last_heartbeat`, reconciles replica rows with the processes listed, never
    approves. `orphans`: listed processes with no replica row (the agent stops them after two answers).

    A heartbeat that reports nothing new — its replica set's digest (`replica_digest`, or the digest of the
    `replicas` listed) matches the node's rows, all already heard from, and the status, total VRAM and vendor
    need no change — costs one UPDATE that also checks the token (`services.node_heartbeat_unchanged`).
    Anything else authenticates as every worker route does and reconciles in full; a digest sent without its
    list that does not match answers `send_replicas: true` and records nothing (the agent sends the list
    at once)."""

    def perform_authentication(self, request: Request) -> None:
        """Lazy: the unchanged heartbeat's UPDATE checks the token itself; `request.auth` authenticates."""

    @extend_schema(
        tags=[TAG],
        operation_id="node_heartbeat",
        summary="Report resources and running replicas",
        parameters=[NODE_ID],
        request=HeartbeatSerializer,
        responses={200: HeartbeatResponseSerializer, 400: ERR_400, 401: ERR_401, 403: ERR_403, 404: ERR_404},
    )
    def post(self, request: Request, node_id: str) -> Response:
        serializer = HeartbeatSerializer(data=request.data)
        listed = digest = None
        fields: dict = {}
        if serializer.is_valid():
            fields = dict(serializer.validated_data)
            listed = fields.pop("replicas", None)
            digest = fields.pop("replica_digest", None)
            if listed is not None:
                digest = replica_digest(replica["key"] for replica in listed)
            if digest is not None:
                unchanged = services.node_heartbeat_unchanged(
                    node_id=node_id, token=bearer_token(request), digest=digest, **fields
                )
                if unchanged is not None:
                    return self._answer(unchanged)
        node = request.auth  # authenticates: 401, 403 or 404 before any 400
        serializer.is_valid(raise_exception=True)
        if listed is None and digest is not None:
            # Only a digest, and it does not match: nothing to reconcile with; ask for the list.
            return self._answer(
                services.HeartbeatResult(
                    status=node.status, max_replicas_per_model=node.effective_max_replicas, send_replicas=True
                )
            )
        return self._answer(services.node_heartbeat(node=node, replicas=listed or (), **fields))

    @staticmethod
    def _answer(result: services.HeartbeatResult) -> Response:
        body = {
            "status": result.status,
            "max_replicas_per_model": result.max_replicas_per_model,
            "orphans": result.orphans,
            "send_replicas": result.send_replicas,
        }
        return Response(HeartbeatResponseSerializer(body).data)


class DrainView(NodeAPIView):
    """No new placements or requests for this node; requests in flight finish. 409 for a node never approved.
    The agent's own drain ends with its deregistration: unlike an admin's, it does not outlive a
    re-registration."""

    @extend_schema(
        tags=[TAG],
        operation_id="node_self_drain",
        summary="Drain this node (before shutdown)",
        parameters=[NODE_ID],
        request=None,
        responses={200: NodeStatusSerializer, 401: ERR_401, 403: ERR_403, 404: ERR_404, 409: ERR_409},
    )
    def post(self, request: Request, node_id: str) -> Response:
        node = services.node_drain(node=request.auth, by_admin=False)
        return Response(NodeStatusSerializer({"id": node.id, "status": node.status}).data)


class DeregisterView(NodeAPIView):
    """Graceful shutdown: the node goes offline and loses its replica rows; id, approval, labels and
    override are kept for its next registration."""

    @extend_schema(
        tags=[TAG],
        operation_id="node_self_deregister",
        summary="Go offline (graceful shutdown); the node, its approval and labels are kept",
        parameters=[NODE_ID],
        request=None,
        responses={200: NodeStatusSerializer, 401: ERR_401, 403: ERR_403, 404: ERR_404},
    )
    def post(self, request: Request, node_id: str) -> Response:
        node = services.node_deregister(node=request.auth)
        return Response(NodeStatusSerializer({"id": node.id, "status": node.status}).data)


class ModelsView(NodeAPIView):
    """This node's replicas with their in-flight counts (a draining agent waits for them to reach 0)."""

    @extend_schema(
        tags=[TAG],
        operation_id="node_self_models",
        summary="This node's replicas, with their in-flight counts",
        parameters=[NODE_ID],
        responses={200: ReplicaSerializer(many=True), 401: ERR_401, 403: ERR_403, 404: ERR_404},
    )
    def get(self, request: Request, node_id: str) -> Response:
        return Response(ReplicaSerializer(node_replica_list(node=request.auth), many=True).data)


class DownloadsView(NodeAPIView):
    """Staging progress of this node's `downloading` replicas (the agent posts it at least every 2 s while
    files download); `state: loading` says the replica's files are in place and its backend is starting."""

    @extend_schema(
        tags=[TAG],
        operation_id="node_self_downloads",
        summary="Report the staging progress of this node's replicas",
        parameters=[NODE_ID],
        request=DownloadsSerializer,
        responses={200: OpenApiTypes.OBJECT, 400: ERR_400, 401: ERR_401, 403: ERR_403, 404: ERR_404},
    )
    def post(self, request: Request, node_id: str) -> Response:
        serializer = DownloadsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        changed = services.replica_download_progress(
            node=request.auth, reports=serializer.validated_data["replicas"]
        )
        return Response({"updated": changed})


ARTIFACT_CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


async def _file_chunks(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    """`length` bytes of `path` from `start`, read in a thread a chunk at a time."""
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(handle.seek, start)
        left = length
        while left > 0:
            chunk = await asyncio.to_thread(handle.read, min(ARTIFACT_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)


class ArtifactView(NodeAPIView):
    """`cp://NAME` files: the file NAME under `LOCALAI_ARTIFACTS_PATH`, for agents only (their node token),
    with HTTP Range (`bytes=START-` or `bytes=START-END`: 206, or 416 past the end) so a download resumes."""

    @extend_schema(
        tags=[TAG],
        operation_id="node_artifact",
        summary="Download a cp:// model file (Range supported)",
        parameters=[NODE_ID],
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            (206, "application/octet-stream"): OpenApiTypes.BINARY,
            401: ERR_401,
            403: ERR_403,
            404: ERR_404,
        },
    )
    def get(self, request: Request, node_id: str, name: str) -> HttpResponse | StreamingHttpResponse:
        from scheduling.artifacts import artifact_path

        path = artifact_path(name)
        if path is None:
            raise exceptions.NotFound(f"No file {name!r} under LOCALAI_ARTIFACTS_PATH.")
        size = path.stat().st_size
        start, end = 0, size - 1
        status_code = status.HTTP_200_OK
        wanted = request.headers.get("Range", "")
        if wanted:
            match = _RANGE.match(wanted.strip())
            if match is None or int(match.group(1)) >= size:
                answer = HttpResponse(status=status.HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE)
                answer["Content-Range"] = f"bytes */{size}"
                return answer
            start = int(match.group(1))
            if match.group(2):
                end = min(int(match.group(2)), size - 1)
            status_code = status.HTTP_206_PARTIAL_CONTENT
        length = max(end - start + 1, 0)
        response = StreamingHttpResponse(
            _file_chunks(path, start, length), status=status_code, content_type="application/octet-stream"
        )
        response["Content-Length"] = str(length)
        response["Accept-Ranges"] = "bytes"
        if status_code == status.HTTP_206_PARTIAL_CONTENT:
            response["Content-Range"] = f"bytes {start}-{end}/{size}"
        return response
