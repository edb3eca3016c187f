"""Admin API: `/api/nodes/*` (CONTRACT §3.2). Thin views: parse, call a registry service or selector, render.

Auto-labels (`node.replica-slots`, `node.name`, `gpu.vendor`, `gpu.vram`) belong to the control plane: the
replica-slots label to the capacity override API (`PUT/DELETE /max-replicas-per-model`), the others to
registration. The labels API refuses to set, change or remove them (400). Sending one with its current value in
a `PUT`/`PATCH` body is accepted and ignored, so a client can `GET` the labels, edit them and `PUT` them back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypedDict

from django.conf import settings
from django.db.models import Count, QuerySet, Sum, Value
from django.db.models.functions import Coalesce
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.response import Response

from localai_cluster.api import PAGE_PARAMETERS, Conflict, paginated_response, paginated_schema
from localai_cluster.db_router import replica_reads
from nodes import services
from nodes.api.admin_serializers import (
    AUTH_ERRORS,
    LABELS_SCHEMA,
    LogLineSerializer,
    LogsQuerySerializer,
    NodeSerializer,
    OverrideRequestSerializer,
    StringMapField,
    UnloadRequestSerializer,
    UnloadResponseSerializer,
    error_responses,
    text_problem,
)
from nodes.api.permissions import AdminAPIView
from nodes.api.serializers import ReplicaSerializer
from nodes.choices import AUTO_LABELS, LABEL_REPLICA_SLOTS
from nodes.exceptions import InvalidTransition, InvalidValue
from nodes.models import Node
from nodes.selectors import node_get, node_labels, node_replica_list
from nodes.tokens import node_token_for

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

logger = logging.getLogger(__name__)


NODE_ID = OpenApiParameter("node_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The node's id.")
LABEL_KEY = OpenApiParameter("key", OpenApiTypes.STR, OpenApiParameter.PATH, description="Label key.")
LOG_KEY = OpenApiParameter(
    "key",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="URL-encoded process key `model#index` (one replica), or a bare model name (all its replicas "
    "on the node, merged by time). A model name may contain `/`.",
)
TAGS = ["nodes"]


class AgentUnavailable(exceptions.APIException):
    status_code = status.HTTP_502_BAD_GATEWAY
    default_detail = "The node's agent could not be reached."
    default_code = "agent_unavailable"


class NodeCounts(TypedDict):
    """The annotations `node_queryset` adds."""

    model_count: int
    in_flight_count: int


def node_queryset() -> QuerySet[WithAnnotations[Node, NodeCounts]]:
    """Nodes with `model_count` (replica rows, any state), `in_flight_count` and their labels: two queries for
    any number of nodes."""
    return (
        Node.objects.annotate(
            model_count=Count("replicas"),
            in_flight_count=Coalesce(Sum("replicas__in_flight"), Value(0)),
        )
        .prefetch_related("labels")
        .order_by("name")
    )


def _node(node_id: str) -> Node:
    node = node_get(node_id=node_id)
    if node is None:
        raise exceptions.NotFound("No node with this id.")
    return node


def _node_data(node: Node) -> dict:
    return NodeSerializer(node_queryset().get(pk=node.pk)).data


def _agent(node: Node):
    """The agent's WorkerControl client (imported lazily: the gRPC stubs are heavy)."""
    from nodes.agent_clients import worker_control_client

    if not node.address:
        raise AgentUnavailable("The node has no agent address.")
    return worker_control_client(
        node.address, node_token_for(node), timeout=settings.LOCALAI_AGENT_CALL_TIMEOUT
    )


# --- nodes ----------------------------------------------------------------------------------------------


class NodeListView(AdminAPIView):
    @extend_schema(
        operation_id="nodes_list",
        parameters=PAGE_PARAMETERS,
        responses={
            200: paginated_schema("PaginatedNodeList", NodeSerializer(many=True)),
            **error_responses(404, *AUTH_ERRORS),
        },
        tags=TAGS,
    )
    def get(self, request: Request) -> Response:
        with replica_reads():
            return paginated_response(request, self, node_queryset(), NodeSerializer)


class NodeDetailView(AdminAPIView):
    @extend_schema(
        operation_id="nodes_retrieve",
        parameters=[NODE_ID],
        responses={200: NodeSerializer, **error_responses(*AUTH_ERRORS, 404)},
        tags=TAGS,
    )
    def get(self, request: Request, node_id: str) -> Response:
        return Response(_node_data(_node(node_id)))

    @extend_schema(
        operation_id="nodes_destroy",
        parameters=[NODE_ID],
        responses={204: OpenApiResponse(description="Deregistered."), **error_responses(*AUTH_ERRORS, 404)},
        description="Removes the node, its labels and its replicas; the agent is asked to stop them.",
        tags=TAGS,
    )
    def delete(self, request: Request, node_id: str) -> Response:
        services.node_delete(node=_node(node_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


def _node_action(request: Request, node_id: str, action: Callable[..., Node]) -> Response:
    node = _node(node_id)
    try:
        action(node=node)
    except InvalidTransition as exc:
        raise Conflict(str(exc)) from None
    return Response(_node_data(node))


def _action_schema(action_name: str, description: str) -> Callable:
    return extend_schema(
        operation_id=f"nodes_{action_name}",
        request=None,
        parameters=[NODE_ID],
        responses={200: NodeSerializer, **error_responses(*AUTH_ERRORS, 404, 409)},
        description=description,
        tags=TAGS,
    )


class NodeApproveView(AdminAPIView):
    @_action_schema("approve", "Approve a pending node (409 unless pending).")
    def post(self, request: Request, node_id: str) -> Response:
        return _node_action(request, node_id, services.node_approve)


class NodeDrainView(AdminAPIView):
    @_action_schema(
        "drain", "Stop placing new replicas and routing new requests to the node; in-flight work finishes."
    )
    def post(self, request: Request, node_id: str) -> Response:
        return _node_action(request, node_id, services.node_drain)


class NodeResumeView(AdminAPIView):
    @_action_schema("resume", "Make a draining node schedulable again (409 unless draining).")
    def post(self, request: Request, node_id: str) -> Response:
        return _node_action(request, node_id, services.node_resume)


# --- replicas -------------------------------------------------------------------------------------------


class NodeModelsView(AdminAPIView):
    @extend_schema(
        operation_id="nodes_models_list",
        parameters=[NODE_ID],
        responses={200: ReplicaSerializer(many=True), **error_responses(*AUTH_ERRORS, 404)},
        tags=TAGS,
    )
    def get(self, request: Request, node_id: str) -> Response:
        with replica_reads():
            return Response(ReplicaSerializer(node_replica_list(node=_node(node_id)), many=True).data)


class NodeUnloadView(AdminAPIView):
    @extend_schema(
        operation_id="nodes_models_unload",
        parameters=[NODE_ID],
        request=UnloadRequestSerializer,
        responses={200: UnloadResponseSerializer, **error_responses(400, *AUTH_ERRORS, 404)},
        description="With `replica_index`, exactly that replica; without, every replica of the model on the "
        "node. The rows go at once; the agent is then asked to stop exactly those process keys.",
        tags=TAGS,
    )
    def post(self, request: Request, node_id: str) -> Response:
        node = _node(node_id)
        serializer = UnloadRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        rows = node.replicas.filter(model_name=serializer.validated_data["model_name"])
        if serializer.validated_data.get("replica_index") is not None:
            rows = rows.filter(replica_index=serializer.validated_data["replica_index"])
        removed = services.replica_unload(node=node, replicas=rows)
        if not removed:
            raise exceptions.NotFound("No such replica on this node.")
        return Response({"unloaded": removed})


# --- labels ---------------------------------------------------------------------------------------------


def _owned_label_errors(node: Node, labels: dict[str, str]) -> dict[str, list[str]]:
    current = node_labels(node=node)
    errors = {}
    for key in sorted(AUTO_LABELS & labels.keys()):
        if labels[key] == current.get(key):
            continue
        owner = (
            "the capacity override (PUT /api/nodes/{id}/max-replicas-per-model)"
            if key == LABEL_REPLICA_SLOTS
            else "registration"
        )
        errors[key] = [f"{key} is an auto-label set by {owner}; the labels API cannot change it."]
    return errors


def _label_body(request: Request, node: Node) -> dict[str, str]:
    labels = StringMapField().run_validation(request.data)
    if errors := _owned_label_errors(node, labels):
        raise exceptions.ValidationError(errors)
    return {key: value for key, value in labels.items() if key not in AUTO_LABELS}


def _invalid_value(exc: InvalidValue) -> exceptions.ValidationError:
    return exceptions.ValidationError(exc.details)


class NodeLabelsView(AdminAPIView):
    @extend_schema(
        operation_id="nodes_labels_retrieve",
        parameters=[NODE_ID],
        responses={200: LABELS_SCHEMA, **error_responses(*AUTH_ERRORS, 404)},
        tags=TAGS,
    )
    def get(self, request: Request, node_id: str) -> Response:
        return Response(node_labels(node=_node(node_id)))

    @extend_schema(
        operation_id="nodes_labels_replace",
        parameters=[NODE_ID],
        request={"application/json": LABELS_SCHEMA},
        responses={200: LABELS_SCHEMA, **error_responses(400, *AUTH_ERRORS, 404)},
        description="Replaces every admin/worker label with the body; auto-labels are kept.",
        tags=TAGS,
    )
    def put(self, request: Request, node_id: str) -> Response:
        node = _node(node_id)
        try:
            labels = services.node_labels_replace(node=node, labels=_label_body(request, node))
        except InvalidValue as exc:
            raise _invalid_value(exc) from None
        return Response(labels)

    @extend_schema(
        operation_id="nodes_labels_merge",
        parameters=[NODE_ID],
        request={"application/json": LABELS_SCHEMA},
        responses={200: LABELS_SCHEMA, **error_responses(400, *AUTH_ERRORS, 404)},
        description="Adds or updates the labels of the body; others are kept.",
        tags=TAGS,
    )
    def patch(self, request: Request, node_id: str) -> Response:
        node = _node(node_id)
        try:
            labels = services.node_labels_merge(node=node, labels=_label_body(request, node))
        except InvalidValue as exc:
            raise _invalid_value(exc) from None
        return Response(labels)


class NodeLabelDetailView(AdminAPIView):
    @extend_schema(
        operation_id="nodes_labels_destroy",
        parameters=[NODE_ID, LABEL_KEY],
        responses={200: LABELS_SCHEMA, **error_responses(400, *AUTH_ERRORS, 404)},
        description="Removes one label; answers the remaining labels. Auto-labels cannot be removed (400).",
        tags=TAGS,
    )
    def delete(self, request: Request, node_id: str, key: str) -> Response:
        node = _node(node_id)
        if key in AUTO_LABELS:
            raise exceptions.ValidationError(
                {key: [f"{key} is an auto-label managed by the control plane; it cannot be removed."]}
            )
        if text_problem(key) or key not in node_labels(node=node):
            raise exceptions.NotFound("The node has no label with this key.")
        services.node_label_remove(node=node, key=key)
        return Response(node_labels(node=node))


# --- capacity override ----------------------------------------------------------------------------------


class NodeOverrideView(AdminAPIView):
    @extend_schema(
        operation_id="nodes_max_replicas_set",
        parameters=[NODE_ID],
        request=OverrideRequestSerializer,
        responses={200: NodeSerializer, **error_responses(400, *AUTH_ERRORS, 404)},
        description="Sticky admin override of the node's replicas-per-model cap (survives re-registration).",
        tags=TAGS,
    )
    def put(self, request: Request, node_id: str) -> Response:
        node = _node(node_id)
        serializer = OverrideRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            services.node_override_set(node=node, value=serializer.validated_data["value"])
        except InvalidValue as exc:
            raise _invalid_value(exc) from None
        return Response(_node_data(node))

    @extend_schema(
        operation_id="nodes_max_replicas_reset",
        parameters=[NODE_ID],
        responses={200: NodeSerializer, **error_responses(*AUTH_ERRORS, 404)},
        description="Drops the override: the worker's own value applies again at once.",
        tags=TAGS,
    )
    def delete(self, request: Request, node_id: str) -> Response:
        node = _node(node_id)
        services.node_override_reset(node=node)
        return Response(_node_data(node))


# --- backend logs ---------------------------------------------------------------------------------------


def _agent_call(node: Node, method: str, *args):
    from worker_client.errors import WorkerError

    try:
        return getattr(_agent(node), method)(*args)
    except WorkerError as exc:
        logger.warning("backend logs of node %r: %s", node.name, exc)
        raise AgentUnavailable(
            f"The node's agent could not be reached: {exc.code.name if exc.code else exc}."
        ) from None


class NodeBackendLogKeysView(AdminAPIView):
    @extend_schema(
        operation_id="nodes_backend_logs_keys",
        parameters=[NODE_ID],
        responses={
            200: {"type": "array", "items": {"type": "string"}},
            **error_responses(*AUTH_ERRORS, 404, 502),
        },
        description="Process keys with buffered logs on the node's agent (stopped processes included).",
        tags=TAGS,
    )
    def get(self, request: Request, node_id: str) -> Response:
        return Response(sorted(_agent_call(_node(node_id), "log_keys")))


class NodeBackendLogsView(AdminAPIView):
    @extend_schema(
        operation_id="nodes_backend_logs_retrieve",
        parameters=[NODE_ID, LOG_KEY, LogsQuerySerializer],
        responses={200: LogLineSerializer(many=True), **error_responses(400, *AUTH_ERRORS, 404, 502)},
        tags=TAGS,
    )
    def get(self, request: Request, node_id: str, key: str) -> Response:
        node = _node(node_id)
        query = LogsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        if text_problem(key):
            raise exceptions.NotFound("No logs for this key.")
        lines = _agent_call(node, "get_logs", key, query.validated_data["tail"])
        return Response(
            [
                {
                    "timestamp": datetime.fromtimestamp(line.timestamp, tz=UTC).isoformat(),
                    "stream": line.stream,
                    "text": line.text,
                    "process_key": line.process_key,
                }
                for line in lines
            ]
        )
