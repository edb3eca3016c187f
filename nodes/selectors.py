"""Reads of the registry. Which nodes can take a replica is `scheduling.pipeline`'s question."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet

from nodes.choices import AUTO_LABELS
from nodes.models import ModelReplica, Node, NodeLabel


def node_get(*, node_id: uuid.UUID | str) -> Node | None:
    """The node with that id, or None (also for a string that is not a UUID)."""
    try:
        node_uuid = node_id if isinstance(node_id, uuid.UUID) else uuid.UUID(str(node_id))
    except (TypeError, ValueError, AttributeError):
        return None
    return Node.objects.filter(pk=node_uuid).first()


def node_labels(*, node: Node) -> dict[str, str]:
    """The node's labels as a dict (auto-labels included)."""
    return dict(NodeLabel.objects.filter(node=node).values_list("key", "value"))


def node_admin_labels(*, node: Node) -> dict[str, str]:
    """The node's labels other than auto-labels (what a label edit changes; the audit trail records it), by
    key: one query."""
    return dict(
        NodeLabel.objects.filter(node=node)
        .exclude(key__in=AUTO_LABELS)
        .order_by("key")
        .values_list("key", "value")
    )


def node_replica_list(*, node: Node) -> QuerySet[ModelReplica]:
    """The node's replica rows, by model and index."""
    return ModelReplica.objects.filter(node=node).order_by("model_name", "replica_index")
