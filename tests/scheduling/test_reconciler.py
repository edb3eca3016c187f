"""The reconciler on real PostgreSQL with a real in-process gRPC agent: BEHAVIOUR §5, SCENARIOS 110–136."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from localai_cluster import locks
from nodes import services as registry
from nodes.choices import ReplicaState
from nodes.models import ModelReplica
from scheduling.models import SchedulingRule
from scheduling.reconciler import reconcile_tick
from tests.conftest import another_session_holding
from tests.factories import ModelConfigFactory, NodeFactory, NodeLabelFactory, ReplicaFactory, RuleFactory
from tests.scheduling.fake_agent import FakeAgent, FakeAgentServer

pytestmark = pytest.mark.django_db(transaction=True)


def nodes(agent, count, cap=1, **extra):
    return [
        NodeFactory(address=agent.address, worker_max_replicas_per_model=cap, **extra) for _ in range(count)
    ]


def live(model="m"):
    return ModelReplica.objects.filter(
        model_name=model, state__in=[ReplicaState.LOADING, ReplicaState.LOADED]
    )


def idle_minutes(minutes):
    return timezone.now() - timedelta(minutes=minutes)


def test_places_up_to_min_on_a_cap_4_node(agent):  # 110
    ModelConfigFactory(name="m")
    nodes(agent, 1, cap=4)
    RuleFactory(model_name="m", min_replicas=2, max_replicas=4)
    report = reconcile_tick()
    assert sorted(live().values_list("replica_index", flat=True)) == [0, 1]
    assert live().filter(state=ReplicaState.LOADED).count() == 2
    assert len(report.placed) == 2


def test_loads_run_in_parallel_across_nodes(agent):  # 111
    # Every load waits until all 8 are in progress at once: loads run one after another would never get there.
    all_in_progress = threading.Barrier(8, timeout=60)
    broken = []

    def wait_for_the_others(request):
        try:
            all_in_progress.wait()
        except threading.BrokenBarrierError:
            broken.append(request.replica_index)

    agent.on_load = wait_for_the_others
    ModelConfigFactory(name="m")
    nodes(agent, 4, cap=2)
    RuleFactory(model_name="m", min_replicas=8)
    reconcile_tick()
    assert not broken, "the 8 loads were not all in progress at once: not in parallel"
    assert live().filter(state=ReplicaState.LOADED).count() == 8
    # Spread before stacking: two on each node.
    per_node = Counter(live().values_list("node_id", flat=True))
    assert sorted(per_node.values()) == [2, 2, 2, 2]


def test_loads_ending_together_are_marked_together_and_a_row_removed_meanwhile_is_stopped(agent):
    # All 8 loads end at once (a barrier), so their rows are marked `loaded` by one statement; the row of m#3
    # is removed while it loads (as a heartbeat reconciliation may), so its process is stopped, not kept.
    all_in_progress = threading.Barrier(8, timeout=60)

    def remove_one_then_wait(request):
        if request.replica_index == 3:
            ModelReplica.objects.filter(model_name="m", replica_index=3).delete()
        all_in_progress.wait()

    agent.on_load = remove_one_then_wait
    ModelConfigFactory(name="m")
    nodes(agent, 1, cap=8)
    RuleFactory(model_name="m", min_replicas=8)
    report = reconcile_tick()
    assert sorted(live().filter(state=ReplicaState.LOADED).values_list("replica_index", flat=True)) == [
        0,
        1,
        2,
        4,
        5,
        6,
        7,
    ]
    assert len(report.placed) == 7
    assert len(report.failed) == 1 and "removed while it loaded" in report.failed[0]
    assert agent.stops == ["m#3"]


def test_one_failed_load_does_not_stop_the_others(agent):  # 112
    ModelConfigFactory(name="m")
    failing = FakeAgent(fail="backend exploded")
    with FakeAgentServer(failing) as server:
        NodeFactory(address=server.address)
        nodes(agent, 2)
        RuleFactory(model_name="m", min_replicas=3)
        report = reconcile_tick()
    assert live().filter(state=ReplicaState.LOADED).count() == 2
    assert len(report.failed) == 1 and "backend exploded" in report.failed[0]
    assert failing.stops == ["m#0"]


def test_exactly_one_more_when_all_busy(agent):  # 113
    ModelConfigFactory(name="m")
    a, b, _c = nodes(agent, 3)
    ReplicaFactory(node=a, in_flight=1)
    ReplicaFactory(node=b, in_flight=1)
    RuleFactory(model_name="m", min_replicas=1, max_replicas=4)
    reconcile_tick()
    assert live().count() == 3


def test_busy_at_capacity_does_not_trip_the_breaker(agent):  # 116
    ModelConfigFactory(name="m")
    (node,) = nodes(agent, 1)
    ReplicaFactory(node=node, in_flight=1)
    rule = RuleFactory(model_name="m", min_replicas=1, max_replicas=4)
    reconcile_tick()
    rule.refresh_from_db()
    assert live().count() == 1 and rule.unsatisfiable_ticks == 0 and rule.unsatisfiable_until is None


def test_trim_unloads_exactly_the_highest_index(agent):  # 117, 121, 122
    ModelConfigFactory(name="m")
    (node,) = nodes(agent, 1, cap=4)
    for index in range(3):
        ReplicaFactory(node=node, replica_index=index, last_used=idle_minutes(10))
    RuleFactory(model_name="m", min_replicas=1, max_replicas=4)
    report = reconcile_tick()
    assert list(live().values_list("replica_index", flat=True)) == [0]
    assert agent.stops == ["m#2", "m#1"]
    assert len(report.trimmed) == 2


def test_a_replica_claimed_between_snapshot_and_trim_is_kept(agent, monkeypatch):
    from scheduling import reconciler

    ModelConfigFactory(name="m")
    (node,) = nodes(agent, 1, cap=4)
    ReplicaFactory(node=node, replica_index=0, last_used=idle_minutes(10))
    busy = ReplicaFactory(node=node, replica_index=1, last_used=idle_minutes(10))
    RuleFactory(model_name="m", min_replicas=1)
    read = reconciler.load_snapshot

    def snapshot_then_request_arrives():
        snapshot = read()
        ModelReplica.objects.filter(pk=busy.pk).update(in_flight=1)  # a request claims it
        return snapshot

    monkeypatch.setattr(reconciler, "load_snapshot", snapshot_then_request_arrives)
    report = reconcile_tick()
    assert ModelReplica.objects.filter(pk=busy.pk, in_flight=1, state=ReplicaState.LOADED).exists()
    assert agent.stops == [] and report.trimmed == []


def test_loading_replica_is_not_duplicated_by_the_next_tick(agent):  # 126
    ModelConfigFactory(name="m")
    (node,) = nodes(agent, 1, cap=4)
    ReplicaFactory(node=node, replica_index=0)
    ReplicaFactory(node=node, replica_index=1, state=ReplicaState.LOADING, load_started_at=timezone.now())
    RuleFactory(model_name="m", min_replicas=2)
    reconcile_tick()
    assert live().count() == 2 and agent.loads == []


def test_breaker_flap_then_cooldown_then_trip_again(agent, caplog):  # 127, 182
    ModelConfigFactory(name="m")
    (node,) = nodes(agent, 1)
    ReplicaFactory(node=node)
    rule = RuleFactory(model_name="m", min_replicas=2)
    ticks = []
    with caplog.at_level(logging.WARNING, logger="scheduling.reconciler"):
        for _ in range(3):
            reconcile_tick()
            rule.refresh_from_db()
            ticks.append(rule.unsatisfiable_ticks)
    assert ticks == [1, 2, 3]
    until = rule.unsatisfiable_until
    assert abs((until - timezone.now()) - timedelta(minutes=5)) < timedelta(seconds=10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "m" in warnings[0] and "no free slot" in warnings[0]
    for _ in range(2):  # during the cooldown: nothing
        assert reconcile_tick().tripped == []
    rule.refresh_from_db()
    assert rule.unsatisfiable_ticks == 3 and live().count() == 1 and agent.loads == []
    SchedulingRule.objects.filter(pk=rule.pk).update(
        unsatisfiable_until=timezone.now() - timedelta(seconds=1)
    )
    assert reconcile_tick().tripped == ["m: no free slot"]


def test_selector_matching_no_node_trips_with_its_reason(agent):  # 128
    ModelConfigFactory(name="m")
    nodes(agent, 1)
    RuleFactory(model_name="m", min_replicas=1, node_selector={"gpu.vendor": "nvidia"})
    for _ in range(3):
        report = reconcile_tick()
    assert report.tripped == ["m: no node matches the selector"]


def test_selector_places_on_the_matching_node(agent):  # 123
    ModelConfigFactory(name="m")
    gpu, cpu = nodes(agent, 2)
    NodeLabelFactory(node=gpu, key="gpu.vendor", value="nvidia")
    NodeLabelFactory(node=cpu, key="gpu.vendor", value="none")
    RuleFactory(model_name="m", min_replicas=1, max_replicas=2, node_selector={"gpu.vendor": "nvidia"})
    reconcile_tick()
    assert list(live().values_list("node_id", flat=True)) == [gpu.id]


def test_expired_breaker_with_capacity_places_and_resets(agent):  # 130
    ModelConfigFactory(name="m")
    nodes(agent, 1, cap=4)
    rule = RuleFactory(
        model_name="m", min_replicas=1, unsatisfiable_ticks=5, unsatisfiable_until=idle_minutes(1)
    )
    reconcile_tick()
    rule.refresh_from_db()
    assert live().count() == 1 and rule.unsatisfiable_ticks == 0 and rule.unsatisfiable_until is None


def test_registration_clears_the_breaker_before_any_tick(agent):  # 131
    rule = RuleFactory(
        model_name="m",
        min_replicas=2,
        unsatisfiable_ticks=3,
        unsatisfiable_until=timezone.now() + timedelta(minutes=5),
    )
    registry.node_register(name="newcomer", address="127.0.0.1:1")
    rule.refresh_from_db()
    assert rule.unsatisfiable_ticks == 0 and rule.unsatisfiable_until is None


def test_never_requested_catalog_model_is_loaded_with_its_entry(agent):  # 133
    ModelConfigFactory(name="fresh", backend="echo", options={"Options": ["delay_ms:5"]})
    nodes(agent, 1)
    RuleFactory(model_name="fresh", min_replicas=1)
    reconcile_tick()
    assert live("fresh").filter(state=ReplicaState.LOADED).count() == 1
    (request,) = agent.loads
    assert request.backend == "echo" and list(request.model_options.Options) == ["delay_ms:5"]


def test_rule_for_a_model_missing_from_the_catalog_is_reported_not_crashed(agent):
    nodes(agent, 1)
    RuleFactory(model_name="ghost", min_replicas=1)
    report = reconcile_tick()
    assert report.failed == ["ghost: not in the catalog"] and agent.loads == []


def test_selector_only_rule_places_and_trims_nothing(agent):  # 134
    ModelConfigFactory(name="m")
    (node,) = nodes(agent, 1, cap=4)
    for index in range(3):
        ReplicaFactory(node=node, replica_index=index, last_used=idle_minutes(10))
    RuleFactory(model_name="m", node_selector={"k": "v"})
    reconcile_tick()
    assert live().count() == 3 and agent.loads == [] and agent.stops == []


def test_lowered_cap_evicts_nothing_at_once_then_trims_when_idle_and_replaces_elsewhere(agent):  # 28, 183
    ModelConfigFactory(name="m")
    crowded, roomy = nodes(agent, 2, cap=4)
    replicas = [ReplicaFactory(node=crowded, replica_index=i, last_used=timezone.now()) for i in range(4)]
    RuleFactory(model_name="m", min_replicas=4)
    registry.node_override_set(node=crowded, value=2)
    reconcile_tick()
    assert live().count() == 4 and agent.stops == []
    ModelReplica.objects.filter(pk__in=[r.pk for r in replicas[2:]]).update(last_used=idle_minutes(6))
    reconcile_tick()
    assert sorted(agent.stops) == ["m#2", "m#3"]
    assert sorted(live().filter(node=crowded).values_list("replica_index", flat=True)) == [0, 1]
    assert live().filter(node=roomy).count() == 2


def test_tick_skips_while_another_process_holds_the_lock(agent):  # 135
    ModelConfigFactory(name="m")
    nodes(agent, 1)
    RuleFactory(model_name="m", min_replicas=1)
    with another_session_holding(locks.NAMESPACE_LOOPS, locks.RECONCILER):
        report = reconcile_tick()  # a tick that waited for the lock would wait here for good
    assert report.skipped and live().count() == 0


def test_reconcile_once_command_prints_what_it_did(agent, capsys):  # 135
    ModelConfigFactory(name="m")
    (node,) = nodes(agent, 1)
    RuleFactory(model_name="m", min_replicas=1)
    call_command("reconcile", "--once")
    out = capsys.readouterr().out
    assert f"placed: m#0 on {node.name}" in out


def _steady_cluster(node_count, rule_count):
    models = [f"model-{i}" for i in range(rule_count)]
    for name in models:
        ModelConfigFactory(name=name)
    cluster = [NodeFactory(worker_max_replicas_per_model=2) for _ in range(node_count)]
    for i, node in enumerate(cluster):
        NodeLabelFactory(node=node, key="zone", value="a")
        ReplicaFactory(node=node, model_name=models[i % rule_count], last_used=timezone.now())
    for name in models:
        RuleFactory(model_name=name, min_replicas=1, max_replicas=4)


def _tick_queries(django_assert_max_num_queries, count):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        report = reconcile_tick()
    assert report.placed == [] and report.trimmed == []
    return len(captured.captured_queries)


def test_steady_tick_query_count_does_not_grow_with_the_cluster(django_assert_max_num_queries):  # 136
    _steady_cluster(10, 3)
    small = _tick_queries(django_assert_max_num_queries, 10)
    SchedulingRule.objects.all().delete()
    ModelReplica.objects.all().delete()
    _steady_cluster(100, 30)
    large = _tick_queries(django_assert_max_num_queries, 100)
    assert small == large <= 8
