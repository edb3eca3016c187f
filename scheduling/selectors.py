"""Reads of the scheduling app shared by the API and the pages."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from nodes.choices import ReplicaState
from nodes.models import ModelReplica
from scheduling.models import SchedulingRule

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations


class CurrentReplicas(TypedDict):
    """The annotation `rules_with_current_replicas` adds."""

    current_replicas: int


def rules_with_current_replicas() -> QuerySet[WithAnnotations[SchedulingRule, CurrentReplicas]]:
    """Rules by model name with `current_replicas` (loading + loaded rows of the model): one query."""
    current = (
        ModelReplica.objects.filter(
            model_name=OuterRef("model_name"), state__in=[ReplicaState.LOADING, ReplicaState.LOADED]
        )
        .order_by()
        .values("model_name")
        .annotate(n=Count("id"))
        .values("n")
    )
    return SchedulingRule.objects.annotate(
        current_replicas=Coalesce(Subquery(current, output_field=IntegerField()), Value(0))
    ).order_by("model_name")
