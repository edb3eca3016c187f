"""The reconciler's autoscaling steps on real PostgreSQL with an in-process gRPC agent: the rule's timers
written back, decision records, busy replicas retired (out of routing) and unloaded once idle."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from nodes.choices import ReplicaState
from nodes.models import ModelReplica
from scheduling.autoscale import inflight_sample_take
from scheduling.choices import Outcome, Trigger
from scheduling.models import PlacementDecision, SchedulingRule
from scheduling.reconciler import reconcile_tick
from tests.factories import ModelConfigFactory, NodeFactory, ReplicaFactory, RuleFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_busy_replicas_are_retired_then_unloaded_when_their_requests_end(agent):
    node = NodeFactory(address=agent.address, worker_max_replicas_per_model=4)
    ModelConfigFactory(name="m")
    RuleFactory(model_name="m", min_replicas=1, target_in_flight=4, upscale_delay=0, downscale_delay=10)
    rows = [ReplicaFactory(node=node, model_name="m", replica_index=i, in_flight=1) for i in range(3)]
    start = timezone.now()
    inflight_sample_take(now=start)  # 3 in flight / target 4 → desired 1
    reconcile_tick(now=start)
    assert SchedulingRule.objects.get().scale_down_since == start
    inflight_sample_take(now=start + timedelta(seconds=10))
    report = reconcile_tick(now=start + timedelta(seconds=10))
    states = sorted(ModelReplica.objects.values_list("state", flat=True))
    assert states == [ReplicaState.LOADED, ReplicaState.UNLOADING, ReplicaState.UNLOADING]
    assert len(report.trimmed) == 2 and agent.stops == []  # nothing stopped with requests on it
    records = PlacementDecision.objects.filter(trigger=Trigger.AUTOSCALE, outcome=Outcome.TRIMMED)
    assert records.count() == 2
    assert all("no new request goes to it" in r.message and "→ desired 1" in r.message for r in records)
    # One retired replica's request ends: the next tick unloads exactly that one.
    retired = ModelReplica.objects.filter(state=ReplicaState.UNLOADING).order_by("replica_index")
    first = retired.first()
    ModelReplica.objects.filter(pk=first.pk).update(in_flight=0)
    reconcile_tick(now=start + timedelta(seconds=11))
    assert not ModelReplica.objects.filter(pk=first.pk).exists()
    assert agent.stops == [first.process_key]
    assert ModelReplica.objects.filter(state=ReplicaState.UNLOADING).count() == 1
    assert {r.pk for r in rows} - {first.pk} == set(ModelReplica.objects.values_list("pk", flat=True))
