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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connections
from django.utils import timezone

from localai_cluster import locks
from localai_cluster.metrics import BREAKER_TRIPS, TICK_DURATION
from nodes.choices import ReplicaState
from scheduling import pipeline
from scheduling.choices import Outcome, Trigger, Verdict
from scheduling.decisions import DecisionRecord, decisions_record
from scheduling.models import ModelConfig, SchedulingRule
from scheduling.pipeline import ClusterSnapshot, NodeSnapshot, ReplicaView, RuleView
from scheduling.placement import LoadFailed

logger = logging.getLogger(__name__)


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
    burst: bool = False  # a placement for burst load (every replica busy), not for the minimum
    reason: str = ""


def cluster_capacity(
    model_name: str,
    selector: Mapping[str, str],
    nodes: Iterable[NodeSnapshot],
    rows_per_node: Mapping[Any, int],
) -> tuple[int, bool]:
    """Free slots for the model over the nodes the pipeline's gate lets through (approved, healthy, not
    draining, matching the selector; a node's used slots are its rows of the model in any state, or the live
    rows given when more; each node clamped at 0), and whether any node
    passes the gate at all."""
    capacity, matched = 0, False
    for node in nodes:
        if pipeline.gate(node, selector) is None:
            matched = True
            used = max(node.replicas_of_model, rows_per_node.get(node.id, 0))
            capacity += max(node.effective_cap - used, 0)
    return capacity, matched


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
) -> RulePlan:
    """Decide one rule's tick (BEHAVIOUR §5 steps 0–4). `rows_per_node`: the model's rows in any state per
    node (the snapshot's count, as the claim sees them); without it, the live `replicas` are counted."""
    plan = RulePlan(rule.model_name)
    if rule.unsatisfiable_until and rule.unsatisfiable_until > now:
        plan.skipped = True
        plan.reason = "circuit breaker open"
        return plan
    live = [r for r in replicas if r.id not in already_trimmed]
    current = len(live)

    def capacity() -> tuple[int, bool]:  # only computed when a decision needs it: most ticks do not
        rows = rows_per_node
        if rows is None:
            rows = defaultdict(int)
            for replica in replicas:
                rows[replica.node_id] += 1
        return cluster_capacity(rule.model_name, rule.selector, nodes, rows)

    if current < rule.min_replicas:
        free, matched = capacity()
        if free == 0:
            ticks = rule.unsatisfiable_ticks + 1
            plan.reason = pipeline.REASON_NO_MATCHING_NODE if not matched else pipeline.REASON_NO_FREE_SLOT
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
        plan.burst = True
        return plan

    floor = max(rule.min_replicas, 1)
    if current > floor:
        idle = sorted((r for r in live if _idle_for(r, now, config.scale_down_delay)), key=_trim_order)
        plan.trim = idle[: current - floor]
    return plan


# --- the snapshot (queries) -----------------------------------------------------------------------------


def load_snapshot() -> ClusterSnapshot:
    """Everything a tick decides from, in a fixed number of queries whatever the cluster's size."""
    return pipeline.cluster_snapshot()


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
        report = _tick(now or timezone.now(), Settings.from_django())
    report.duration = time.monotonic() - started
    TICK_DURATION.labels("reconcile").observe(report.duration)
    return report


def _tick(now: datetime, config: Settings) -> TickReport:
    report = TickReport()
    snapshot = load_snapshot()
    live = snapshot.live_replicas
    by_model: dict[str, list[ReplicaView]] = defaultdict(list)
    for replica in live:
        by_model[replica.model_name].append(replica)
    rules = [rule for rule in snapshot.rules.values() if rule.min_replicas > 0 or rule.max_replicas > 0]

    overcap = plan_overcap_trims(live, snapshot.nodes, now=now, delay=config.scale_down_delay)
    trimmed_ids = frozenset(r.id for r in overcap)
    nodes = list(snapshot.nodes.values())
    plans = [
        plan_rule(
            rule,
            by_model.get(rule.model_name, []),
            nodes,
            now=now,
            config=config,
            already_trimmed=trimmed_ids,
            rows_per_node=snapshot.rows_of(rule.model_name),
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
    to_trim = [r for r in overcap if r.model_name not in skipped_models]
    to_trim += [r for plan in plans for r in plan.trim]
    report.trimmed = _trim(to_trim, snapshot.nodes)
    placements = [plan for plan in plans if plan.place]
    if placements:
        placed, failed = _place_all(placements, snapshot)
        report.placed, report.failed = placed, failed
    report.prefetched = _prefetch(snapshot)
    return report


def _prefetch(snapshot: ClusterSnapshot) -> list[str]:
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


def _trim(replicas: Iterable[ReplicaView], nodes: Mapping[Any, NodeSnapshot]) -> list[str]:
    """Unload each replica by its exact process key, skipping any that a request claimed meanwhile; each
    trim writes a `trimmed` decision record."""
    from scheduling.services import replica_evict

    trimmed, records = [], []
    for replica in replicas:
        if replica_evict(replica=replica):
            node = nodes.get(replica.node_id)
            node_name = node.name if node else str(replica.node_id)
            trimmed.append(f"{replica.process_key} on {node_name}")
            records.append(
                DecisionRecord(
                    model_name=replica.model_name,
                    trigger=Trigger.RECONCILE,
                    outcome=Outcome.TRIMMED,
                    node_name=node_name,
                    replica_index=replica.replica_index,
                    message=f"trimmed {replica.process_key} from {node_name}: idle above the rule's bounds",
                )
            )
    decisions_record(records=records)
    return trimmed


@dataclass
class _Job:
    replica: Any
    config: Any
    node_name: str
    attempt: Any
    trigger: str
    candidates: list[dict[str, str]]


def _place_all(plans: Sequence[RulePlan], snapshot: ClusterSnapshot) -> tuple[list[str], list[str]]:
    """Claim every slot first (short transactions, one node row lock each), then run the slow loads in
    parallel, so `min = 8` over 4 nodes converges in one load time, and one failed load stops nothing else.

    A model whose last load failed is left alone while its cooldown runs (`scheduling.loadfailures`: the
    same cluster-wide backoff as the router's), and once it is over gets one probe load, not `count`. The
    circuit breaker is not involved: it counts ticks without capacity, and a model that fails to load has
    capacity."""
    from scheduling.loadfailures import LoadBackingOff, load_attempts_begin

    names = [plan.model_name for plan in plans]
    configs = ModelConfig.objects.in_bulk(names, field_name="name")
    attempts = load_attempts_begin(model_names=names)
    claimed: list[_Job] = []
    failed: list[str] = []
    records: list[DecisionRecord] = []
    for rule_plan in plans:
        model_name, count = rule_plan.model_name, rule_plan.place
        trigger = Trigger.BURST if rule_plan.burst else Trigger.RECONCILE
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
        model = snapshot.requirement(model_name, config.vram_bytes, pipeline.model_artifacts(config.files))
        plan = pipeline.evaluate(model, snapshot.nodes_for(model_name))
        verdicts = plan.records()
        picks = pipeline.choose_nodes(model, count, plan.eligible)
        if len(picks) < count:  # slots exist, but not with VRAM enough for every replica wanted
            failed.append(f"{model_name}: {plan.refusal() if not picks else 'no room for more'}")
            records.append(
                DecisionRecord(
                    model_name=model_name,
                    trigger=trigger,
                    outcome=Outcome.NO_CAPACITY,
                    message=plan.refusal() if not picks else f"room for {len(picks)} of {count} replicas",
                    candidates=verdicts,
                )
            )
        for node in picks:
            claim = pipeline.replica_claim(
                node_id=node.id,
                model_name=model_name,
                vram_bytes=config.vram_bytes,
                backend=config.backend,
                selector=model.selector,
                artifacts=model.artifacts,
            )
            if claim.replica is None:
                assert claim.refused is not None
                failed.append(f"{model_name} on {node.name}: {claim.refused.detail} (claimed meanwhile)")
                records.append(
                    DecisionRecord(
                        model_name=model_name,
                        trigger=trigger,
                        outcome=Outcome.NO_CAPACITY,
                        message=f"the claim on {node.name} was refused: {claim.refused.detail}",
                        candidates=_chosen(verdicts, node.name, claim.refused),
                    )
                )
                continue
            claimed.append(
                _Job(claim.replica, config, node.name, attempt, trigger, _chosen(verdicts, node.name))
            )
    decisions_record(records=records)
    if not claimed:
        return [], failed
    with ThreadPoolExecutor(max_workers=min(LOAD_CONCURRENCY, len(claimed))) as pool:
        outcomes = list(pool.map(_load_one, claimed))
    decisions_record(records=[record for _ok, _text, record in outcomes])
    placed = [text for ok, text, _record in outcomes if ok]
    failed += [text for ok, text, _record in outcomes if not ok]
    return placed, failed


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


def _load_one(job: _Job) -> tuple[bool, str, DecisionRecord]:
    from scheduling.loadfailures import load_failure_clear, load_failure_note
    from scheduling.services import replica_load

    replica = job.replica
    label = f"{replica.process_key} on {job.node_name}"
    started = time.monotonic()

    def record(outcome: str, message: str) -> DecisionRecord:
        return DecisionRecord(
            model_name=replica.model_name,
            trigger=job.trigger,
            outcome=outcome,
            node_name=job.node_name,
            replica_index=replica.replica_index,
            duration=time.monotonic() - started,
            message=message,
            candidates=job.candidates,
        )

    try:
        replica_load(replica=replica, config=job.config)
        load_failure_clear(model_name=replica.model_name, reason="loaded")
        return True, label, record(Outcome.PLACED, f"placed {label}")
    except LoadFailed as error:
        try:
            load_failure_note(attempt=job.attempt, error=error)
        except Exception:
            logger.exception("recording the failed load of %s failed", label)
        return False, f"{label}: {error}", record(Outcome.LOAD_FAILED, str(error))
    except Exception as error:  # a fault in one load must not stop the others
        logger.exception("loading %s failed", label)
        return False, f"{label}: {error}", record(Outcome.LOAD_FAILED, str(error))
    finally:
        connections.close_all()
