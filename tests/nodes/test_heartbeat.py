"""Heartbeat (BEHAVIOUR §2 and §6 reconciliation, SCENARIOS 13–15)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from nodes import services
from nodes.choices import LABEL_GPU_VENDOR, LABEL_GPU_VRAM, NodeStatus, ReplicaState
from nodes.models import ModelReplica, Node
from nodes.selectors import node_labels
from tests.factories import NodeFactory, ReplicaFactory, claim_row

pytestmark = pytest.mark.django_db
GiB = 1024**3


def listed(*keys: str) -> list[dict]:
    return [{"key": key, "address": "127.0.0.1:1", "state": "running"} for key in keys]


def test_heartbeat_refreshes_resources_and_resets_reservation_when_everything_is_listed():
    node = NodeFactory(
        total_vram=10 * GiB, reserved_vram=5 * GiB, last_heartbeat=timezone.now() - timedelta(seconds=30)
    )
    ReplicaFactory(node=node, model_name="m", replica_index=0, state=ReplicaState.LOADED)
    before = timezone.now()
    services.node_heartbeat(node=node, available_vram=8 * GiB, total_vram=10 * GiB, replicas=listed("m#0"))
    node.refresh_from_db()
    assert node.available_vram == 8 * GiB
    assert node.reserved_vram == 0
    assert node.last_heartbeat >= before


def test_heartbeat_keeps_reservation_of_loads_not_listed_yet():
    node = NodeFactory(total_vram=24 * GiB, available_vram=24 * GiB, worker_max_replicas_per_model=2)
    unlisted = claim_row(node_id=node.pk, model_name="a", vram_bytes=6 * GiB)
    listed_row = claim_row(node_id=node.pk, model_name="b", vram_bytes=4 * GiB)
    assert unlisted and listed_row
    services.node_heartbeat(node=node, available_vram=20 * GiB, replicas=listed("b#0"))
    node.refresh_from_db()
    assert node.reserved_vram == 6 * GiB
    assert ModelReplica.objects.filter(pk=unlisted.pk).exists()


def test_heartbeat_never_approves_a_pending_node():
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None, last_heartbeat=None)
    result = services.node_heartbeat(node=node, available_vram=0)
    node.refresh_from_db()
    assert result.status == NodeStatus.PENDING
    assert node.status == NodeStatus.PENDING
    assert node.approved_at is None
    assert node.last_heartbeat is not None


def test_stale_then_fresh_pending_node_stays_pending():
    node = NodeFactory(status=NodeStatus.OFFLINE, approved_at=None)
    assert services.node_heartbeat(node=node).status == NodeStatus.PENDING
    node.refresh_from_db()
    assert node.status == NodeStatus.PENDING
    assert node.approved_at is None


@pytest.mark.parametrize("status", [NodeStatus.OFFLINE, NodeStatus.UNHEALTHY])
def test_approved_lapsed_node_that_heartbeats_becomes_healthy(
    status, capacity_events, django_capture_on_commit_callbacks
):
    node = NodeFactory(status=status)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.node_heartbeat(node=node).status == NodeStatus.HEALTHY
    assert capacity_events


def test_draining_node_stays_draining_on_heartbeat():
    node = NodeFactory(status=NodeStatus.DRAINING)
    assert services.node_heartbeat(node=node).status == NodeStatus.DRAINING


def test_heartbeat_answers_effective_cap():
    node = NodeFactory(worker_max_replicas_per_model=1, max_replicas_override=4)
    assert services.node_heartbeat(node=node).max_replicas_per_model == 4


def test_heartbeat_removes_loaded_row_the_worker_no_longer_lists():
    node = NodeFactory(worker_max_replicas_per_model=2)
    loaded_at = timezone.now() - timedelta(minutes=5)
    gone = ReplicaFactory(node=node, model_name="m", replica_index=0, loaded_at=loaded_at)
    kept = ReplicaFactory(node=node, model_name="m", replica_index=1, loaded_at=loaded_at)
    services.node_heartbeat(node=node, replicas=listed("m#1"))
    assert not ModelReplica.objects.filter(pk=gone.pk).exists()
    assert ModelReplica.objects.filter(pk=kept.pk).exists()


def test_heartbeat_keeps_a_row_loaded_after_the_heartbeat_was_built(settings):
    """The agent built this heartbeat just before the load reached it: the fresh row is not removed, and a
    heartbeat after the grace period that still does not list it removes it."""
    settings.LOCALAI_HEARTBEAT_INTERVAL = 10
    node = NodeFactory()
    fresh = ReplicaFactory(node=node, model_name="m", replica_index=0, loaded_at=timezone.now())
    services.node_heartbeat(node=node, replicas=listed())
    assert ModelReplica.objects.filter(pk=fresh.pk).exists()
    ModelReplica.objects.filter(pk=fresh.pk).update(loaded_at=timezone.now() - timedelta(seconds=31))
    services.node_heartbeat(node=node, replicas=listed())
    assert not ModelReplica.objects.filter(pk=fresh.pk).exists()


def test_heartbeat_keeps_loading_row_until_load_timeout(settings):
    settings.LOCALAI_LOAD_TIMEOUT = 300
    node = NodeFactory(worker_max_replicas_per_model=2)
    young = ReplicaFactory(
        node=node, replica_index=0, state=ReplicaState.LOADING, load_started_at=timezone.now(), vram_bytes=GiB
    )
    old = ReplicaFactory(
        node=node,
        replica_index=1,
        state=ReplicaState.LOADING,
        load_started_at=timezone.now() - timedelta(seconds=301),
        vram_bytes=2 * GiB,
    )
    services.node_heartbeat(node=node, replicas=[])
    assert ModelReplica.objects.filter(pk=young.pk).exists()
    assert not ModelReplica.objects.filter(pk=old.pk).exists()
    node.refresh_from_db()
    assert node.reserved_vram == GiB


def test_heartbeat_marks_listed_rows_seen():
    node = NodeFactory()
    row = ReplicaFactory(node=node, last_seen_at=timezone.now() - timedelta(hours=1))
    before = timezone.now()
    services.node_heartbeat(node=node, replicas=listed("m#0"))
    row.refresh_from_db()
    assert row.last_seen_at >= before


def test_heartbeat_reports_orphans():
    node = NodeFactory()
    ReplicaFactory(node=node, model_name="m", replica_index=0)
    result = services.node_heartbeat(node=node, replicas=listed("m#0", "x#3", "a#0"))
    assert result.orphans == ["a#0", "x#3"]


def test_heartbeat_accepts_bare_keys():
    node = NodeFactory()
    row = ReplicaFactory(node=node)
    assert services.node_heartbeat(node=node, replicas=["m#0"]).orphans == []
    assert ModelReplica.objects.filter(pk=row.pk).exists()


def test_heartbeat_keeps_figures_it_does_not_send():
    node = NodeFactory(
        total_vram=10 * GiB, available_vram=7 * GiB, total_ram=64 * GiB, available_ram=30 * GiB
    )
    services.node_heartbeat(node=node, available_ram=20 * GiB)
    node.refresh_from_db()
    assert (node.total_vram, node.available_vram, node.total_ram, node.available_ram) == (
        10 * GiB,
        7 * GiB,
        64 * GiB,
        20 * GiB,
    )


def test_heartbeat_refreshes_gpu_labels_when_they_change():
    node = NodeFactory(total_vram=0, gpu_vendor="")
    services.node_heartbeat(node=node, total_vram=24 * GiB, gpu_vendor="nvidia")
    labels = node_labels(node=node)
    assert labels[LABEL_GPU_VENDOR] == "nvidia"
    assert labels[LABEL_GPU_VRAM] == "24GB"


def test_heartbeat_of_a_deleted_node_raises_does_not_exist():
    node = NodeFactory()
    Node.objects.filter(pk=node.pk).delete()
    with pytest.raises(Node.DoesNotExist):
        services.node_heartbeat(node=node)


@pytest.mark.parametrize("replica_count", [1, 40])
def test_heartbeat_query_count_does_not_grow_with_replicas(replica_count, django_assert_max_num_queries):
    node = NodeFactory(worker_max_replicas_per_model=replica_count)
    for index in range(replica_count):
        ReplicaFactory(node=node, model_name="m", replica_index=index)
    keys = [f"m#{index}" for index in range(0, replica_count, 2)]
    with django_assert_max_num_queries(8):
        services.node_heartbeat(node=node, available_vram=0, replicas=listed(*keys))
