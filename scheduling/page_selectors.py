"""Reads for the scheduling page (`/ui/scheduling/`): rules with their current replica count and status, and
the model catalog for the form's picker."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from nodes.choices import ReplicaState
from nodes.models import ModelReplica
from scheduling.models import ModelConfig, SchedulingRule

MODE_AUTOSCALE = "Auto-scaling"
MODE_PLACEMENT = "Placement"
MODE_INACTIVE = "Inactive"


def rule_mode(rule: SchedulingRule) -> str:
    """Auto-scaling when it has a min or a max; Placement when it only pins (a selector); else Inactive."""
    if rule.min_replicas > 0 or rule.max_replicas > 0:
        return MODE_AUTOSCALE
    if rule.node_selector:
        return MODE_PLACEMENT
    return MODE_INACTIVE


def rules_with_current_replicas() -> QuerySet[SchedulingRule]:
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


def rule_rows(now: datetime | None = None) -> list[SchedulingRule]:
    """Rules with `mode`, `selector_items` and `breaker_open` (the cooldown is running) set: one query."""
    now = now or timezone.now()
    rules = list(rules_with_current_replicas())
    for rule in rules:
        rule.mode = rule_mode(rule)
        selector = rule.node_selector if isinstance(rule.node_selector, dict) else {}
        rule.selector_items = sorted(selector.items())
        rule.breaker_open = rule.unsatisfiable_until is not None and rule.unsatisfiable_until > now
    return rules


def catalog_model_names() -> list[str]:
    """Names of the catalog's models, for the form's model picker: one query."""
    return list(ModelConfig.objects.order_by("name").values_list("name", flat=True))
