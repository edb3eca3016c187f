"""The tick's first query (`reconciler.triage`): every branch of a rule's plan that can act names the rule, a
steady cluster names none, and a tick that finds nothing reads no snapshot (docs/scaling.md "The reconciler")."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from nodes.choices import NodeType, ReplicaState
from scheduling import reconciler
from scheduling.reconciler import Settings, Triage, reconcile_tick, triage
from tests.factories import NodeFactory, ReplicaFactory, RuleFactory

pytestmark = pytest.mark.django_db

CONFIG = Settings(scale_down_delay=300, breaker_ticks=3, breaker_cooldown=600)


def ago(seconds):
    return timezone.now() - timedelta(seconds=seconds)


def replicas(model, count, *, node=None, **fields):
    node = node or NodeFactory(worker_max_replicas_per_model=8)
    fields.setdefault("last_used", timezone.now())
    return [ReplicaFactory(node=node, model_name=model, replica_index=i, **fields) for i in range(count)]


def steady_cluster():
    """One rule of each kind, each with nothing to do."""
    replicas("at-min", 2)
    RuleFactory(model_name="at-min", min_replicas=2)
    replicas("between", 2)
    RuleFactory(model_name="between", min_replicas=1, max_replicas=4)  # above the floor, but used just now
    replicas("busy-at-max", 2, in_flight=1)
    RuleFactory(model_name="busy-at-max", min_replicas=1, max_replicas=2)
    replicas("to-zero", 1, last_used=ago(30))
    RuleFactory(model_name="to-zero", scale_to_zero_after=60)
    replicas("paused", 0)
    RuleFactory(model_name="paused", min_replicas=1, unsatisfiable_ticks=3, unsatisfiable_until=ago(-600))
    RuleFactory(model_name="selector-only", node_selector={"gpu": "x"})
    replicas("no-rule", 3, last_used=ago(3600))
    replicas("unloading-busy", 1, state=ReplicaState.UNLOADING, in_flight=1)


def test_a_steady_cluster_needs_nothing():
    steady_cluster()
    assert triage(timezone.now(), CONFIG) == Triage()


def test_a_tick_with_nothing_to_do_reads_no_snapshot(monkeypatch, django_assert_max_num_queries):
    steady_cluster()

    def refuse():
        raise AssertionError("a tick with nothing to do read the full snapshot")

    monkeypatch.setattr(reconciler, "load_snapshot", refuse)
    # The lock, the triage, the prefetch rules, the unlock.
    with django_assert_max_num_queries(4):
        report = reconcile_tick()
    assert not report.placed and not report.trimmed and not report.failed


@pytest.mark.parametrize(
    "case",
    [
        "below-min",
        "breaker-to-reset",
        "expired-breaker-still-short",
        "autoscaled",
        "all-busy",
        "idle-above-floor",
        "idle-above-floor-never-used",
        "due-to-scale-to-zero",
    ],
)
def test_every_rule_that_could_act_is_named(case):
    steady_cluster()
    if case == "below-min":
        replicas(case, 1)
        RuleFactory(model_name=case, min_replicas=2)
    elif case == "breaker-to-reset":
        replicas(case, 1)
        RuleFactory(model_name=case, min_replicas=1, unsatisfiable_ticks=1)
    elif case == "expired-breaker-still-short":
        RuleFactory(model_name=case, min_replicas=1, unsatisfiable_ticks=3, unsatisfiable_until=ago(1))
    elif case == "autoscaled":
        replicas(case, 1)
        RuleFactory(model_name=case, target_in_flight=2)
    elif case == "all-busy":
        replicas(case, 2, in_flight=1)
        RuleFactory(model_name=case, min_replicas=1, max_replicas=3)
    elif case == "idle-above-floor":
        replicas(case, 2, last_used=ago(301))
        RuleFactory(model_name=case, min_replicas=1, max_replicas=4)
    elif case == "idle-above-floor-never-used":
        replicas(case, 2, last_used=None, loaded_at=None)
        RuleFactory(model_name=case, max_replicas=4)
    elif case == "due-to-scale-to-zero":
        replicas(case, 1, last_used=ago(61))
        RuleFactory(model_name=case, scale_to_zero_after=60)
    assert triage(timezone.now(), CONFIG).rules == (case,)


def test_the_scale_down_delay_and_the_time_are_the_ticks_own():
    steady_cluster()
    replicas("idle", 2, last_used=ago(200))
    RuleFactory(model_name="idle", min_replicas=1)
    assert triage(timezone.now(), CONFIG).rules == ()
    later = triage(timezone.now() + timedelta(seconds=101), CONFIG).rules
    assert later == ("idle", "to-zero")  # to-zero's last use is now 131 s old
    assert triage(timezone.now(), Settings(100, 3, 600)).rules == ("idle",)


def test_a_node_over_its_cap_and_an_idle_retired_replica_are_work():
    steady_cluster()
    node = NodeFactory(worker_max_replicas_per_model=4, max_replicas_override=2)
    replicas("crowded", 3, node=node)
    assert triage(timezone.now(), CONFIG) == Triage(overcap=True)
    node.max_replicas_override = None  # the agent's cap of 4 holds
    node.save()
    assert triage(timezone.now(), CONFIG) == Triage()
    agent_node = NodeFactory(node_type=NodeType.AGENT, worker_max_replicas_per_model=1)
    replicas("on-an-agent-node", 2, node=agent_node)
    assert triage(timezone.now(), CONFIG) == Triage()
    replicas("retired", 1, state=ReplicaState.UNLOADING)
    assert triage(timezone.now(), CONFIG) == Triage(retired=True)


def test_the_snapshot_reads_timestamps_exactly():
    from datetime import UTC, datetime

    from scheduling.pipeline import cluster_snapshot

    times = [
        datetime(2026, 3, 29, 1, 59, 59, 999999, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
        timezone.now(),
    ]
    node = NodeFactory(worker_max_replicas_per_model=8, approved_at=None)
    for index, at in enumerate(times):
        ReplicaFactory(node=node, replica_index=index, last_used=at)
    ReplicaFactory(node=node, replica_index=3, last_used=None, loaded_at=times[0])
    ReplicaFactory(node=node, replica_index=4, last_used=None, loaded_at=None)
    snapshot = cluster_snapshot()
    by_index = {r.replica_index: r.idle_since for r in snapshot.replicas}
    assert by_index == {0: times[0], 1: times[1], 2: times[2], 3: times[0], 4: None}
    assert snapshot.nodes[node.pk].approved is False
    approved = NodeFactory()
    assert cluster_snapshot().nodes[approved.pk].approved is True
