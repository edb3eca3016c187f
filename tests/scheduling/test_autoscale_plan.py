"""Load-based autoscaling as pure functions with a controllable clock (README "Autoscaling"): the desired
count, the upscale and downscale delays, no flapping, busy replicas kept, scale to zero."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from nodes.choices import NodeStatus
from scheduling.autoscale import Load, autoscale_decide, desired_replicas
from scheduling.pipeline import NodeSnapshot, ReplicaView, RuleView
from scheduling.reconciler import Settings, plan_rule

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
CONFIG = Settings(scale_down_delay=300, breaker_ticks=3, breaker_cooldown=300, autoscale_window=30)
_ids = iter(range(1, 100_000))


def rule(**fields) -> RuleView:
    base = {"id": 1, "model_name": "m", "selector": {}, "min_replicas": 1, "max_replicas": 0}
    base.update(target_in_flight=4, upscale_delay=30, downscale_delay=60)
    base.update(fields)
    return RuleView(**base)


def replica(index=0, in_flight=0, state="loaded", idle_since=None) -> ReplicaView:
    return ReplicaView(
        id=next(_ids),
        node_id="n",
        model_name="m",
        replica_index=index,
        state=state,
        in_flight=in_flight,
        idle_since=idle_since or T0 - timedelta(hours=1),
    )


NODES = [NodeSnapshot(id="n", name="n", effective_cap=8, status=NodeStatus.HEALTHY)]


@pytest.mark.parametrize(
    ("average", "target", "minimum", "maximum", "expected"),
    [
        (0.0, 4, 0, 0, 0),
        (0.0, 4, 1, 0, 1),
        (0.1, 4, 0, 0, 1),
        (4.0, 4, 1, 0, 1),  # exactly the target: one replica
        (4.01, 4, 1, 0, 2),
        (9.2, 4, 1, 0, 3),
        (24.0, 4, 1, 0, 6),
        (24.0, 4, 1, 4, 4),  # clamped to max
        (2.0, 4, 3, 0, 3),  # clamped to min
        (12.000000001, 4, 0, 0, 3),  # float noise does not add a replica
    ],
)
def test_desired_is_the_ceiling_of_average_over_target_clamped(average, target, minimum, maximum, expected):
    assert desired_replicas(average, target, minimum=minimum, maximum=maximum) == expected


def test_desired_needs_a_positive_target():
    with pytest.raises(ValueError):
        desired_replicas(1.0, 0, minimum=0, maximum=0)


class Clock:
    """Runs the reconciler's plan tick after tick, carrying the rule's autoscaler columns and the replicas
    placed or trimmed, as the database would."""

    def __init__(self, r: RuleView, replicas: list[ReplicaView]) -> None:
        self.rule, self.replicas, self.now = r, replicas, T0
        self.log: list[tuple[float, int]] = []  # (seconds since T0, replicas after the tick)

    def tick(self, average: float | None, *, after: float = 5.0):
        self.now += timedelta(seconds=after)
        load = None if average is None else Load(average, 6)
        plan = plan_rule(self.rule, self.replicas, NODES, now=self.now, config=CONFIG, load=load)
        if plan.state:
            self.rule = replace(self.rule, **plan.state)
        trimmed = {r.id for r in plan.trim}
        self.replicas = [r for r in self.replicas if r.id not in trimmed]
        start = len(self.replicas)
        self.replicas += [replica(index=start + i, in_flight=1) for i in range(plan.place)]
        self.log.append(((self.now - T0).total_seconds(), len(self.replicas)))
        return plan


def test_scale_up_waits_the_upscale_delay_of_sustained_demand():
    clock = Clock(rule(upscale_delay=30), [replica(in_flight=4)])
    first = clock.tick(24.0)
    assert first.place == 0
    assert "scale-up in 30 s" in first.reason
    assert clock.rule.scale_up_since == clock.now
    for _ in range(5):  # 25 s later: not yet
        assert clock.tick(24.0).place == 0
    up = clock.tick(24.0)  # 30 s of sustained demand
    assert up.place == 5
    assert up.autoscale
    assert up.reason.startswith("avg in-flight 24.0 over 30 s / target 4 → desired 6")
    assert len(clock.replicas) == 6
    assert clock.rule.scaled_up_at == clock.now
    assert clock.rule.scale_up_since is None


def test_demand_that_drops_before_the_delay_does_not_scale_up():
    clock = Clock(rule(upscale_delay=30), [replica()])
    clock.tick(24.0)
    clock.tick(24.0, after=20)
    assert clock.tick(3.0).place == 0  # back within target: the timer resets
    assert clock.rule.scale_up_since is None
    clock.tick(24.0)
    assert clock.tick(24.0, after=25).place == 0  # 25 s since the new start: not yet
    assert clock.tick(24.0, after=5).place == 5


def test_upscale_delay_zero_scales_on_the_first_tick():
    clock = Clock(rule(upscale_delay=0), [replica()])
    assert clock.tick(9.2).place == 2


def test_scale_up_is_clamped_to_max_and_to_free_slots():
    clock = Clock(rule(upscale_delay=0, max_replicas=4), [replica()])
    assert clock.tick(100.0).place == 3
    small = [NodeSnapshot(id="n", name="n", effective_cap=2, status=NodeStatus.HEALTHY)]
    plan = plan_rule(rule(upscale_delay=0), [replica()], small, now=T0, config=CONFIG, load=Load(100.0, 6))
    assert plan.place == 1  # one free slot left on the only node


def test_no_free_slot_keeps_the_demand_timer_and_places_nothing():
    full = [NodeSnapshot(id="n", name="n", effective_cap=1, status=NodeStatus.HEALTHY)]
    plan = plan_rule(rule(upscale_delay=0), [replica()], full, now=T0, config=CONFIG, load=Load(100.0, 6))
    assert plan.place == 0
    assert plan.reason.endswith("no free slot")
    assert plan.state["scale_up_since"] == T0


def test_scale_down_waits_the_downscale_delay_and_never_within_it_of_a_scale_up():
    clock = Clock(rule(upscale_delay=0, downscale_delay=60), [replica(in_flight=4)])
    clock.tick(24.0)  # scale-up to 6 at t=5
    assert len(clock.replicas) == 6
    clock.replicas = [replace(r, in_flight=0) for r in clock.replicas]
    # Load gone at once: the desired count is 1, but no scale-down within 60 s of the scale-up.
    for _ in range(11):
        plan = clock.tick(0.0)
        assert plan.trim == [], plan.reason
    assert "no scale-down within 60 s of a scale-up" in plan.reason or "scale-down in" in plan.reason
    # The below-current timer started at the first low tick (t=10): 60 s later (t=70) the idle ones go.
    plan = clock.tick(0.0)
    assert clock.now - T0 == timedelta(seconds=65)
    assert plan.trim == []
    plan = clock.tick(0.0)
    assert [r.replica_index for r in plan.trim] == [5, 4, 3, 2, 1]  # highest index first, the minimum stays
    assert plan.reason.startswith("avg in-flight 0.0 over 30 s / target 4 → desired 1; below 6 for 60 s")
    assert len(clock.replicas) == 1
    # No flapping: replicas only went up once, then down once.
    counts = [count for _t, count in clock.log]
    changes = [b - a for a, b in pairwise(counts) if b != a]
    assert changes == [-5]


def test_a_busy_replica_is_never_trimmed():
    busy = [replica(0, in_flight=0), replica(1, in_flight=3), replica(2, in_flight=0)]
    r = rule(downscale_delay=0)
    plan = plan_rule(r, busy, NODES, now=T0, config=CONFIG, load=Load(3.0, 6))
    # desired 1: two could go, but index 1 is busy: only index 2 goes, then index 0 (both idle).
    assert sorted(x.replica_index for x in plan.trim) == [0, 2]
    assert all(x.in_flight == 0 for x in plan.trim)
    loading = [replica(0), replica(1, state="loading")]
    plan = plan_rule(r, loading, NODES, now=T0, config=CONFIG, load=Load(0.0, 6))
    assert plan.trim == []  # a loading replica is not idle either


def test_no_samples_decide_nothing():
    plan = plan_rule(rule(upscale_delay=0), [replica(in_flight=9)], NODES, now=T0, config=CONFIG, load=None)
    assert plan.place == 0 and plan.trim == []
    assert plan.reason == "no in-flight samples yet"


def test_target_zero_keeps_the_all_busy_burst():
    plan = plan_rule(rule(target_in_flight=0), [replica(in_flight=1)], NODES, now=T0, config=CONFIG)
    assert plan.burst and plan.place == 1
    assert not plan.autoscale


def test_the_minimum_is_still_placed_first():
    plan = plan_rule(rule(min_replicas=3), [replica()], NODES, now=T0, config=CONFIG, load=Load(0.0, 6))
    assert plan.place == 2
    assert not plan.autoscale


def test_without_scale_to_zero_the_last_replica_stays():
    r = rule(min_replicas=0, downscale_delay=0)
    clock = Clock(r, [replica(idle_since=T0 - timedelta(hours=2))])
    for _ in range(3):
        assert clock.tick(0.0).trim == []
    assert len(clock.replicas) == 1


def test_scale_to_zero_unloads_the_last_idle_replica_after_its_delay():
    last_use = T0
    r = rule(min_replicas=0, scale_to_zero_after=60)
    clock = Clock(r, [replica(idle_since=last_use)])
    assert clock.tick(0.0, after=30).trim == []  # 30 s without a request: not yet
    plan = clock.tick(0.0, after=30)  # 60 s
    assert len(plan.trim) == 1
    assert "scale to zero: no request for 60 s" in plan.reason
    assert clock.replicas == []
    assert clock.tick(0.0).place == 0  # nothing comes back without a request


def test_scale_to_zero_waits_while_the_window_saw_requests_or_one_is_in_flight():
    r = rule(min_replicas=0, scale_to_zero_after=60)
    old = T0 - timedelta(hours=1)
    plan = plan_rule(r, [replica(idle_since=old)], NODES, now=T0, config=CONFIG, load=Load(0.2, 6))
    assert plan.trim == []
    plan = plan_rule(r, [replica(idle_since=old, in_flight=1)], NODES, now=T0, config=CONFIG, load=Load(0, 6))
    assert plan.trim == []
    plan = plan_rule(
        rule(min_replicas=1, scale_to_zero_after=60),
        [replica(idle_since=old)],
        NODES,
        now=T0,
        config=CONFIG,
        load=Load(0, 6),
    )
    assert plan.trim == []  # min 1 keeps it


def test_scale_to_zero_works_without_a_target():
    r = rule(target_in_flight=0, min_replicas=0, scale_to_zero_after=60)
    plan = plan_rule(r, [replica(idle_since=T0 - timedelta(seconds=61))], NODES, now=T0, config=CONFIG)
    assert len(plan.trim) == 1 and plan.autoscale
    plan = plan_rule(r, [replica(idle_since=T0 - timedelta(seconds=59))], NODES, now=T0, config=CONFIG)
    assert plan.trim == []


def test_downscale_delay_null_follows_the_setting():
    r = rule(downscale_delay=None)
    replicas = [replica(0), replica(1)]
    state = {"scale_down_since": T0 - timedelta(seconds=299)}
    decision = autoscale_decide(
        replace(r, **state), replicas, now=T0, load=Load(0.0, 6), window=30, default_downscale_delay=300
    )
    assert decision.trim == [] and "scale-down in 1 s" in decision.reason
    decision = autoscale_decide(
        replace(r, **state),
        replicas,
        now=T0 + timedelta(seconds=1),
        load=Load(0.0, 6),
        window=30,
        default_downscale_delay=300,
    )
    assert [x.replica_index for x in decision.trim] == [1]


def test_busy_replicas_above_desired_are_retired_once_the_scale_down_is_due():
    busy = [replica(0, in_flight=1), replica(1, in_flight=3), replica(2, in_flight=1)]
    r = rule(downscale_delay=20, scale_down_since=T0 - timedelta(seconds=19))
    plan = plan_rule(r, busy, NODES, now=T0, config=CONFIG, load=Load(2.0, 6))
    assert plan.trim == [] and plan.retire == []  # 19 s: not yet
    plan = plan_rule(r, busy, NODES, now=T0 + timedelta(seconds=1), config=CONFIG, load=Load(2.0, 6))
    assert plan.trim == []
    # desired 1: two go, the least busy first (ties: highest index first); none is unloaded with requests on it.
    assert [x.replica_index for x in plan.retire] == [2, 0]
    assert plan.reason.endswith("below 3 for 20 s")
