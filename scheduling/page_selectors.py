"""Reads for the scheduling page (`/ui/scheduling/`): rules with their current replica count and status, and
the model catalog for the form's picker."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict, cast

from django.db.models import Q
from django.utils import timezone

from nodes.choices import NodeStatus, NodeType, ReplicaState
from nodes.models import ModelReplica, Node
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


# --- the models page (`/ui/models/`) --------------------------------------------------------------------


@dataclass
class ModelRow:
    """One catalog model as the models page shows it."""

    config: ModelConfig
    replicas: list[ModelReplica] = field(default_factory=list)
    rule: SchedulingRule | None = None
    rule_mode: str = ""
    selector_items: list[tuple[str, str]] = field(default_factory=list)
    load_failure: LoadFailure | None = None
    decision: PlacementDecision | None = None
    backend_offered: bool = True
    # Routing policy: the catalog's `routing` field when this build has it (shown as is), else None.
    routing: Any = None

    @property
    def loaded(self) -> int:
        return sum(1 for replica in self.replicas if replica.state == ReplicaState.LOADED)

    @property
    def loading(self) -> int:
        return sum(1 for replica in self.replicas if replica.state == ReplicaState.LOADING)

    @property
    def downloading(self) -> int:
        return sum(1 for replica in self.replicas if replica.state == ReplicaState.DOWNLOADING)

    @property
    def in_flight(self) -> int:
        return sum(replica.in_flight for replica in self.replicas)

    @property
    def refused_nodes(self) -> str:
        """The per-node reasons of the last decision when it refused (`no_capacity`, `tripped`)."""
        if self.decision is None or self.decision.outcome not in (Outcome.NO_CAPACITY, Outcome.TRIPPED):
            return ""
        return refusal_line(self.decision.candidates if isinstance(self.decision.candidates, list) else [])


def offered_backends() -> dict[str, int]:
    """Backend name → how many backend nodes that are not offline report it (their agents can start it):
    one query."""
    counts: dict[str, int] = {}
    rows = Node.objects.filter(node_type=NodeType.BACKEND).exclude(status=NodeStatus.OFFLINE)
    for backends in rows.values_list("backends", flat=True):
        for name in backends if isinstance(backends, list) else []:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def model_rows(*, query: str = "", offered: dict[str, int] | None = None) -> list[ModelRow]:
    """The catalog's models whose name, backend or model file contains `query` (case-insensitive), by name,
    each with its replicas on every node (node names included), its rule, load failure, last placement
    decision and whether any node offers its backend: six queries (five when `offered` is given) whatever
    the number of models, nodes and replicas."""
    configs = ModelConfig.objects.order_by("name")
    if query:
        configs = configs.filter(
            Q(name__icontains=query) | Q(backend__icontains=query) | Q(model__icontains=query)
        )
    rows = {
        config.name: ModelRow(config=config, routing=getattr(config, "routing", None)) for config in configs
    }
    if not rows:
        return []
    names = list(rows)
    replicas = (
        ModelReplica.objects.filter(model_name__in=names)
        .select_related("node")
        .only(
            "id",
            "model_name",
            "replica_index",
            "state",
            "in_flight",
            "address",
            "loaded_at",
            "progress",
            "download_bytes",
            "download_total",
            "download_rate",
            "node__id",
            "node__name",
            "node__status",
        )
        .order_by("node__name", "replica_index")
    )
    for replica in replicas:
        rows[replica.model_name].replicas.append(replica)
    now = timezone.now()
    for rule in SchedulingRule.objects.filter(model_name__in=names):
        row = rows[rule.model_name]
        row.rule = rule
        row.rule_mode = rule_mode(rule)
        selector = rule.node_selector if isinstance(rule.node_selector, dict) else {}
        row.selector_items = sorted(selector.items())
        rule.breaker_open = rule.unsatisfiable_until is not None and rule.unsatisfiable_until > now  # type: ignore[attr-defined]
    for failure in LoadFailure.objects.filter(model_name__in=names):
        rows[failure.model_name].load_failure = failure
    decisions = (
        PlacementDecision.objects.filter(model_name__in=names)
        .order_by("model_name", "-created_at", "-id")
        .distinct("model_name")
    )
    for decision in decisions:
        rows[decision.model_name].decision = decision
    if offered is None:
        offered = offered_backends()
    for row in rows.values():
        row.backend_offered = row.config.backend in offered
    return list(rows.values())
