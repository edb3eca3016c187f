"""Reads for the operator pages (`/ui/nodes/…`): the stat cards, the node rows and a node's drawer, each in a
fixed number of queries whatever the number of nodes, labels and replicas."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict, cast

from django.db.models import Count, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from nodes.choices import AUTO_LABELS, LABEL_REPLICA_SLOTS, NodeStatus, NodeType, ReplicaState
from nodes.models import ModelReplica, Node, NodeLabel

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

# Labels shown in a row's strip before `+N more`.
LABEL_STRIP_SIZE = 5


@dataclass(frozen=True)
class ClusterStats:
    """What the stat cards show."""

    total: int
    healthy: int
    unhealthy_or_offline: int
    draining: int
    pending: int
    vram_total: int
    vram_used: int
    vram_reserved: int
    replicas_loaded: int
    in_flight: int

    @property
    def vram_used_percent(self) -> int:
        return _percent(self.vram_used, self.vram_total)

    @property
    def vram_reserved_percent(self) -> int:
        return min(_percent(self.vram_reserved, self.vram_total), 100 - self.vram_used_percent)


def _percent(part: int, whole: int) -> int:
    if whole <= 0:
        return 0
    return max(0, min(100, round(100 * part / whole)))


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """`12s ago`, `5m ago`, `3h ago`, `2d ago`; `never` for None."""
    if moment is None:
        return "never"
    seconds = max(0, int(((now or timezone.now()) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def cluster_stats() -> ClusterStats:
    """Node counts by status, cluster VRAM (used = total − available, reserved) and replica figures: two
    queries."""
    nodes = Node.objects.aggregate(
        total=Count("pk"),
        healthy=Count("pk", filter=Q(status=NodeStatus.HEALTHY)),
        unhealthy_or_offline=Count("pk", filter=Q(status__in=[NodeStatus.UNHEALTHY, NodeStatus.OFFLINE])),
        draining=Count("pk", filter=Q(status=NodeStatus.DRAINING)),
        pending=Count("pk", filter=Q(status=NodeStatus.PENDING)),
        vram_total=Coalesce(Sum("total_vram"), Value(0)),
        vram_available=Coalesce(Sum("available_vram"), Value(0)),
        vram_reserved=Coalesce(Sum("reserved_vram"), Value(0)),
    )
    replicas = ModelReplica.objects.aggregate(
        loaded=Count("pk", filter=Q(state=ReplicaState.LOADED)),
        in_flight=Coalesce(Sum("in_flight"), Value(0)),
    )
    return ClusterStats(
        total=nodes["total"],
        healthy=nodes["healthy"],
        unhealthy_or_offline=nodes["unhealthy_or_offline"],
        draining=nodes["draining"],
        pending=nodes["pending"],
        vram_total=nodes["vram_total"],
        vram_used=max(0, nodes["vram_total"] - nodes["vram_available"]),
        vram_reserved=nodes["vram_reserved"],
        replicas_loaded=replicas["loaded"],
        in_flight=replicas["in_flight"],
    )


class LabelRowFields(TypedDict):
    """What `decorate_node` sets on each label it shows."""

    is_auto: bool


class NodeRowFields(TypedDict):
    """What `decorate_node` sets on a node for its row and drawer."""

    visible_labels: list[WithAnnotations[NodeLabel, LabelRowFields]]
    label_strip: list[WithAnnotations[NodeLabel, LabelRowFields]]
    more_labels: int
    vram_used: int
    vram_used_percent: int
    vram_reserved_percent: int
    heartbeat_ago: str
    is_agent: bool


class ReplicaCount(TypedDict):
    """The annotation `node_rows` adds."""

    replica_count: int


def decorate_node(node: Node, now: datetime | None = None) -> WithAnnotations[Node, NodeRowFields]:
    """Sets what a row shows on the node: `visible_labels` (without `node.replica-slots`), `label_strip` (the
    first five), `more_labels` (how many more), `is_auto` on each label, `vram_used`, `vram_used_percent`, `heartbeat_ago`, `is_agent`.
    Uses the prefetched labels when there are some."""
    labels = [
        cast("WithAnnotations[NodeLabel, LabelRowFields]", label)
        for label in node.labels.all()
        if label.key != LABEL_REPLICA_SLOTS
    ]
    for label in labels:
        label.is_auto = label.key in AUTO_LABELS  # the control plane's: shown, not removable
    row = cast("WithAnnotations[Node, NodeRowFields]", node)  # the same object, with the row's attributes
    row.visible_labels = labels
    row.label_strip = labels[:LABEL_STRIP_SIZE]
    row.more_labels = max(0, len(labels) - LABEL_STRIP_SIZE)
    row.vram_used = max(0, row.total_vram - row.available_vram)
    row.vram_used_percent = _percent(row.vram_used, row.total_vram)
    row.vram_reserved_percent = min(_percent(row.reserved_vram, row.total_vram), 100 - row.vram_used_percent)
    row.heartbeat_ago = ago(row.last_heartbeat, now)
    row.is_agent = row.node_type == NodeType.AGENT
    return row


def node_rows() -> QuerySet[WithAnnotations[Node, ReplicaCount]]:
    """Every node, by name, with its labels and `replica_count`: two queries."""
    return Node.objects.annotate(replica_count=Count("replicas")).prefetch_related("labels").order_by("name")


def node_rows_decorated() -> list[WithAnnotations[Node, NodeRowFields]]:
    now = timezone.now()
    return [decorate_node(node, now) for node in node_rows()]


def node_row(*, node_id: uuid.UUID | str) -> WithAnnotations[Node, NodeRowFields] | None:
    """One node as a row (two queries), or None."""
    node = node_rows().filter(pk=node_id).first()
    return decorate_node(node) if node is not None else None


@dataclass(frozen=True)
class DrawerReplica:
    """One row of the drawer's loaded-replicas table."""

    replica: ModelReplica
    show_index: bool  # the node hosts more than one replica of this model: show the `rep N` pill
    placed_by: Any = None  # the `placed` decision record of this replica (scheduling.PlacementDecision)

    @property
    def process_key(self) -> str:
        return self.replica.process_key


def drawer_replicas(*, node: Node) -> list[DrawerReplica]:
    """The node's replicas by model and index, each knowing whether its model has siblings here: one query."""
    replicas = list(ModelReplica.objects.filter(node=node).order_by("model_name", "replica_index"))
    per_model = Counter(replica.model_name for replica in replicas)
    return [DrawerReplica(replica, per_model[replica.model_name] > 1) for replica in replicas]


def most_replicas_of_one_model(replicas: list[DrawerReplica]) -> tuple[int, str]:
    """The largest number of replicas one model has on the node, and that model (for the shrink guard)."""
    per_model = Counter(item.replica.model_name for item in replicas)
    if not per_model:
        return 0, ""
    model_name, count = max(per_model.items(), key=lambda pair: (pair[1], pair[0]))
    return count, model_name


def model_replicas_on_node(*, node: Node, model_name: str) -> list[ModelReplica]:
    """The node's replicas of one model, by index (the logs page's scope switch)."""
    return list(ModelReplica.objects.filter(node=node, model_name=model_name).order_by("replica_index"))
