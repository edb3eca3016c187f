"""VRAM reservation (SCENARIOS 36–39)."""

from __future__ import annotations

import pytest

from nodes import services
from tests.factories import NodeFactory, claim_row

pytestmark = pytest.mark.django_db
GiB = 1024**3


def vram_node(total_gib: int, **fields):
    return NodeFactory(
        total_vram=total_gib * GiB, available_vram=total_gib * GiB, worker_max_replicas_per_model=4, **fields
    )


def reserved(node) -> int:
    node.refresh_from_db()
    return node.reserved_vram


def test_claim_reserves_its_vram_and_a_zero_vram_model_reserves_nothing():
    node = vram_node(10)
    replica = claim_row(node_id=node.pk, model_name="a", vram_bytes=3 * GiB)
    assert replica.vram_bytes == 3 * GiB
    assert reserved(node) == 3 * GiB
    claim_row(node_id=node.pk, model_name="b", vram_bytes=0)
    assert reserved(node) == 3 * GiB


def test_reservation_admits_exactly_up_to_available_minus_reserved():
    node = vram_node(5)
    assert claim_row(node_id=node.pk, model_name="a", vram_bytes=4 * GiB)
    assert claim_row(node_id=node.pk, model_name="b", vram_bytes=2 * GiB) is None
    assert reserved(node) == 4 * GiB
    assert claim_row(node_id=node.pk, model_name="c", vram_bytes=1 * GiB)
    assert reserved(node) == 5 * GiB


def test_a_node_reporting_no_vram_is_placed_on_by_slots_alone():
    node = NodeFactory(total_vram=0, available_vram=0, worker_max_replicas_per_model=2)
    replica = claim_row(node_id=node.pk, model_name="a", vram_bytes=80 * GiB)
    assert replica is not None and replica.vram_bytes == 0
    assert reserved(node) == 0


def test_release_of_a_failed_load_is_exact():
    node = vram_node(10)
    small = claim_row(node_id=node.pk, model_name="a", vram_bytes=1 * GiB)
    claim_row(node_id=node.pk, model_name="b", vram_bytes=3 * GiB)
    services.replica_remove(replica_id=small.pk)
    assert reserved(node) == 3 * GiB


def test_release_after_a_heartbeat_accounted_for_the_replica_stays_at_zero():
    node = vram_node(10)
    replica = claim_row(node_id=node.pk, model_name="a", vram_bytes=5 * GiB)
    services.node_heartbeat(node=node, available_vram=5 * GiB, replicas=[{"key": "a#0"}])
    assert reserved(node) == 0
    services.replica_remove(replica_id=replica.pk)
    assert reserved(node) == 0


def test_release_never_goes_below_zero():
    node = vram_node(10)
    replica = claim_row(node_id=node.pk, model_name="a", vram_bytes=5 * GiB)
    type(node).objects.filter(pk=node.pk).update(reserved_vram=0)
    services.replica_remove(replica_id=replica.pk)
    assert reserved(node) == 0


def test_release_twice_releases_once():
    node = vram_node(10)
    claim_row(node_id=node.pk, model_name="b", vram_bytes=3 * GiB)
    replica = claim_row(node_id=node.pk, model_name="a", vram_bytes=2 * GiB)
    services.replica_remove(replica_id=replica.pk)
    services.replica_remove(replica_id=replica.pk)
    assert reserved(node) == 3 * GiB
