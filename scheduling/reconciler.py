"""The reconciler: one tick keeps every scheduling rule at its bounds (BEHAVIOUR §5).

A tick is: take the cluster-wide lock, ask PostgreSQL in one statement which rules could act (`triage`: a tick
that finds none stops there), read one snapshot in a fixed number of queries (rules, live replicas, nodes,
labels), decide per named rule with pure functions, then act — breaker updates, trims by exact process key,
and placements whose slow loads run in parallel across nodes.
"""

from __future__ import annotations

import bisect
import heapq
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from localai_cluster import locks
from localai_cluster.db_router import primary_reads
from localai_cluster.metrics import BREAKER_TRIPS, TICK_DURATION
from nodes.choices import NodeType, ReplicaState
from scheduling import pipeline
from scheduling.autoscale import Load, autoscale_decide, inflight_averages, state_changes, zero_candidate
from scheduling.choices import Outcome, Trigger, Verdict
from scheduling.decisions import MAX_RECORDED_NODES, DecisionRecord, decisions_record
from scheduling.models import ModelConfig, SchedulingRule
from scheduling.pipeline import ClusterSnapshot, NodeSnapshot, ReplicaView, RuleView
from scheduling.placement import LoadFailed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    scale_down_delay: float
    breaker_ticks: int
    breaker_cooldown: float
    autoscale_window: float = 30.0

    @classmethod
    def from_django(cls) -> Settings:
        return cls(
            scale_down_delay=settings.LOCALAI_SCALE_DOWN_DELAY,
            breaker_ticks=settings.LOCALAI_UNSATISFIABLE_TICKS,
            breaker_cooldown=settings.LOCALAI_UNSATISFIABLE_COOLDOWN,
            autoscale_window=settings.LOCALAI_AUTOSCALE_WINDOW,
        )


# --- decisions (pure) -----------------------------------------------------------------------------------


@dataclass
class RulePlan:
    """What a tick does for one rule."""

    model_name: str
    place: int = 0
    trim: list[ReplicaView] = field(default_factory=list)
    retire: list[ReplicaView] = field(default_factory=list)  # busy, out of routing until idle (autoscale)
    # Breaker: None leaves it alone; otherwise the new (ticks, until, reason).
    breaker: tuple[int, datetime | None, str] | None = None
    tripped: bool = False
    skipped: bool = False
    burst: bool = False  # a placement for burst load (every replica busy), not for the minimum
    autoscale: bool = False  # placements and trims decided on the in-flight average (scheduling.autoscale)
    reason: str = ""
    # The rule's autoscaler columns to write (scheduling.autoscale.state_changes).
    state: Mapping[str, datetime | None] = field(default_factory=dict)


def cluster_capacity(
    model_name: str,
    selector: Mapping[str, str],
    nodes: Iterable[NodeSnapshot],
    rows_per_node: Mapping[Any, int],
    backend: str = "",
) -> tuple[int, bool]:
    """Free slots for the model over the nodes the pipeline's gate lets through (approved, healthy, not
    draining, matching the selector, offering the model's `backend`; a node's used slots are its rows of the
    model in any state, or the live rows given when more; each node clamped at 0), and whether any node
    passes the gate at all."""
    capacity, matched = 0, False
    for node in nodes:
        if pipeline.gate(node, selector, backend) is None:
            matched = True
            used = max(node.replicas_of_model, rows_per_node.get(node.id, 0))
            capacity += max(node.effective_cap - used, 0)
    return capacity, matched


class CapacityIndex:
    """`cluster_capacity` for many rules over one tick's nodes: each selector's gate runs once over the nodes,
    then a rule costs only its model's rows (a tick with thousands of rules short would otherwise judge every
    node once per rule)."""

    def __init__(self, nodes: Iterable[NodeSnapshot]) -> None:
        self._nodes = list(nodes)
        self._by_selector: dict[tuple[str, str], tuple[dict[Any, NodeSnapshot], int]] = {}

    def __call__(
        self, selector: Mapping[str, str], rows_per_node: Mapping[Any, int], backend: str = ""
    ) -> tuple[int, bool]:
        key = (json.dumps(selector, sort_keys=True, default=str), backend)
        entry = self._by_selector.get(key)
        if entry is None:
            passing = {
                node.id: node for node in self._nodes if pipeline.gate(node, selector, backend) is None
            }
            total = sum(max(n.effective_cap - n.replicas_of_model, 0) for n in passing.values())
            entry = self._by_selector[key] = (passing, total)
        passing, capacity = entry
        for node_id, count in rows_per_node.items():
            node = passing.get(node_id)
            if node is not None:
                empty = max(node.effective_cap - node.replicas_of_model, 0)
                capacity += max(node.effective_cap - max(node.replicas_of_model, count), 0) - empty
        return capacity, bool(passing)


def _idle_for(replica: ReplicaView, now: datetime, delay: float) -> bool:
    if replica.state != ReplicaState.LOADED or replica.in_flight > 0:
        return False
    return replica.idle_since is None or replica.idle_since <= now - timedelta(seconds=delay)


def _trim_order(replica: ReplicaView) -> tuple[int, datetime]:
    """Highest replica index first, then the oldest last use."""
    return (-replica.replica_index, replica.idle_since or datetime.min.replace(tzinfo=UTC))


def plan_overcap_trims(
    replicas: Sequence[ReplicaView], nodes: Mapping[Any, NodeSnapshot], *, now: datetime, delay: float
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
    nodes: Sequence[NodeSnapshot],
    *,
    now: datetime,
    config: Settings,
    already_trimmed: frozenset = frozenset(),
    rows_per_node: Mapping[Any, int] | None = None,
    load: Load | None = None,
    capacity_index: CapacityIndex | None = None,
) -> RulePlan:
    """Decide one rule's tick (BEHAVIOUR §5 steps 0–4). `rows_per_node`: the model's rows in any state per
    node (the snapshot's count, as the claim sees them); without it, the live `replicas` are counted.
    `load`: the model's in-flight average over the autoscale window, for a rule with `target_in_flight` > 0
    (README "Autoscaling"), which then replaces the all-busy burst and the idle trim.
    `capacity_index`: the tick's `CapacityIndex` over `nodes` (the same answer, computed once per selector)."""
    plan = RulePlan(rule.model_name)
    if rule.unsatisfiable_until and rule.unsatisfiable_until > now:
        plan.skipped = True
        plan.reason = "circuit breaker open"
        return plan
    live = [r for r in replicas if r.id not in already_trimmed]
    current = len(live)

    def capacity(backend: str = rule.backend) -> tuple[int, bool]:  # only when a decision needs it
        rows = rows_per_node
        if rows is None:
            rows = defaultdict(int)
            for replica in replicas:
                rows[replica.node_id] += 1
        if capacity_index is not None:
            return capacity_index(rule.selector, rows, backend)
        return cluster_capacity(rule.model_name, rule.selector, nodes, rows, backend)

    if current < rule.min_replicas:
        free, matched = capacity()
        if free == 0:
            ticks = rule.unsatisfiable_ticks + 1
            plan.reason = pipeline.REASON_NO_MATCHING_NODE if not matched else pipeline.REASON_NO_FREE_SLOT
            if not matched and rule.backend and capacity("")[1]:  # nodes match, none can start the backend
                plan.reason = pipeline.reason_no_backend(rule.backend)
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
    if rule.target_in_flight > 0:
        free_slots = capacity()[0] if load is not None else None
        decision = autoscale_decide(
            rule,
            live,
            now=now,
            load=load,
            free_slots=free_slots,
            window=config.autoscale_window,
            default_downscale_delay=config.scale_down_delay,
        )
        plan.place, plan.trim, plan.reason = decision.place, decision.trim, decision.reason
        plan.retire = decision.retire
        plan.autoscale = True
        plan.state = state_changes(rule, decision.state)
        return plan
    below_max = rule.max_replicas == 0 or current < rule.max_replicas
    all_busy = current > 0 and all(r.state == ReplicaState.LOADED and r.in_flight > 0 for r in live)
    if all_busy and below_max:
        # Burst load: capacity 0 here is not a misconfiguration, so no breaker.
        plan.place = 1 if capacity()[0] > 0 else 0
        plan.reason = "all replicas busy"
        plan.burst = True
        return plan

    floor = max(rule.min_replicas, 1)
    if current > floor:
        idle = sorted((r for r in live if _idle_for(r, now, config.scale_down_delay)), key=_trim_order)
        plan.trim = idle[: current - floor]
    rest = [r for r in live if r not in plan.trim]
    last = zero_candidate(rule, rest, now=now, load=load)
    if last is not None:
        plan.trim.append(last)
        plan.autoscale = True
        plan.reason = f"scale to zero: no request for {rule.scale_to_zero_after} s"
    return plan


# --- the snapshot (queries) -----------------------------------------------------------------------------


def load_snapshot() -> ClusterSnapshot:
    """Everything a tick decides from, in a fixed number of queries whatever the cluster's size."""
    return pipeline.cluster_snapshot()


# Which rules a tick would act on, decided in PostgreSQL: one aggregate over the replica rows, so a tick with
# nothing to do reads no replica, node or label into Python (docs/scaling.md "The reconciler"). Each condition
# is the SQL side of a branch of `plan_rule` (or of `plan_overcap_trims`, `_unload_retired`) that can act, and
# may only be wider than the Python one, never narrower: the full tick decides on the snapshot as before.
_TRIAGE_SQL = """
WITH live AS (
    SELECT model_name,
           count(*) AS live,
           count(*) FILTER (WHERE NOT (state = %(loaded)s AND in_flight > 0)) AS not_busy,
           count(*) FILTER (WHERE state = %(loaded)s AND in_flight = 0) AS idle,
           count(*) FILTER (
               WHERE state = %(loaded)s AND in_flight = 0
               AND (COALESCE(last_used, loaded_at) IS NULL OR COALESCE(last_used, loaded_at) <= %(idle_before)s)
           ) AS idle_for_delay,
           min(COALESCE(last_used, loaded_at)) FILTER (WHERE state = %(loaded)s AND in_flight = 0) AS idle_since
    FROM nodes_modelreplica
    WHERE state = ANY(%(live_states)s)
    GROUP BY model_name
)
SELECT
    ARRAY(
        SELECT r.model_name
        FROM scheduling_schedulingrule r LEFT JOIN live l ON l.model_name = r.model_name
        WHERE (r.min_replicas > 0 OR r.max_replicas > 0 OR r.target_in_flight > 0 OR r.scale_to_zero_after > 0)
          AND (r.unsatisfiable_until IS NULL OR r.unsatisfiable_until <= %(now)s)
          AND (
              -- below the minimum: a placement, or the breaker's count
              COALESCE(l.live, 0) < r.min_replicas
              -- the breaker to reset
              OR r.unsatisfiable_ticks <> 0 OR r.unsatisfiable_until IS NOT NULL
              -- autoscaled: decided on the in-flight average every tick
              OR r.target_in_flight > 0
              -- burst: every live replica busy, below the maximum
              OR (l.live > 0 AND l.not_busy = 0 AND (r.max_replicas = 0 OR l.live < r.max_replicas))
              -- above the floor with a replica idle for the scale-down delay
              OR (l.live > GREATEST(r.min_replicas, 1) AND l.idle_for_delay > 0)
              -- scale to zero: the last replica idle for `scale_to_zero_after`
              OR (r.min_replicas = 0 AND r.scale_to_zero_after > 0 AND l.live = 1 AND l.idle > 0
                  AND (l.idle_since IS NULL
                       OR l.idle_since <= %(now)s - make_interval(secs => r.scale_to_zero_after)))
          )
        ORDER BY r.model_name
    ),
    -- a node holding more live replicas of a model than its effective cap
    EXISTS (
        SELECT 1
        FROM nodes_modelreplica m JOIN nodes_node n ON n.id = m.node_id
        WHERE m.state = ANY(%(live_states)s) AND n.node_type = %(backend)s
        GROUP BY m.node_id, m.model_name, n.max_replicas_override, n.worker_max_replicas_per_model
        HAVING count(*) > COALESCE(NULLIF(n.max_replicas_override, 0), n.worker_max_replicas_per_model)
    ),
    -- a retired replica whose last request has ended
    EXISTS (SELECT 1 FROM nodes_modelreplica WHERE state = %(unloading)s AND in_flight = 0)
"""


@dataclass(frozen=True)
class Triage:
    """What a tick's first query found: the rules it would act on, and the cluster-wide work."""

    rules: tuple[str, ...] = ()
    overcap: bool = False
    retired: bool = False

    @property
    def work(self) -> bool:
        return bool(self.rules or self.overcap or self.retired)


def triage(now: datetime, config: Settings) -> Triage:
    """One statement whatever the cluster's size: the rules whose plan could act this tick (below the
    minimum, breaker set, autoscaled, all busy, idle above the floor, due to scale to zero), whether any node
    holds more replicas of a model than its cap, and whether a retired replica is idle — a superset of what
    `_tick` would do on the full snapshot, so a tick that finds nothing stops here."""
    from django.db import connection

    params: dict[str, Any] = {
        "now": now,
        "idle_before": now - timedelta(seconds=config.scale_down_delay),
        "loaded": str(ReplicaState.LOADED),
        "unloading": str(ReplicaState.UNLOADING),
        "live_states": [str(state) for state in pipeline.LIVE_STATES],
        "backend": str(NodeType.BACKEND),
    }
    with connection.cursor() as cursor:
        cursor.execute(_TRIAGE_SQL, params)
        names, overcap, retired = cursor.fetchone()
    return Triage(tuple(names), overcap, retired)


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
    prefetched: list[str] = field(default_factory=list)  # "<model> on <node>: <paths>"
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
        with primary_reads():  # decisions are never taken on a lagging read replica
            report = _tick(now or timezone.now(), Settings.from_django())
    report.duration = time.monotonic() - started
    TICK_DURATION.labels("reconcile").observe(report.duration)
    return report


def _tick(now: datetime, config: Settings) -> TickReport:
    report = TickReport()
    found = triage(now, config)
    if not found.work:
        report.prefetched = _prefetch()
        return report
    snapshot = load_snapshot()
    live = snapshot.live_replicas
    by_model: dict[str, list[ReplicaView]] = defaultdict(list)
    for replica in live:
        by_model[replica.model_name].append(replica)
    # Only the rules the triage named can act — unless a node is over its cap: the replicas trimmed there no
    # longer count, which can leave any of its models short (or all busy), so every rule is planned then.
    named = None if found.overcap else set(found.rules)
    rules = [
        rule
        for rule in snapshot.rules.values()
        if (named is None or rule.model_name in named)
        and (
            rule.min_replicas > 0
            or rule.max_replicas > 0
            or rule.target_in_flight > 0
            or rule.scale_to_zero_after > 0
        )
    ]
    loads = inflight_averages(
        model_names=[r.model_name for r in rules if r.target_in_flight > 0 or r.scale_to_zero_after > 0],
        now=now,
    )

    overcap = (
        plan_overcap_trims(live, snapshot.nodes, now=now, delay=config.scale_down_delay)
        if found.overcap
        else []
    )
    trimmed_ids = frozenset(r.id for r in overcap)
    nodes = list(snapshot.nodes.values())
    capacity_index = CapacityIndex(nodes)
    plans = [
        plan_rule(
            rule,
            by_model.get(rule.model_name, []),
            nodes,
            now=now,
            config=config,
            already_trimmed=trimmed_ids,
            rows_per_node=snapshot.rows_of(rule.model_name),
            load=loads.get(rule.model_name),
            capacity_index=capacity_index,
        )
        for rule in rules
    ]
    skipped_models = {plan.model_name for plan in plans if plan.skipped}
    vram = dict(
        ModelConfig.objects.filter(
            name__in=[plan.model_name for plan in plans if plan.breaker or plan.place]
        ).values_list("name", "vram_bytes")
    )

    _apply_breakers(plans, snapshot, vram, report)
    _apply_autoscale_states(plans, snapshot)
    to_trim: list[tuple[ReplicaView, RulePlan | None]] = [
        (r, None) for r in overcap if r.model_name not in skipped_models
    ]
    to_trim += [(r, plan) for plan in plans for r in plan.trim]
    report.trimmed = _trim(to_trim, snapshot.nodes)
    report.trimmed += _retire([(r, plan) for plan in plans for r in plan.retire], snapshot.nodes)
    report.trimmed += _unload_retired(snapshot) if found.retired else []
    placements = [plan for plan in plans if plan.place]
    if placements:
        placed, failed = _place_all(placements, snapshot)
        report.placed, report.failed = placed, failed
    report.prefetched = _prefetch()
    return report


def _prefetch() -> list[str]:
    """Rules with `prefetch: true`: every matching node that does not hold all of the model's files yet is
    asked to stage them (the agent downloads each file once, whatever how often it is asked). Never raises."""
    from scheduling.services import model_prefetch

    started: list[str] = []
    for model_name in SchedulingRule.objects.filter(prefetch=True).values_list("model_name", flat=True):
        try:
            for result in model_prefetch(model_name=model_name, only_missing=True):
                if result.downloading:
                    started.append(f"{model_name} on {result.node_name}: {', '.join(result.downloading)}")
        except Exception:
            logger.exception("prefetch of %s failed", model_name)
    return started


def _apply_breakers(
    plans: Iterable[RulePlan], snapshot: ClusterSnapshot, vram: Mapping[str, int], report: TickReport
) -> None:
    """Writes each rule's breaker; a rule short of capacity gets a `no_capacity` decision record (a tripped
    one `tripped`) with every node's verdict."""
    records = []
    for plan in plans:
        if plan.breaker is None:
            continue
        ticks, until, reason = plan.breaker
        SchedulingRule.objects.filter(pk=snapshot.rules[plan.model_name].id).update(
            unsatisfiable_ticks=ticks, unsatisfiable_until=until, unsatisfiable_reason=reason
        )
        if not ticks:
            continue
        verdicts = snapshot.evaluate(snapshot.requirement(plan.model_name, vram.get(plan.model_name, 0)))
        records.append(
            DecisionRecord(
                model_name=plan.model_name,
                trigger=Trigger.RECONCILE,
                outcome=Outcome.TRIPPED if plan.tripped else Outcome.NO_CAPACITY,
                message=verdicts.refusal(),
                candidates=verdicts.records(),
            )
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
    decisions_record(records=records)


def _apply_autoscale_states(plans: Iterable[RulePlan], snapshot: ClusterSnapshot) -> None:
    """Writes the autoscaler's memory of each rule that changed (scheduling.autoscale)."""
    for plan in plans:
        if plan.state:
            SchedulingRule.objects.filter(pk=snapshot.rules[plan.model_name].id).update(**plan.state)


def _trim(
    replicas: Iterable[tuple[ReplicaView, RulePlan | None]], nodes: Mapping[Any, NodeSnapshot]
) -> list[str]:
    """Unload each replica by its exact process key, skipping any that a request claimed meanwhile; each
    trim writes a `trimmed` decision record (trigger `autoscale`, with the autoscaler's reason, for a
    scale-down or a scale to zero)."""
    from scheduling.services import replica_evict

    trimmed, records = [], []
    for replica, plan in replicas:
        if replica_evict(replica=replica):
            node = nodes.get(replica.node_id)
            node_name = node.name if node else str(replica.node_id)
            trimmed.append(f"{replica.process_key} on {node_name}")
            autoscale = plan is not None and plan.autoscale
            why = plan.reason if plan is not None and autoscale else "idle above the rule's bounds"
            records.append(
                DecisionRecord(
                    model_name=replica.model_name,
                    trigger=Trigger.AUTOSCALE if autoscale else Trigger.RECONCILE,
                    outcome=Outcome.TRIMMED,
                    node_name=node_name,
                    replica_index=replica.replica_index,
                    message=f"trimmed {replica.process_key} from {node_name}: {why}",
                )
            )
    decisions_record(records=records)
    return trimmed


def _retire(replicas: Iterable[tuple[ReplicaView, RulePlan]], nodes: Mapping[Any, NodeSnapshot]) -> list[str]:
    """Takes busy replicas above an autoscaled rule's desired count out of routing; each writes a `trimmed`
    decision record (the unload follows once their requests end: `_unload_retired`)."""
    from scheduling.services import replica_retire

    retired, records = [], []
    for replica, plan in replicas:
        if replica_retire(replica=replica):
            node = nodes.get(replica.node_id)
            node_name = node.name if node else str(replica.node_id)
            retired.append(f"{replica.process_key} on {node_name} (retired)")
            records.append(
                DecisionRecord(
                    model_name=replica.model_name,
                    trigger=Trigger.AUTOSCALE,
                    outcome=Outcome.TRIMMED,
                    node_name=node_name,
                    replica_index=replica.replica_index,
                    message=f"retired {replica.process_key} from {node_name}: {plan.reason}; no new request "
                    f"goes to it, it unloads once its {replica.in_flight} in-flight request(s) end",
                )
            )
    decisions_record(records=records)
    return retired


def _unload_retired(snapshot: ClusterSnapshot) -> list[str]:
    """Unloads the retired replicas whose last request has ended."""
    from scheduling.services import replicas_unload_retired

    retired = [r for r in snapshot.replicas if r.state == ReplicaState.UNLOADING and r.in_flight == 0]
    return [f"{key} (retired, idle)" for key in replicas_unload_retired(replicas=retired)] if retired else []


@dataclass
class _Job:
    replica: Any
    config: Any
    node: Any
    attempt: Any
    trigger: str
    candidates: list[dict[str, str]]
    omitted: Mapping[str, int] | None = None
    started: float = 0.0
    reason: str = ""  # the autoscaler's, for its decision record


class _Placer:
    """One tick's placements on one snapshot. Each model is judged on the snapshot plus the reservations this
    tick already made (so two models do not both count on the same free VRAM), and its nodes are ranked
    without judging the whole cluster when it is large: nodes passing a selector's gate (for the model's
    backend) are kept once per selector and backend in a heap by (most effective free VRAM, least in-flight,
    name) — the ranking of a node with no replica of the model — so a placement reads only the few best
    entries. Small clusters, models whose eligible nodes do not outnumber what a decision record lists, and
    models with `files` (ranked by locality first) go through `pipeline.evaluate` itself."""

    def __init__(self, snapshot: ClusterSnapshot) -> None:
        self.snapshot = snapshot
        self.reserved: dict[Any, int] = defaultdict(int)  # VRAM reserved by this tick, per node
        self.placed: dict[str, dict[Any, int]] = defaultdict(lambda: defaultdict(int))  # model → node → rows
        self._gates: dict[tuple, _Gate] = {}

    def node(self, node: NodeSnapshot, model_name: str) -> NodeSnapshot:
        rows = self.snapshot.rows_of(model_name).get(node.id, 0) + self.placed[model_name].get(node.id, 0)
        extra = self.reserved.get(node.id, 0)
        if not rows and not extra:
            return node
        return replace(node, replicas_of_model=rows, reserved_vram=node.reserved_vram + extra)

    def evaluate(self, model: pipeline.ModelRequirement) -> pipeline.Plan:
        return pipeline.evaluate(model, [self.node(n, model.name) for n in self.snapshot.nodes.values()])

    def take(self, model: pipeline.ModelRequirement, picks: Sequence[NodeSnapshot]) -> None:
        """Counts the picks in: a row of the model each, and their VRAM reserved."""
        for node in picks:
            self.placed[model.name][node.id] += 1
            if node.vram_limited and model.vram_bytes > 0:
                self.reserved[node.id] += model.vram_bytes
                for gate in self._gates.values():
                    gate.changed(self.node(self.snapshot.nodes[node.id], ""))

    def choose(
        self, model: pipeline.ModelRequirement, count: int
    ) -> tuple[list[NodeSnapshot], list[_Record], str | None]:
        """Up to `count` nodes for the model, each with its decision record's candidates (the node chosen
        first) and the nodes it leaves out counted by verdict (None: all listed), and the refusal when fewer
        than `count` fit (None when all did)."""
        fast = self._choose_fast(model, count)
        if fast is not None:
            return fast
        plan = self.evaluate(model)
        picks = pipeline.choose_nodes(model, count, plan.eligible)
        verdicts = plan.records()
        refusal = None
        if len(picks) < count:
            refusal = plan.refusal() if not picks else f"room for {len(picks)} of {count} replicas"
        self.take(model, picks)
        return picks, [(_chosen(verdicts, node.name), None) for node in picks], refusal

    def _gate(self, selector: Mapping[str, str], backend: str = "") -> _Gate:
        key = (tuple(sorted(selector.items())), backend)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(
                [self.node(node, "") for node in self.snapshot.nodes.values()], dict(selector), backend
            )
        return gate

    def _choose_fast(
        self, model: pipeline.ModelRequirement, count: int
    ) -> tuple[list[NodeSnapshot], list[_Record], str | None] | None:
        if model.artifacts:
            # A node holding the model's files ranks first (`pipeline.rank_key`): an order of this model's
            # own, which the heap, shared by every model of a selector, does not keep.
            return None
        gate = self._gate(model.selector, model.backend)
        if len(gate.passing) < FAST_PATH_MIN_NODES:
            return None
        rows = dict(self.snapshot.rows_of(model.name))
        for node_id, extra in self.placed[model.name].items():
            rows[node_id] = rows.get(node_id, 0) + extra
        wanted = MAX_RECORDED_NODES + count
        best = gate.best(model, rows, wanted)
        if best is None:
            return None
        counts = gate.room_verdicts(model, rows)
        eligible = len(gate.passing) - sum(counts.values())
        picks = best[:count]
        listed = [
            {
                "node": node.name,
                "verdict": Verdict.RANKED_LOWER,
                "detail": pipeline.ranking_terms(model, node),
            }
            for node in best
        ]
        omitted: dict[str, int] = {**gate.refused_counts, **counts}
        records: list[_Record] = []
        for rank in range(len(picks)):
            first = {**listed[rank], "verdict": Verdict.CHOSEN}
            others = [entry for index, entry in enumerate(listed) if index != rank][: MAX_RECORDED_NODES - 1]
            ranked_lower = eligible - 1 - len(others)
            lower: dict[str, int] = {Verdict.RANKED_LOWER: ranked_lower} if ranked_lower > 0 else {}
            records.append(([first, *others], {**omitted, **lower}))
        self.take(model, picks)
        return picks, records, None


# A decision record's candidates (the node chosen first), and the nodes left out counted by verdict.
_Record = tuple[list[dict[str, str]], Mapping[str, int] | None]

# Below this many nodes passing a selector, a model is judged node by node (`pipeline.evaluate`).
FAST_PATH_MIN_NODES = 256


class _Gate:
    """The nodes passing one selector's gate for one backend, ranked in a heap (see `_Placer`), and the gate's
    refusals counted by verdict."""

    def __init__(self, nodes: Iterable[NodeSnapshot], selector: Mapping[str, str], backend: str = "") -> None:
        self.passing: dict[Any, NodeSnapshot] = {}
        self.refused_counts: dict[str, int] = defaultdict(int)
        for node in nodes:
            judgement = pipeline.gate(node, selector, backend)
            if judgement is None:
                self.passing[node.id] = node
            else:
                self.refused_counts[judgement.verdict] += 1
        self.refused_counts = dict(self.refused_counts)
        self._heap = [(-n.effective_free_vram, n.in_flight, n.name, n.id) for n in self.passing.values()]
        heapq.heapify(self._heap)
        self._free = sorted(n.effective_free_vram for n in self.passing.values() if n.vram_limited)

    def changed(self, node: NodeSnapshot) -> None:
        old = self.passing.get(node.id)
        if old is None:
            return
        if old.vram_limited:
            del self._free[bisect.bisect_left(self._free, old.effective_free_vram)]
            bisect.insort(self._free, node.effective_free_vram)
        self.passing[node.id] = node
        heapq.heappush(self._heap, (-node.effective_free_vram, node.in_flight, node.name, node.id))

    def _current(self, entry: tuple) -> NodeSnapshot | None:
        node = self.passing[entry[3]]
        return node if -entry[0] == node.effective_free_vram else None  # else a stale entry

    def best(
        self, model: pipeline.ModelRequirement, rows: Mapping[Any, int], wanted: int
    ) -> list[NodeSnapshot] | None:
        """The `wanted` best-ranked eligible nodes holding no row of the model (all ranked before any node
        that does), or None when they are fewer or too far down the heap."""
        popped: list[tuple] = []
        found: list[NodeSnapshot] = []
        seen: set[Any] = set()
        limit = wanted + len(rows) + 4 * wanted
        try:
            while self._heap and len(found) < wanted and len(popped) < limit:
                entry = heapq.heappop(self._heap)
                node = self._current(entry)
                if node is None or node.id in seen:
                    continue  # stale: dropped for good
                seen.add(node.id)
                popped.append(entry)
                if rows.get(node.id, 0) or not pipeline.vram_fits(model, node):
                    continue
                found.append(node)
        finally:
            for entry in popped:
                heapq.heappush(self._heap, entry)
        return found if len(found) == wanted else None

    def room_verdicts(self, model: pipeline.ModelRequirement, rows: Mapping[Any, int]) -> dict[str, int]:
        """How many passing nodes have no free slot for the model, and how many not VRAM enough."""
        no_slot = [
            self.passing[i]
            for i, n in rows.items()
            if i in self.passing and n >= self.passing[i].effective_cap
        ]
        short = 0
        if model.vram_bytes > 0:
            short = bisect.bisect_left(self._free, model.vram_bytes)
            short -= sum(1 for n in no_slot if n.vram_limited and n.effective_free_vram < model.vram_bytes)
        counts: dict[str, int] = {}
        if no_slot:
            counts[Verdict.NO_FREE_SLOT] = len(no_slot)
        if short:
            counts[Verdict.NOT_ENOUGH_VRAM] = short
        return counts


def _place_all(plans: Sequence[RulePlan], snapshot: ClusterSnapshot) -> tuple[list[str], list[str]]:
    """Choose every node first (on the snapshot, counting this tick's own choices), claim them all in one
    short transaction (`pipeline.replicas_claim`), then run the slow loads in parallel threads (at most
    `LOAD_CONCURRENCY`, no database access there) and record each load's outcome as it ends — so `min = 8`
    over 4 nodes converges in one load time, a failed load stops nothing else, and a tick placing hundreds of
    replicas costs about one statement per placement plus a fixed number.

    A model whose last load failed is left alone while its cooldown runs (`scheduling.loadfailures`: the
    same cluster-wide backoff as the router's), and once it is over gets one probe load, not `count`. The
    circuit breaker is not involved: it counts ticks without capacity, and a model that fails to load has
    capacity."""
    from scheduling.loadfailures import LoadBackingOff, load_attempts_begin, load_failures_clear

    names = [plan.model_name for plan in plans]
    configs = ModelConfig.objects.in_bulk(names, field_name="name")
    attempts = load_attempts_begin(model_names=names)
    placer = _Placer(snapshot)
    wanted: list[tuple[pipeline.ClaimRequest, Any, Any, Any, _Record, str]] = []
    failed: list[str] = []
    records: list[DecisionRecord] = []
    for rule_plan in plans:
        model_name, count = rule_plan.model_name, rule_plan.place
        trigger = Trigger.BURST if rule_plan.burst else Trigger.RECONCILE
        if rule_plan.autoscale:
            trigger = Trigger.AUTOSCALE
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
        model = snapshot.requirement(
            model_name, config.vram_bytes, pipeline.model_artifacts(config.files), config.backend
        )
        picks, candidates, refusal = placer.choose(model, count)
        if refusal is not None:  # slots exist, but not with VRAM enough for every replica wanted
            failed.append(f"{model_name}: {refusal if not picks else 'no room for more'}")
            records.append(
                DecisionRecord(
                    model_name=model_name,
                    trigger=trigger,
                    outcome=Outcome.NO_CAPACITY,
                    message=refusal,
                    candidates=placer.evaluate(model).records(),
                )
            )
        for node, record in zip(picks, candidates, strict=True):
            request = pipeline.ClaimRequest(
                node.id, model_name, config.vram_bytes, config.backend, model.selector, model.artifacts
            )
            wanted.append(
                (request, config, attempt, trigger, record, rule_plan.reason if rule_plan.autoscale else "")
            )
    claims = pipeline.replicas_claim([request for request, *_ in wanted])
    jobs: list[_Job] = []
    for (request, config, attempt, trigger, (chosen, omitted), reason), claim in zip(
        wanted, claims, strict=True
    ):
        if claim.replica is None:
            assert claim.refused is not None
            name = snapshot.nodes[request.node_id].name
            failed.append(f"{request.model_name} on {name}: {claim.refused.detail} (claimed meanwhile)")
            records.append(
                DecisionRecord(
                    model_name=request.model_name,
                    trigger=trigger,
                    outcome=Outcome.NO_CAPACITY,
                    message=f"the claim on {name} was refused: {claim.refused.detail}",
                    candidates=_chosen(chosen, name, claim.refused),
                    omitted=omitted,
                )
            )
            continue
        jobs.append(_Job(claim.replica, config, claim.node, attempt, trigger, chosen, omitted, reason=reason))
    decisions_record(records=records)
    if not jobs:
        return [], failed
    outcomes = _load_all(jobs)
    loaded = sorted({job.replica.model_name for job, (ok, _t, _r) in zip(jobs, outcomes, strict=True) if ok})
    if loaded:
        load_failures_clear(model_names=loaded, reason="loaded")
    decisions_record(records=[record for _ok, _text, record in outcomes])
    placed = [text for ok, text, _record in outcomes if ok]
    failed += [text for ok, text, _record in outcomes if not ok]
    return placed, failed


def _load_all(jobs: list[_Job]) -> list[tuple[bool, str, DecisionRecord]]:
    """The loads in parallel threads (network only); each outcome recorded here as it ends."""
    from scheduling.services import replica_load_call
    from worker_client.errors import WorkerError

    def call(job: _Job) -> Any:
        job.started = time.monotonic()
        try:
            return replica_load_call(replica=job.replica, config=job.config, node=job.node)
        except WorkerError as error:
            return error

    def answer_of(future: Future, job: _Job) -> Any:
        try:
            return future.result()
        except Exception as error:  # a fault in one load must not stop the others
            logger.exception("loading %s failed", job.replica.process_key)
            return error

    outcomes = []
    with ThreadPoolExecutor(max_workers=min(LOAD_CONCURRENCY, len(jobs))) as pool:
        futures = {pool.submit(call, job): job for job in jobs}
        pending = set(futures)
        while pending:
            # The loads that have ended by now, recorded together: the successes in one UPDATE.
            ended, pending = wait(pending, return_when=FIRST_COMPLETED)
            answers = [(futures[f], answer_of(f, futures[f])) for f in ended]
            outcomes += _loads_done(answers)
    return outcomes


def _loads_done(answers: list[tuple[_Job, Any]]) -> list[tuple[bool, str, DecisionRecord]]:
    """Records loads that ended together: the successful ones marked `loaded` in one statement."""
    from nodes.services import replicas_mark_loaded

    loaded = [
        (job.replica.id, answer.address) for job, answer in answers if not isinstance(answer, Exception)
    ]
    try:
        marked: set[Any] | None = replicas_mark_loaded(loaded=loaded)
    except Exception:  # the batch failed: each row on its own, as `replica_load_finish` alone does it
        logger.exception("marking %d loaded replicas failed; marking them one by one", len(loaded))
        marked = None
    return [
        _load_done(
            job,
            answer,
            marked=None if marked is None or isinstance(answer, Exception) else job.replica.id in marked,
        )
        for job, answer in answers
    ]


def _load_done(job: _Job, answer: Any, *, marked: bool | None = None) -> tuple[bool, str, DecisionRecord]:
    from scheduling.loadfailures import load_failure_note
    from scheduling.services import replica_load_finish
    from worker_client.errors import WorkerError

    replica = job.replica
    label = f"{replica.process_key} on {job.node.name}"

    def record(outcome: str, message: str) -> DecisionRecord:
        return DecisionRecord(
            model_name=replica.model_name,
            trigger=job.trigger,
            outcome=outcome,
            node_name=job.node.name,
            replica_index=replica.replica_index,
            duration=time.monotonic() - job.started,
            message=message,
            candidates=job.candidates,
            omitted=job.omitted,
        )

    try:
        if isinstance(answer, Exception) and not isinstance(answer, WorkerError):
            from nodes.services import replica_remove

            replica_remove(replica_id=replica.id)
            raise answer
        replica_load_finish(replica=replica, config=job.config, node=job.node, outcome=answer, marked=marked)
        why = f": {job.reason}" if job.reason else ""
        return True, label, record(Outcome.PLACED, f"placed {label}{why}")
    except LoadFailed as error:
        try:
            load_failure_note(attempt=job.attempt, error=error)
        except Exception:
            logger.exception("recording the failed load of %s failed", label)
        return False, f"{label}: {error}", record(Outcome.LOAD_FAILED, str(error))
    except Exception as error:  # a fault in one load must not stop the others
        logger.exception("loading %s failed", label)
        return False, f"{label}: {error}", record(Outcome.LOAD_FAILED, str(error))


def _chosen(
    verdicts: list[dict[str, str]], node_name: str, refused: pipeline.Judgement | None = None
) -> list[dict[str, str]]:
    """The model's verdicts with `node_name` first, as the node chosen (or refused by its claim)."""
    mine = next((v for v in verdicts if v["node"] == node_name), {"node": node_name, "detail": ""})
    if refused is None:
        first = {**mine, "verdict": Verdict.CHOSEN}
    else:
        first = {"node": node_name, "verdict": refused.verdict, "detail": refused.detail}
    rest = [
        {**v, "verdict": Verdict.RANKED_LOWER} if v["verdict"] == Verdict.CHOSEN else v
        for v in verdicts
        if v["node"] != node_name
    ]
    return [first, *rest]
