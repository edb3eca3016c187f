"""Writes of the scheduling app. Services are keyword-only, typed, and own their transaction."""

from __future__ import annotations

from django.db import transaction

from scheduling.models import SchedulingRule

# --- scheduling rules (admin API: /api/nodes/scheduling) ---------------------------------------------------


def rule_upsert(
    *, model_name: str, node_selector: dict[str, str], min_replicas: int, max_replicas: int
) -> SchedulingRule:
    """Creates the rule of `model_name` or updates it in place (same id). The rule's circuit breaker is reset:
    a new selector or minimum deserves a fresh look on the next reconciler tick. The database's check
    constraints back the invariants (min, max ≥ 0; min ≤ max when max > 0); callers validate first."""
    with transaction.atomic():
        rule, _ = SchedulingRule.objects.update_or_create(
            model_name=model_name,
            defaults={
                "node_selector": dict(node_selector),
                "min_replicas": min_replicas,
                "max_replicas": max_replicas,
                "unsatisfiable_ticks": 0,
                "unsatisfiable_until": None,
                "unsatisfiable_reason": "",
            },
        )
    return rule


def rule_delete(*, model_name: str) -> bool:
    """Deletes the rule of `model_name`; True when there was one. Its replicas stay: without a rule nothing
    keeps or trims them, and the router still serves them."""
    with transaction.atomic():
        deleted, _ = SchedulingRule.objects.filter(model_name=model_name).delete()
    return deleted > 0


# --- end of scheduling rules ------------------------------------------------------------------------------
