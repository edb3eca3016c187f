"""The reconciler: one tick keeps every scheduling rule at its bounds (BEHAVIOUR §5).

A tick is: take the cluster-wide lock, read one snapshot in a fixed number of queries (rules, live replicas,
nodes, labels), decide per rule with pure functions, then act — breaker updates, trims by exact process key,
and placements whose slow loads run in parallel across nodes.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import Q
from django.utils import timezone

from localai_cluster import locks
from localai_cluster.metrics import BREAKER_TRIPS, TICK_DURATION
from nodes.choices import NodeStatus, NodeType, ReplicaState
from nodes.models import ModelReplica, Node, NodeLabel
from scheduling import placement
from scheduling.models import SchedulingRule

logger = logging.getLogger(__name__)

LIVE_STATES = (ReplicaState.LOADING, ReplicaState.LOADED)


# --- the snapshot (plain data) --------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    id: Any
    name: str
    schedulable: bool  # approved, healthy, backend
    effective_cap: int
    total_vram: int
    available_vram: int
    reserved_vram: int
    address: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaView:
    id: Any
    node_id: Any
    model_name: str
    replica_index: int
    state: str
    in_flight: int
    idle_since: datetime | None  # last use, else load time

    @property
    def process_key(self) -> str:
        return f"{self.model_name}#{self.replica_index}"


@dataclass(frozen=True)
class RuleView:
    id: Any
    model_name: str
    selector: Mapping[str, str]
    min_replicas: int
    max_replicas: int
    unsatisfiable_until: datetime | None
    unsatisfiable_ticks: int


@dataclass(frozen=True)
class Settings:
    scale_down_delay: float
    breaker_ticks: int
    breaker_cooldown: float

    @classmethod
    def from_django(cls) -> Settings:
        return cls(
            scale_down_delay=settings.LOCALAI_SCALE_DOWN_DELAY,
            breaker_ticks=settings.LOCALAI_UNSATISFIABLE_TICKS,
            breaker_cooldown=settings.LOCALAI_UNSATISFIABLE_COOLDOWN,
        )


# --- decisions (pure) -----------------------------------------------------------------------------------


@dataclass
class RulePlan:
    """What a tick does for one rule."""

    model_name: str
    place: int = 0
    trim: list[ReplicaView] = field(default_factory=list)
    # Breaker: None leaves it alone; otherwise the new (ticks, until, reason).
    breaker: tuple[int, datetime | None, str] | None = None
    tripped: bool = False
    skipped: bool = False
    reason: str = ""


def cluster_capacity(
    model_name: str, selector: Mapping[str, str], nodes: Iterable[NodeView], rows_per_node: Mapping[Any, int]
) -> tuple[int, bool]:
    """Free slots for the model over schedulable nodes matching the selector (rows in any live state count,
    each node clamped at 0), and whether any schedulable node matches at all."""
    capacity, matched = 0, False
    for node in nodes:
        if node.schedulable and placement.selector_matches(node.labels, selector):
            matched = True
            capacity += max(node.effective_cap - rows_per_node.get(node.id, 0), 0)
    return capacity, matched


def _idle_for(replica: ReplicaView, now: datetime, delay: float) -> bool:
    if replica.state != ReplicaState.LOADED or replica.in_flight > 0:
        return False
    return replica.idle_since is None or replica.idle_since <= now - timedelta(seconds=delay)


def _trim_order(replica: ReplicaView) -> tuple[int, datetime]:
    """Highest replica index first, then the oldest last use."""
    return (-replica.replica_index, replica.idle_since or datetime.min.replace(tzinfo=UTC))


def plan_overcap_trims(
    replicas: Sequence[ReplicaView], nodes: Mapping[Any, NodeView], *, now: datetime, delay: float
) -> list[ReplicaView]:
    """Replicas beyond their node's effective cap (an admin lowered it), trimmed once idle, highest index
    first, whatever the rule says. Nothing is evicted at the moment the cap shrinks."""
    groups: dict[tuple[Any, str], list[ReplicaView]] = defaultdict(list)
    for replica in replicas:
        groups[(replica.node_id, replica.model_name)].append(replica)
    trims: list[ReplicaView] = []
    for (node_id, _model), rows in groups.items():
        node = nodes.get(node_id)
        excess = len(rows) - (node.effective_cap if node else len(rows))
        if excess <= 0:
            continue
        idle = sorted((r for r in rows if _idle_for(r, now, delay)), key=_trim_order)
        # Only replicas above the cap by index order may go: the highest indices, once idle.
        highest = sorted(rows, key=lambda r: -r.replica_index)[:excess]
        trims.extend(r for r in idle if r in highest)
    return trims


def plan_rule(
    rule: RuleView,
    replicas: Sequence[ReplicaView],
    nodes: Sequence[NodeView],
    *,
    now: datetime,
    config: Settings,
    already_trimmed: frozenset = frozenset(),
) -> RulePlan:
    """Decide one rule's tick (BEHAVIOUR §5 steps 0–4)."""
    plan = RulePlan(rule.model_name)
    if rule.unsatisfiable_until and rule.unsatisfiable_until > now:
        plan.skipped = True
        plan.reason = "circuit breaker open"
        return plan
    live = [r for r in replicas if r.id not in already_trimmed]
    current = len(live)

    def capacity() -> tuple[int, bool]:  # only computed when a decision needs it: most ticks do not
        rows_per_node: dict[Any, int] = defaultdict(int)
        for replica in replicas:
            rows_per_node[replica.node_id] += 1
        return cluster_capacity(rule.model_name, rule.selector, nodes, rows_per_node)

    if current < rule.min_replicas:
        free, matched = capacity()
        if free == 0:
            ticks = rule.unsatisfiable_ticks + 1
            plan.reason = placement.REASON_NO_MATCHING_NODE if not matched else placement.REASON_NO_FREE_SLOT
            until = None
            if ticks >= config.breaker_ticks:
                until = now + timedelta(seconds=config.breaker_cooldown)
                plan.tripped = True
            plan.breaker = (ticks, until, plan.reason)
            return plan
        plan.place = min(rule.min_replicas - current, free)
        if rule.unsatisfiable_ticks or rule.unsatisfiable_until:
            plan.breaker = (0, None, "")
        return plan

    if rule.unsatisfiable_ticks or rule.unsatisfiable_until:
        plan.breaker = (0, None, "")
    below_max = rule.max_replicas == 0 or current < rule.max_replicas
    all_busy = current > 0 and all(r.state == ReplicaState.LOADED and r.in_flight > 0 for r in live)
    if all_busy and below_max:
        # Burst load: capacity 0 here is not a misconfiguration, so no breaker.
        plan.place = 1 if capacity()[0] > 0 else 0
        plan.reason = "all replicas busy"
        return plan

    floor = max(rule.min_replicas, 1)
    if current > floor:
        idle = sorted((r for r in live if _idle_for(r, now, config.scale_down_delay)), key=_trim_order)
        plan.trim = idle[: current - floor]
    return plan


# --- the snapshot (queries) -----------------------------------------------------------------------------


@dataclass
class Snapshot:
    rules: list[RuleView]
    replicas: list[ReplicaView]
    nodes: dict[Any, NodeView]


def load_snapshot() -> Snapshot:
    """Everything a tick decides from, in a fixed number of queries whatever the cluster's size."""
    rules = [
        RuleView(
            r["id"],
            r["model_name"],
            r["node_selector"] or {},
            r["min_replicas"],
            r["max_replicas"],
            r["unsatisfiable_until"],
            r["unsatisfiable_ticks"],
        )
        for r in SchedulingRule.objects.filter(Q(min_replicas__gt=0) | Q(max_replicas__gt=0)).values(
            "id",
            "model_name",
            "node_selector",
            "min_replicas",
            "max_replicas",
            "unsatisfiable_until",
            "unsatisfiable_ticks",
        )
    ]
    replicas = [
        ReplicaView(
            r["id"],
            r["node_id"],
            r["model_name"],
            r["replica_index"],
            r["state"],
            r["in_flight"],
            r["last_used"] or r["loaded_at"],
        )
        for r in ModelReplica.objects.filter(state__in=LIVE_STATES).values(
            "id", "node_id", "model_name", "replica_index", "state", "in_flight", "last_used", "loaded_at"
        )
    ]
    labels: dict[Any, dict[str, str]] = defaultdict(dict)
    for node_id, key, value in NodeLabel.objects.values_list("node_id", "key", "value"):
        labels[node_id][key] = value
    nodes = {
        n["id"]: NodeView(
            id=n["id"],
            name=n["name"],
            schedulable=(
                n["status"] == NodeStatus.HEALTHY
                and n["approved_at"] is not None
                and n["node_type"] == NodeType.BACKEND
            ),
            effective_cap=n["max_replicas_override"] or n["worker_max_replicas_per_model"],
            total_vram=n["total_vram"],
            available_vram=n["available_vram"],
            reserved_vram=n["reserved_vram"],
            address=n["address"],
            labels=labels.get(n["id"], {}),
        )
        for n in Node.objects.values(
            "id",
            "name",
            "status",
            "approved_at",
            "node_type",
            "max_replicas_override",
            "worker_max_replicas_per_model",
            "total_vram",
            "available_vram",
            "reserved_vram",
            "address",
        )
    }
    return Snapshot(rules, replicas, nodes)


# --- the tick -------------------------------------------------------------------------------------------

LOAD_CONCURRENCY = 16


@dataclass
class TickReport:
    """What one tick did, for logs, metrics and `manage.py reconcile --once`."""

    skipped: bool = False
    placed: list[str] = field(default_factory=list)  # "<model>#<index> on <node>"
    failed: list[str] = field(default_factory=list)
    trimmed: list[str] = field(default_factory=list)
    tripped: list[str] = field(default_factory=list)  # "<model>: <reason>"
    duration: float = 0.0

    def lines(self) -> list[str]:
        if self.skipped:
            return ["skipped: another reconciler tick holds the lock"]
        return [
            f"placed: {', '.join(self.placed) or '-'}",
            f"failed: {', '.join(self.failed) or '-'}",
            f"trimmed: {', '.join(self.trimmed) or '-'}",
            f"tripped: {', '.join(self.tripped) or '-'}",
        ]


def reconcile_tick(*, now: datetime | None = None) -> TickReport:
    """Run one reconciler tick unless another process is running one (then return at once, skipped)."""
    started = time.monotonic()
    with locks.singleton(locks.NAMESPACE_LOOPS, locks.RECONCILER) as acquired:
        if not acquired:
            logger.info("reconcile tick skipped: another process holds the lock")
            return TickReport(skipped=True)
        report = _tick(now or timezone.now(), Settings.from_django())
    report.duration = time.monotonic() - started
    TICK_DURATION.labels("reconcile").observe(report.duration)
    return report


def _tick(now: datetime, config: Settings) -> TickReport:
    report = TickReport()
    snapshot = load_snapshot()
    by_model: dict[str, list[ReplicaView]] = defaultdict(list)
    for replica in snapshot.replicas:
        by_model[replica.model_name].append(replica)

    overcap = plan_overcap_trims(snapshot.replicas, snapshot.nodes, now=now, delay=config.scale_down_delay)
    trimmed_ids = frozenset(r.id for r in overcap)
    plans = [
        plan_rule(
            rule,
            by_model.get(rule.model_name, []),
            list(snapshot.nodes.values()),
            now=now,
            config=config,
            already_trimmed=trimmed_ids,
        )
        for rule in snapshot.rules
    ]
    rules_by_model = {rule.model_name: rule for rule in snapshot.rules}
    skipped_models = {plan.model_name for plan in plans if plan.skipped}

    _apply_breakers(plans, rules_by_model, report)
    to_trim = [r for r in overcap if r.model_name not in skipped_models]
    to_trim += [r for plan in plans for r in plan.trim]
    report.trimmed = _trim(to_trim, snapshot.nodes)
    placements = [
        (plan.model_name, rules_by_model[plan.model_name].selector, plan.place)
        for plan in plans
        if plan.place
    ]
    if placements:
        placed, failed = _place_all(placements, snapshot, by_model)
        report.placed, report.failed = placed, failed
    return report


def _apply_breakers(plans: Iterable[RulePlan], rules: Mapping[str, RuleView], report: TickReport) -> None:
    for plan in plans:
        if plan.breaker is None:
            continue
        ticks, until, reason = plan.breaker
        SchedulingRule.objects.filter(pk=rules[plan.model_name].id).update(
            unsatisfiable_ticks=ticks, unsatisfiable_until=until, unsatisfiable_reason=reason
        )
        if plan.tripped:
            BREAKER_TRIPS.labels(plan.model_name).inc()
            report.tripped.append(f"{plan.model_name}: {reason}")
            logger.warning(
                "model %s cannot reach its minimum replicas (%s) for %d ticks: pausing it until %s",
                plan.model_name,
                reason,
                ticks,
                until.isoformat() if until else "-",
            )


def _trim(replicas: Iterable[ReplicaView], nodes: Mapping[Any, NodeView]) -> list[str]:
    """Unload each replica by its exact process key, skipping any that a request claimed meanwhile."""
    from scheduling.services import replica_evict

    trimmed = []
    for replica in replicas:
        idle = placement.IdleReplica(
            id=replica.id,
            node_id=replica.node_id,
            model_name=replica.model_name,
            replica_index=replica.replica_index,
            last_used=replica.idle_since,
        )
        if replica_evict(replica=idle):
            node = nodes.get(replica.node_id)
            trimmed.append(f"{replica.process_key} on {node.name if node else replica.node_id}")
    return trimmed


def choose_nodes(
    model: placement.ModelRequirement, count: int, candidates: Iterable[placement.NodeSnapshot]
) -> list[placement.NodeSnapshot]:
    """Up to `count` placements for one model, each ranked after the previous one was counted in: replicas
    spread across nodes before they stack (pure)."""
    view = {node.id: node for node in candidates}
    picks = []
    for _ in range(count):
        ranked = placement.place(model, view.values())
        if not ranked.candidates:
            break
        best = ranked.candidates[0]
        picks.append(best)
        view[best.id] = replace(
            best,
            replicas_of_model=best.replicas_of_model + 1,
            reserved_vram=best.reserved_vram + max(model.vram_bytes, 0),
        )
    return picks


def _node_snapshots(
    model_name: str, snapshot: Snapshot, replicas: Sequence[ReplicaView]
) -> list[placement.NodeSnapshot]:
    rows: dict[Any, int] = defaultdict(int)
    for replica in replicas:
        rows[replica.node_id] += 1
    in_flight: dict[Any, int] = defaultdict(int)
    for replica in snapshot.replicas:
        in_flight[replica.node_id] += replica.in_flight
    return [
        placement.NodeSnapshot(
            id=node.id,
            name=node.name,
            effective_cap=node.effective_cap,
            replicas_of_model=rows[node.id],
            total_vram=node.total_vram,
            available_vram=node.available_vram,
            reserved_vram=node.reserved_vram,
            in_flight=in_flight[node.id],
            labels=node.labels,
        )
        for node in snapshot.nodes.values()
        if node.schedulable
    ]


def _place_all(
    requests: Sequence[tuple[str, Mapping[str, str], int]],
    snapshot: Snapshot,
    by_model: Mapping[str, Sequence[ReplicaView]],
) -> tuple[list[str], list[str]]:
    """Claim every slot first (short transactions, one node row lock each), then run the slow loads in
    parallel, so `min = 8` over 4 nodes converges in one load time, and one failed load stops nothing else.

    A model whose last load failed is left alone while its cooldown runs (`scheduling.loadfailures`: the
    same cluster-wide backoff as the router's), and once it is over gets one probe load, not `count`. The
    circuit breaker is not involved: it counts ticks without capacity, and a model that fails to load has
    capacity."""
    from nodes.services import replica_claim_slot
    from scheduling.loadfailures import LoadBackingOff, load_attempts_begin
    from scheduling.models import ModelConfig

    configs = ModelConfig.objects.in_bulk([name for name, _, _ in requests], field_name="name")
    attempts = load_attempts_begin(model_names=[name for name, _, _ in requests])
    claimed, failed = [], []
    for model_name, selector, count in requests:
        config = configs.get(model_name)
        if config is None:
            logger.warning("rule for %s cannot be satisfied: the model is not in the catalog", model_name)
            failed.append(f"{model_name}: not in the catalog")
            continue
        attempt = attempts[model_name]
        if isinstance(attempt, LoadBackingOff):
            retry_at = attempt.failure.retry_at.strftime("%H:%M:%S")
            failed.append(f"{model_name}: load failing, next attempt after {retry_at} UTC")
            continue
        if attempt.is_retry:
            count = 1
        model = placement.ModelRequirement(model_name, config.vram_bytes, dict(selector))
        for node in choose_nodes(
            model, count, _node_snapshots(model_name, snapshot, by_model.get(model_name, []))
        ):
            replica = replica_claim_slot(
                node_id=node.id, model_name=model_name, vram_bytes=config.vram_bytes, backend=config.backend
            )
            if replica is None:
                failed.append(f"{model_name} on {node.name}: slot taken meanwhile")
                continue
            claimed.append((replica, config, node.name, attempt))
    if not claimed:
        return [], failed
    with ThreadPoolExecutor(max_workers=min(LOAD_CONCURRENCY, len(claimed))) as pool:
        outcomes = list(pool.map(lambda job: _load_one(*job), claimed))
    placed = [text for ok, text in outcomes if ok]
    failed += [text for ok, text in outcomes if not ok]
    return placed, failed


def _load_one(replica, config, node_name: str, attempt) -> tuple[bool, str]:
    from scheduling.loadfailures import load_failure_clear, load_failure_note
    from scheduling.placement import LoadFailed
    from scheduling.services import replica_load

    label = f"{replica.model_name}#{replica.replica_index} on {node_name}"
    try:
        replica_load(replica=replica, config=config)
        load_failure_clear(model_name=replica.model_name, reason="loaded")
        return True, label
    except LoadFailed as error:
        try:
            load_failure_note(attempt=attempt, error=error)
        except Exception:
            logger.exception("recording the failed load of %s failed", label)
        return False, f"{label}: {error}"
    except Exception as error:  # a fault in one load must not stop the others
        logger.exception("loading %s failed", label)
        return False, f"{label}: {error}"
    finally:
        connections.close_all()
