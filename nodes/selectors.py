"""Reads of the registry: schedulable nodes, free slots, cluster capacity."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from django.db.models import Count, Exists, F, IntegerField, OuterRef, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, Greatest

from nodes.choices import NodeStatus, NodeType
from nodes.models import ModelReplica, Node, NodeLabel


def node_get(*, node_id: uuid.UUID | str) -> Node | None:
    """The node with that id, or None (also for a string that is not a UUID)."""
    try:
        node_uuid = node_id if isinstance(node_id, uuid.UUID) else uuid.UUID(str(node_id))
    except (TypeError, ValueError, AttributeError):
        return None
    return Node.objects.filter(pk=node_uuid).first()


def node_filter_selector(queryset: QuerySet[Node], selector: Mapping[str, str] | None) -> QuerySet[Node]:
    """Nodes carrying every `key: value` of the selector as a label (exact strings; a missing key never
    matches; a non-string value matches nothing)."""
    for key, value in (selector or {}).items():
        if not isinstance(value, str) or not isinstance(key, str):
            return queryset.none()
        queryset = queryset.filter(
            Exists(NodeLabel.objects.filter(node=OuterRef("pk"), key=key, value=value))
        )
    return queryset


def node_list_schedulable(*, selector: Mapping[str, str] | None = None) -> QuerySet[Node]:
    """Nodes new replicas may go to: approved, `healthy`, of type `backend`, matching the selector
    (an empty or missing selector matches every such node)."""
    queryset = Node.objects.filter(
        approved_at__isnull=False, status=NodeStatus.HEALTHY, node_type=NodeType.BACKEND
    )
    return node_filter_selector(queryset, selector)


def node_annotate_free_slots(queryset: QuerySet[Node], *, model_name: str) -> QuerySet[Node]:
    """Annotates `effective_cap`, `used_slots` (rows of the model on the node, any state) and `free_slots`
    (cap − used, clamped at 0) in the same query."""
    used = (
        ModelReplica.objects.filter(node=OuterRef("pk"), model_name=model_name)
        .order_by()
        .values("node")
        .annotate(count=Count("pk"))
        .values("count")
    )
    return queryset.annotate(
        effective_cap=Coalesce("max_replicas_override", "worker_max_replicas_per_model"),
        used_slots=Coalesce(Subquery(used, output_field=IntegerField()), Value(0)),
    ).annotate(free_slots=Greatest(F("effective_cap") - F("used_slots"), Value(0)))


def node_free_slots(*, node: Node, model_name: str) -> int:
    """Effective cap − rows of the model on the node in any state (a load in progress counts), never < 0."""
    used = ModelReplica.objects.filter(node=node, model_name=model_name).count()
    return max(node.effective_max_replicas - used, 0)


def cluster_capacity(
    *,
    model_name: str,
    selector: Mapping[str, str] | None = None,
    node_ids: Iterable[uuid.UUID | str] | None = None,
) -> int:
    """Sum of free slots for the model over schedulable nodes matching the selector (optionally only
    `node_ids`). One query."""
    queryset = node_list_schedulable(selector=selector)
    if node_ids is not None:
        queryset = queryset.filter(pk__in=list(node_ids))
    queryset = node_annotate_free_slots(queryset, model_name=model_name)
    return queryset.aggregate(total=Coalesce(Sum("free_slots"), Value(0)))["total"]


def free_replica_indexes(*, cap: int, taken: Iterable[int]) -> list[int]:
    """Indexes in `[0, cap)` not in `taken`, lowest first (pure)."""
    used = set(taken)
    return [index for index in range(cap) if index not in used]


def lowest_free_replica_index(*, node: Node, model_name: str) -> int | None:
    """The lowest index in `[0, effective cap)` with no row of the model on the node; None when full."""
    taken = ModelReplica.objects.filter(node=node, model_name=model_name).values_list(
        "replica_index", flat=True
    )
    free = free_replica_indexes(cap=node.effective_max_replicas, taken=taken)
    return free[0] if free else None


def node_labels(*, node: Node) -> dict[str, str]:
    """The node's labels as a dict (auto-labels included)."""
    return dict(NodeLabel.objects.filter(node=node).values_list("key", "value"))


def node_replica_list(*, node: Node) -> QuerySet[ModelReplica]:
    """The node's replica rows, by model and index."""
    return ModelReplica.objects.filter(node=node).order_by("model_name", "replica_index")
