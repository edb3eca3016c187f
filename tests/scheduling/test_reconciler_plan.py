"""The reconciler's decisions as pure functions (no database): BEHAVIOUR §5."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nodes.choices import NodeStatus
from scheduling.pipeline import NodeSnapshot, ReplicaView, RuleView
from scheduling.reconciler import (
    Settings,
    cluster_capacity,
    plan_overcap_trims,
    plan_rule,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CONFIG = Settings(scale_down_delay=300, breaker_ticks=3, breaker_cooldown=300)
_ids = iter(range(1, 10_000))


def node(name="n", cap=1, schedulable=True, labels=None):
    return NodeSnapshot(
        id=name,
        name=name,
        status=NodeStatus.HEALTHY if schedulable else NodeStatus.UNHEALTHY,
        effective_cap=cap,
        total_vram=0,
        available_vram=0,
        reserved_vram=0,
        labels=labels or {},
    )


def replica(node_id="n", index=0, model="m", state="loaded", in_flight=0, idle_minutes=10.0):
    return ReplicaView(
        id=next(_ids),
        node_id=node_id,
        model_name=model,
        replica_index=index,
        state=state,
        in_flight=in_flight,
        idle_since=NOW - timedelta(minutes=idle_minutes),
    )


def rule(min_replicas=0, max_replicas=0, selector=None, until=None, ticks=0, model="m"):
    return RuleView(
        id=1,
        model_name=model,
        selector=selector or {},
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        unsatisfiable_until=until,
        unsatisfiable_ticks=ticks,
    )


def plan(r, replicas, nodes, **kw):
    return plan_rule(r, replicas, nodes, now=NOW, config=CONFIG, **kw)


def test_capacity_worked_example():
    nodes = [node("a", cap=4), node("b", cap=2), node("c", cap=1)]
    assert cluster_capacity("m", {}, nodes, {"a": 1, "b": 0, "c": 1}) == (5, True)
    assert cluster_capacity("m", {}, nodes[1:], {"a": 1, "b": 0, "c": 1}) == (2, True)


def test_below_min_places_the_difference_on_a_cap_4_node():
    result = plan(rule(min_replicas=2, max_replicas=4), [], [node(cap=4)])
    assert result.place == 2 and result.breaker is None


def test_below_min_capped_at_cluster_capacity():
    result = plan(rule(min_replicas=2), [], [node(cap=1)])
    assert result.place == 1


def test_loading_replicas_count_as_current():
    replicas = [replica(index=0), replica(index=1, state="loading")]
    result = plan(rule(min_replicas=2), replicas, [node(cap=4)])
    assert result.place == 0


def test_zero_capacity_bumps_ticks_then_trips_with_reason():
    nodes = [node(cap=1)]
    replicas = [replica()]
    first = plan(rule(min_replicas=2), replicas, nodes)
    assert first.breaker == (1, None, "no free slot") and not first.tripped
    third = plan(rule(min_replicas=2, ticks=2), replicas, nodes)
    ticks, until, reason = third.breaker
    assert third.tripped and ticks == 3 and until == NOW + timedelta(seconds=300) and reason == "no free slot"


def test_open_breaker_skips_the_rule_entirely_even_with_trims_due():
    replicas = [replica(index=i) for i in range(3)]
    result = plan(rule(min_replicas=1, until=NOW + timedelta(minutes=1), ticks=3), replicas, [node(cap=4)])
    assert result.skipped and result.place == 0 and result.trim == [] and result.breaker is None


def test_selector_matching_no_node_trips_with_its_own_reason():
    result = plan(rule(min_replicas=1, selector={"gpu": "h100"}, ticks=2), [], [node(labels={"gpu": "a100"})])
    assert result.tripped and result.breaker[2] == "no node matches the selector"


def test_expired_cooldown_with_capacity_places_and_resets():
    result = plan(rule(min_replicas=1, until=NOW - timedelta(seconds=1), ticks=5), [], [node(cap=4)])
    assert result.place == 1 and result.breaker == (0, None, "")


def test_expired_cooldown_without_capacity_trips_again_at_once():
    result = plan(rule(min_replicas=2, until=NOW - timedelta(seconds=1), ticks=3), [replica()], [node(cap=1)])
    assert result.tripped and result.breaker[0] == 4


def test_all_busy_below_max_adds_exactly_one():
    nodes = [node("a", cap=1), node("b", cap=1), node("c", cap=1)]
    replicas = [replica("a", in_flight=1), replica("b", in_flight=1)]
    assert plan(rule(min_replicas=1, max_replicas=4), replicas, nodes).place == 1


def test_all_busy_at_max_adds_nothing():
    replicas = [replica("a", in_flight=1), replica("b", in_flight=2)]
    nodes = [node("a", cap=2), node("b", cap=2)]
    assert plan(rule(min_replicas=1, max_replicas=2), replicas, nodes).place == 0


def test_one_idle_replica_means_no_scale_up():
    replicas = [replica("a", in_flight=1), replica("b", in_flight=0, idle_minutes=0)]
    assert plan(rule(min_replicas=1, max_replicas=4), replicas, [node("a"), node("b"), node("c")]).place == 0


def test_busy_without_capacity_is_burst_not_misconfiguration():
    result = plan(rule(min_replicas=1, max_replicas=4), [replica(in_flight=1)], [node(cap=1)])
    assert result.place == 0 and result.breaker is None and not result.tripped


def test_trims_idle_extras_down_to_min():
    replicas = [replica(index=i) for i in range(3)]
    result = plan(rule(min_replicas=1, max_replicas=4), replicas, [node(cap=4)])
    assert sorted(r.replica_index for r in result.trim) == [1, 2]


def test_never_trims_at_or_below_min():
    replicas = [replica(index=i) for i in range(2)]
    assert plan(rule(min_replicas=2, max_replicas=4), replicas, [node(cap=4)]).trim == []


def test_only_replicas_idle_past_the_delay_are_trimmed():
    replicas = [
        replica(index=0, in_flight=1),
        replica(index=1, idle_minutes=4),
        replica(index=2, idle_minutes=10),
    ]
    result = plan(rule(min_replicas=1), replicas, [node(cap=4)])
    assert [r.replica_index for r in result.trim] == [2]


def test_min_zero_trims_down_to_one_never_zero():
    replicas = [replica(index=i) for i in range(3)]
    result = plan(rule(min_replicas=0, max_replicas=4), replicas, [node(cap=4)])
    assert len(result.trim) == 2


def test_trim_order_highest_index_then_oldest_use():
    replicas = [
        replica("a", index=0),
        replica("a", index=1, idle_minutes=20),
        replica("b", index=1, idle_minutes=30),
        replica("a", index=2),
    ]
    result = plan(rule(min_replicas=1), replicas, [node("a", cap=4), node("b", cap=4)])
    assert [(r.node_id, r.replica_index) for r in result.trim] == [("a", 2), ("b", 1), ("a", 1)]


def test_selector_only_rule_is_not_reconciled():
    # load_snapshot only reads rules with min or max > 0; a bare plan of such a rule does nothing either.
    result = plan(rule(selector={"gpu": "x"}), [replica()], [node(labels={"gpu": "x"})])
    assert result.place == 0 and result.trim == [] and result.breaker is None


def test_overcap_trims_highest_indices_once_idle():
    nodes = {"a": node("a", cap=2)}
    replicas = [replica("a", index=i) for i in range(4)]
    trims = plan_overcap_trims(replicas, nodes, now=NOW, delay=300)
    assert sorted(r.replica_index for r in trims) == [2, 3]


def test_overcap_evicts_nothing_while_busy_or_recent():
    nodes = {"a": node("a", cap=2)}
    replicas = [
        replica("a", index=0),
        replica("a", index=1),
        replica("a", index=2, in_flight=1),
        replica("a", index=3, idle_minutes=1),
    ]
    assert plan_overcap_trims(replicas, nodes, now=NOW, delay=300) == []


def test_overcap_trims_count_before_the_rule_decides():
    nodes = [node("a", cap=2), node("b", cap=2)]
    replicas = [replica("a", index=i) for i in range(4)]
    trims = plan_overcap_trims(replicas, {n.id: n for n in nodes}, now=NOW, delay=300)
    result = plan(rule(min_replicas=4), replicas, nodes, already_trimmed=frozenset(r.id for r in trims))
    # The trimmed ones no longer count and node b has room: their replacements are placed in the same tick.
    assert result.trim == [] and result.place == 2
