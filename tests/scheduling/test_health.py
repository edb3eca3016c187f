"""The health monitor on real PostgreSQL: BEHAVIOUR §6, SCENARIOS 137–149."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from localai_cluster import locks
from nodes.choices import NodeStatus
from nodes.models import ModelReplica, Node
from nodes.tokens import backend_token_for
from scheduling.health import health_tick
from tests.conftest import another_session_holding
from tests.factories import TEST_CREDENTIAL, NodeFactory, ReplicaFactory

pytestmark = pytest.mark.django_db


def _ago(seconds: float):
    return timezone.now() - timedelta(seconds=seconds)


def test_stale_healthy_node_goes_offline_and_loses_its_rows():
    node = NodeFactory(last_heartbeat=_ago(120))
    ReplicaFactory(node=node, replica_index=0)
    ReplicaFactory(node=node, replica_index=1)
    report = health_tick()
    node.refresh_from_db()
    assert node.status == NodeStatus.OFFLINE
    assert not ModelReplica.objects.filter(node=node).exists()
    assert report.offline == [node.name]


def test_stale_draining_node_goes_offline_too():
    node = NodeFactory(status=NodeStatus.DRAINING, last_heartbeat=_ago(120))
    ReplicaFactory(node=node)
    health_tick()
    node.refresh_from_db()
    assert node.status == NodeStatus.OFFLINE
    assert not node.replicas.exists()


def test_fresh_node_keeps_status_and_rows():
    node = NodeFactory()
    ReplicaFactory(node=node)
    health_tick()
    node.refresh_from_db()
    assert node.status == NodeStatus.HEALTHY and node.replicas.count() == 1


def test_late_heartbeats_make_a_node_unhealthy_but_keep_its_rows():
    node = NodeFactory(last_heartbeat=_ago(40))
    ReplicaFactory(node=node)
    report = health_tick()
    node.refresh_from_db()
    assert node.status == NodeStatus.UNHEALTHY and node.replicas.count() == 1
    assert report.unhealthy == [node.name]


def test_approved_offline_node_heartbeating_again_is_healthy_by_next_tick():
    node = NodeFactory(status=NodeStatus.OFFLINE, last_heartbeat=timezone.now())
    health_tick()
    node.refresh_from_db()
    assert node.status == NodeStatus.HEALTHY


def test_pending_offline_node_heartbeating_again_is_pending_not_healthy():
    node = NodeFactory(status=NodeStatus.OFFLINE, approved_at=None, last_heartbeat=timezone.now())
    health_tick()
    node.refresh_from_db()
    assert node.status == NodeStatus.PENDING and node.approved_at is None


def test_pending_node_going_stale_then_registering_again_stays_pending():
    from nodes.services import node_register

    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None, last_heartbeat=_ago(120))
    health_tick()
    node.refresh_from_db()
    assert node.status == NodeStatus.OFFLINE
    node_register(
        name=node.name,
        node_type="backend",
        address=node.address,
        total_vram=0,
        available_vram=0,
        total_ram=0,
        available_ram=0,
        gpu_vendor="",
        labels={},
        max_replicas_per_model=1,
        replicas=[],
        node_credential=TEST_CREDENTIAL,
    )
    node.refresh_from_db()
    assert node.status == NodeStatus.PENDING and node.approved_at is None


def test_admin_drained_node_heartbeating_again_comes_back_draining():
    from nodes.services import node_drain

    node = NodeFactory(last_heartbeat=_ago(120))
    node_drain(node=node)
    health_tick()
    node.refresh_from_db()
    assert node.status == NodeStatus.OFFLINE
    Node.objects.filter(pk=node.pk).update(last_heartbeat=timezone.now())
    health_tick()
    node.refresh_from_db()
    assert node.status == NodeStatus.DRAINING


@pytest.mark.e2e  # real echo backend processes
@pytest.mark.django_db(transaction=True)
def test_dead_replica_is_probed_out_alone(echo_backend):
    node = NodeFactory()
    token = backend_token_for(node)
    live_address, _ = echo_backend(token)
    dead_address, dead_process = echo_backend(token)
    dead_process.kill()
    dead_process.wait()
    alive = ReplicaFactory(node=node, replica_index=0, address=live_address, last_seen_at=_ago(180))
    dead = ReplicaFactory(node=node, replica_index=1, address=dead_address, last_seen_at=_ago(180))

    report = health_tick()

    assert report.probed == 2
    assert report.removed == [f"{node.name}/m#1"]
    assert ModelReplica.objects.filter(pk=alive.pk).exists()
    assert not ModelReplica.objects.filter(pk=dead.pk).exists()
    node.refresh_from_db()
    assert node.status == NodeStatus.HEALTHY


@pytest.mark.e2e  # real echo backend processes
@pytest.mark.django_db(transaction=True)
def test_only_unheard_replicas_are_probed_and_a_good_probe_counts_as_heard(echo_backend):
    node = NodeFactory()
    address, _ = echo_backend(backend_token_for(node))
    old = ReplicaFactory(node=node, replica_index=0, address=address, last_seen_at=_ago(300))
    ReplicaFactory(node=node, replica_index=1, address=address, last_seen_at=timezone.now())

    first = health_tick()
    second = health_tick()

    assert first.probed == 1 and first.removed == []
    assert second.probed == 0
    old.refresh_from_db()
    assert old.last_seen_at > _ago(10)


@pytest.mark.django_db(transaction=True)
def test_tick_does_nothing_while_another_process_holds_the_lock():
    NodeFactory(last_heartbeat=_ago(120))
    with another_session_holding(locks.NAMESPACE_LOOPS, locks.HEALTH_MONITOR):
        report = health_tick()
    assert report.skipped
    assert Node.objects.get().status == NodeStatus.HEALTHY


def test_healthcheck_once_command_runs_one_tick(capsys):
    node = NodeFactory(last_heartbeat=_ago(120))
    call_command("healthcheck", "--once")
    out = capsys.readouterr().out
    assert f"offline: {node.name}" in out
    node.refresh_from_db()
    assert node.status == NodeStatus.OFFLINE
