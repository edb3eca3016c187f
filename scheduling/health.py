"""The health monitor: one tick marks stale nodes, brings back nodes that heartbeat again, and probes replicas
that have not been heard from. One tick at a time cluster-wide (advisory lock).

Node states used here:
- `unhealthy`: a healthy node whose heartbeat is older than half the stale threshold. The router and placement
  only use `healthy` nodes, so requests stop going to a node that has missed several heartbeats before it is
  declared dead. Its replica rows are kept: a late heartbeat makes it `healthy` again with nothing to reload.
- in-flight units held by a web process that died are given back (nodes.inflight).
- `offline`: heartbeat older than `LOCALAI_STALE_NODE_THRESHOLD`, whatever the status (draining too); its
  replica rows are removed so the reconciler places them elsewhere.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Case, DateTimeField, F, Q, When
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from console.samples import metric_sample_take
from localai_cluster import locks
from localai_cluster.metrics import TICK_DURATION
from nodes.choices import NodeStatus, NodeType, ReplicaState
from nodes.inflight import inflight_reclaim_dead_owners
from nodes.models import ModelReplica, Node
from nodes.services import LOADED_GRACE_HEARTBEATS, replicas_delete, replicas_locked
from scheduling.decisions import decisions_prune

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0
PROBE_CONCURRENCY = 16


@dataclass
class HealthReport:
    """What one tick did."""

    skipped: bool = False
    offline: list[str] = field(default_factory=list)
    unhealthy: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    probed: int = 0
    removed: list[str] = field(default_factory=list)  # "<node>/<process key>"
    reclaimed: dict[str, int] = field(default_factory=dict)  # web process owner → in-flight units given back
    decisions_pruned: int = 0  # placement decision records past their retention or the row cap
    duration: float = 0.0

    def lines(self) -> list[str]:
        if self.skipped:
            return ["skipped: another health tick holds the lock"]
        return [
            f"offline: {', '.join(self.offline) or '-'}",
            f"unhealthy: {', '.join(self.unhealthy) or '-'}",
            f"recovered: {', '.join(self.recovered) or '-'}",
            f"probed: {self.probed} replica(s)",
            f"removed: {', '.join(self.removed) or '-'}",
            f"in-flight reclaimed from dead web processes: {sum(self.reclaimed.values())}",
            f"decision records pruned: {self.decisions_pruned}",
        ]


def health_tick(*, now: datetime | None = None) -> HealthReport:
    """Run one health-monitor tick unless another process is running one."""
    started = time.monotonic()
    with locks.singleton(locks.NAMESPACE_LOOPS, locks.HEALTH_MONITOR) as acquired:
        if not acquired:
            logger.info("health tick skipped: another process holds the lock")
            return HealthReport(skipped=True)
        now = now or timezone.now()
        report = HealthReport()
        report.offline = mark_stale_nodes_offline(now=now)
        report.unhealthy = mark_late_nodes_unhealthy(now=now)
        report.recovered = recover_fresh_nodes(now=now)
        report.probed, report.removed = probe_unheard_replicas(now=now)
        report.reclaimed = inflight_reclaim_dead_owners()
        report.decisions_pruned = decisions_prune(now=now)
        metric_sample_take(now=now)  # the overview's charts (console.samples)
    report.duration = time.monotonic() - started
    TICK_DURATION.labels("health").observe(report.duration)
    return report


def _heartbeat_age_over(seconds: float, now: datetime) -> Q:
    cutoff = now - timedelta(seconds=seconds)
    return Q(last_heartbeat__lt=cutoff) | Q(last_heartbeat__isnull=True, created_at__lt=cutoff)


def mark_stale_nodes_offline(*, now: datetime) -> list[str]:
    """Nodes silent for longer than the stale threshold go `offline` and lose their replica rows."""
    stale = _heartbeat_age_over(settings.LOCALAI_STALE_NODE_THRESHOLD, now)
    with transaction.atomic():
        nodes = list(
            Node.objects.select_for_update(skip_locked=True)
            .filter(stale)
            .exclude(status=NodeStatus.OFFLINE)
            .values_list("id", "name")
        )
        if not nodes:
            return []
        ids = [node_id for node_id, _ in nodes]
        Node.objects.filter(id__in=ids).update(status=NodeStatus.OFFLINE, reserved_vram=0, updated_at=now)
        replicas_delete(ModelReplica.objects.filter(node_id__in=ids))
    names = sorted(name for _, name in nodes)
    logger.warning(
        "node(s) offline after %.0fs without heartbeat: %r",
        settings.LOCALAI_STALE_NODE_THRESHOLD,
        names,
    )
    return names


def mark_late_nodes_unhealthy(*, now: datetime) -> list[str]:
    """Healthy nodes that missed heartbeats for half the stale threshold stop receiving work."""
    late = _heartbeat_age_over(settings.LOCALAI_STALE_NODE_THRESHOLD / 2, now)
    candidates = Node.objects.filter(late, status=NodeStatus.HEALTHY)
    names = sorted(candidates.values_list("name", flat=True))
    if names:
        # The same condition in the UPDATE: a heartbeat that arrived meanwhile wins.
        Node.objects.filter(late, status=NodeStatus.HEALTHY, name__in=names).update(
            status=NodeStatus.UNHEALTHY, updated_at=now
        )
        logger.warning("node(s) unhealthy (heartbeats late): %r", names)
    return names


def recover_fresh_nodes(*, now: datetime) -> list[str]:
    """A node that heartbeats again after being `unhealthy` or `offline` comes back: `draining` when an admin
    drained it, else `healthy` when it was ever approved, `pending` when it never was (a heartbeat never
    approves)."""
    fresh = ~_heartbeat_age_over(settings.LOCALAI_STALE_NODE_THRESHOLD / 2, now) & Q(
        last_heartbeat__isnull=False
    )
    lapsed = Node.objects.filter(fresh, status__in=[NodeStatus.UNHEALTHY, NodeStatus.OFFLINE])
    names = sorted(lapsed.values_list("name", flat=True))
    if names:
        # An admin's drain survives the node's absence.
        lapsed.filter(approved_at__isnull=False, drained_by_admin=True).update(
            status=NodeStatus.DRAINING, updated_at=now
        )
        lapsed.filter(approved_at__isnull=False).update(status=NodeStatus.HEALTHY, updated_at=now)
        lapsed.filter(approved_at__isnull=True).update(status=NodeStatus.PENDING, updated_at=now)
        logger.info("node(s) heartbeating again: %r", names)
    return names


def _heard_at() -> Greatest:
    """When the control plane last heard of a replica: its own `last_seen_at` (or load times), or its node's
    last heartbeat when that heartbeat vouched for it. A recorded heartbeat lists every loaded replica whose
    load ended `LOADED_GRACE_HEARTBEATS` intervals before it (the full reconciliation removes one it does not
    list; the unchanged heartbeat answers only when it lists them all), but the unchanged heartbeat leaves
    `last_seen_at` alone: one UPDATE of the node row, none of its replicas (`nodes.services`)."""
    grace = timedelta(seconds=LOADED_GRACE_HEARTBEATS * settings.LOCALAI_HEARTBEAT_INTERVAL)
    vouched = Case(
        When(loaded_at__lte=F("node__last_heartbeat") - grace, then=F("node__last_heartbeat")),
        default=None,
        output_field=DateTimeField(),
    )
    return Greatest(Coalesce("last_seen_at", "loaded_at", "load_started_at"), vouched)


def probe_unheard_replicas(*, now: datetime) -> tuple[int, list[str]]:
    """Probe (gRPC health, 5 s) loaded replicas on healthy nodes not heard from for `LOCALAI_PROBE_STALE_AFTER`.
    A replica that answers is marked heard-from; one that does not is removed alone and its exact process key
    stopped on its agent. Siblings on the same node are untouched."""
    cutoff = now - timedelta(seconds=settings.LOCALAI_PROBE_STALE_AFTER)
    replicas = list(
        ModelReplica.objects.select_related("node")
        .annotate(heard_at=_heard_at())
        .filter(
            state=ReplicaState.LOADED,
            node__status=NodeStatus.HEALTHY,
            node__node_type=NodeType.BACKEND,
            heard_at__lt=cutoff,
        )
    )
    if not replicas:
        return 0, []
    with ThreadPoolExecutor(max_workers=min(PROBE_CONCURRENCY, len(replicas))) as pool:
        answers = list(pool.map(_probe, replicas))
    alive = [replica.pk for replica, ok in zip(replicas, answers, strict=True) if ok]
    if alive:
        with transaction.atomic():
            replicas_locked(ModelReplica.objects.filter(pk__in=alive))
            ModelReplica.objects.filter(pk__in=alive).update(last_seen_at=timezone.now())
    removed = []
    for replica, ok in zip(replicas, answers, strict=True):
        if not ok:
            removed.append(_remove_dead_replica(replica))
    return len(replicas), removed


def replica_probe(*, replica_id: int) -> bool:
    """Probes one loaded replica now, as the tick would (a request to it broke: `scheduling.router`): one that
    answers is marked heard-from, one that does not is removed alone and its exact process key stopped on its
    agent. Answers whether it answered (True when there is no such loaded replica: nothing to do)."""
    replica = (
        ModelReplica.objects.select_related("node").filter(pk=replica_id, state=ReplicaState.LOADED).first()
    )
    if replica is None:
        return True
    if _probe(replica):
        ModelReplica.objects.filter(pk=replica.pk).update(last_seen_at=timezone.now())
        return True
    _remove_dead_replica(replica)
    return False


def _probe(replica: ModelReplica) -> bool:
    from nodes.tokens import backend_token_for
    from worker_client.client import backend_health

    try:
        return backend_health(replica.address, backend_token_for(replica.node), timeout=PROBE_TIMEOUT)
    except Exception:
        logger.exception("probe of %r on %r failed", replica.process_key, replica.node.name)
        return False
    finally:
        connections.close_all()


def _remove_dead_replica(replica: ModelReplica) -> str:
    from nodes.services import replica_remove
    from scheduling.services import replica_stop_on_node

    label = f"{replica.node.name}/{replica.process_key}"
    logger.warning("replica %r failed its health probe: removing it", label)
    replica_remove(replica_id=replica.pk)
    replica_stop_on_node(node_id=replica.node_id, process_key=replica.process_key)
    return label
