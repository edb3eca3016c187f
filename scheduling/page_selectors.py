"""Reads for the scheduling page (`/ui/scheduling/`): rules with their current replica count and status, and
the model catalog for the form's picker."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, TypedDict, cast

from django.utils import timezone

from scheduling.choices import Outcome, Verdict
from scheduling.models import LoadFailure, ModelConfig, PlacementDecision, SchedulingRule
from scheduling.selectors import rules_with_current_replicas

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

MODE_AUTOSCALE = "Auto-scaling"
MODE_PLACEMENT = "Placement"
MODE_INACTIVE = "Inactive"


def autoscales(rule: SchedulingRule) -> bool:
    return (
        rule.min_replicas > 0
        or rule.max_replicas > 0
        or rule.target_in_flight > 0
        or rule.scale_to_zero_after > 0
    )


def rule_mode(rule: SchedulingRule) -> str:
    """Auto-scaling when it has a min, a max, a target in-flight or scales to zero; Placement when it only
    pins (a selector); else Inactive."""
    if autoscales(rule):
        return MODE_AUTOSCALE
    if rule.node_selector:
        return MODE_PLACEMENT
    return MODE_INACTIVE


class RuleRowFields(TypedDict):
    """What `rule_rows` sets on each rule."""

    current_replicas: int
    mode: str
    selector_items: list[tuple[str, str]]
    breaker_open: bool
    load_failure: LoadFailure | None
    short: bool
    why_short: str


def rule_rows(
    now: datetime | None = None, *, load_failures: list[LoadFailure] | None = None
) -> list[WithAnnotations[SchedulingRule, RuleRowFields]]:
    """Rules with `mode`, `selector_items`, `breaker_open` (the cooldown is running) and `load_failure` (the
    model's loads are failing) set: two queries (one when the caller has read `load_failure_rows()`)."""
    now = now or timezone.now()
    # The same objects, with the row's attributes set below.
    rules = [
        cast("WithAnnotations[SchedulingRule, RuleRowFields]", rule) for rule in rules_with_current_replicas()
    ]
    for rule in rules:
        rule.mode = rule_mode(rule)
        selector = rule.node_selector if isinstance(rule.node_selector, dict) else {}
        rule.selector_items = sorted(selector.items())
        rule.breaker_open = rule.unsatisfiable_until is not None and rule.unsatisfiable_until > now
    if load_failures is None:
        load_failures = load_failure_rows()
    failures = {failure.model_name: failure for failure in load_failures}
    for rule in rules:
        rule.load_failure = failures.get(rule.model_name)
        rule.short = (
            rule.breaker_open or rule.unsatisfiable_ticks > 0 or rule.current_replicas < rule.min_replicas
        )
    reasons = last_refusals(model_names=[rule.model_name for rule in rules if rule.short])
    for rule in rules:
        rule.why_short = reasons.get(rule.model_name, "") if rule.short else ""
    return rules


def refusal_line(candidates: list[dict[str, str]]) -> str:
    """`gpu-3: selector gpu=a100 missing; gpu-4: 2/2 slots used; …` — the refused nodes of a record."""
    eligible = (Verdict.CHOSEN, Verdict.RANKED_LOWER)
    return "; ".join(f"{c['node']}: {c['detail']}" for c in candidates if c.get("verdict") not in eligible)


def last_refusals(*, model_names: list[str]) -> dict[str, str]:
    """For each model, the per-node reasons of its last `no_capacity` or `tripped` decision: one query
    (none without models)."""
    if not model_names:
        return {}
    records = (
        PlacementDecision.objects.filter(
            model_name__in=model_names, outcome__in=[Outcome.NO_CAPACITY, Outcome.TRIPPED]
        )
        .order_by("model_name", "-created_at", "-id")
        .distinct("model_name")
        .values_list("model_name", "candidates")
    )
    return {name: refusal_line(candidates) for name, candidates in records}


def load_failure_rows() -> list[LoadFailure]:
    """Models whose loads are failing (`scheduling.loadfailures`), by name: one query."""
    return list(LoadFailure.objects.order_by("model_name"))


def catalog_model_names() -> list[str]:
    """Names of the catalog's models, for the form's model picker: one query."""
    return list(ModelConfig.objects.order_by("name").values_list("name", flat=True))
