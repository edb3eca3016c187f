"""Reads of the scheduling app shared by the API and the pages."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict

from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from nodes.choices import ReplicaState
from nodes.models import ModelReplica
from scheduling.choices import Outcome
from scheduling.models import PlacementDecision, SchedulingRule

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations


class CurrentReplicas(TypedDict):
    """The annotation `rules_with_current_replicas` adds."""

    current_replicas: int


def rules_with_current_replicas() -> QuerySet[WithAnnotations[SchedulingRule, CurrentReplicas]]:
    """Rules by model name with `current_replicas` (loading + loaded rows of the model): one query."""
    current = (
        ModelReplica.objects.filter(
            model_name=OuterRef("model_name"),
            state__in=[ReplicaState.DOWNLOADING, ReplicaState.LOADING, ReplicaState.LOADED],
        )
        .order_by()
        .values("model_name")
        .annotate(n=Count("id"))
        .values("n")
    )
    return SchedulingRule.objects.annotate(
        current_replicas=Coalesce(Subquery(current, output_field=IntegerField()), Value(0))
    ).order_by("model_name")


def decisions_filtered(
    *, model: str = "", node: str = "", outcome: str = "", since: datetime | None = None
) -> QuerySet[PlacementDecision]:
    """Placement decision records newest first, filtered: `model` exactly, `node` (the node placed on, or any
    node a record's candidates name), `outcome`, `since` (at or after)."""
    queryset = PlacementDecision.objects.order_by("-created_at", "-id")
    if model:
        queryset = queryset.filter(model_name=model)
    if node:
        queryset = queryset.filter(Q(node_name=node) | Q(candidates__contains=[{"node": node}]))
    if outcome:
        queryset = queryset.filter(outcome=outcome)
    if since is not None:
        queryset = queryset.filter(created_at__gte=since)
    return queryset


def decisions_for_replicas(*, node_name: str, replicas: list[tuple[str, int]]) -> dict[tuple[str, int], Any]:
    """The latest `placed` record of each (model, index) on the node: one query."""
    if not replicas:
        return {}
    wanted = set(replicas)
    found: dict[tuple[str, int], Any] = {}
    rows = PlacementDecision.objects.filter(
        node_name=node_name,
        outcome=Outcome.PLACED,
        model_name__in={model for model, _ in replicas},
    ).order_by("-created_at", "-id")
    for record in rows[:500]:
        key = (record.model_name, record.replica_index)
        if key in wanted and key not in found:
            found[key] = record
    return found
