"""A web process that dies mid-request gives its in-flight units back (nodes.inflight)."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from localai_cluster import locks
from nodes.inflight import PROCESS_OWNER, inflight_reclaim_dead_owners, plain_connection_params
from nodes.models import InFlightClaim, ModelReplica
from scheduling.health import health_tick
from tests.factories import NodeFactory, ReplicaFactory
from tests.scheduling.test_router import claim

pytestmark = pytest.mark.django_db(transaction=True)


def test_units_of_a_dead_owner_are_given_back_and_live_ones_kept():
    replica = ReplicaFactory(node=NodeFactory(), in_flight=0)
    ours = claim(model_name="m")
    gone = uuid.uuid4()  # an owner whose process died: nobody holds its lock
    InFlightClaim.objects.create(owner=gone, replica=replica, count=3)
    ModelReplica.objects.filter(pk=replica.pk).update(in_flight=4)

    assert inflight_reclaim_dead_owners() == {str(gone): 3}

    replica.refresh_from_db()
    assert replica.in_flight == 1
    assert list(InFlightClaim.objects.values_list("owner", flat=True)) == [ours.owner]


def test_an_owner_whose_process_lives_elsewhere_is_left_alone():
    replica = ReplicaFactory(node=NodeFactory(), in_flight=2)
    elsewhere = uuid.uuid4()
    InFlightClaim.objects.create(owner=elsewhere, replica=replica, count=2)
    with psycopg.connect(**plain_connection_params(), autocommit=True) as other:
        other.execute(
            "SELECT pg_advisory_lock(%s, %s)", [locks.NAMESPACE_WEB_OWNER, locks.owner_key(elsewhere)]
        )
        assert inflight_reclaim_dead_owners() == {}
    replica.refresh_from_db()
    assert replica.in_flight == 2


def test_the_health_tick_reclaims(caplog):
    replica = ReplicaFactory(node=NodeFactory(), in_flight=1)
    InFlightClaim.objects.create(owner=uuid.uuid4(), replica=replica, count=1)
    report = health_tick()
    replica.refresh_from_db()
    assert replica.in_flight == 0 and sum(report.reclaimed.values()) == 1


def test_a_lost_owner_connection_means_a_new_owner_id(monkeypatch):
    first = PROCESS_OWNER.id()
    PROCESS_OWNER._conn.close()  # the lock connection breaks
    monkeypatch.setattr("nodes.inflight.OWNER_CHECK_INTERVAL", 0)
    second = PROCESS_OWNER.id()
    assert second != first
    assert inflight_reclaim_dead_owners() == {}  # no claims yet; the old id's lock is free now


def test_concurrent_claims_and_releases_on_one_replica_never_deadlock():
    """Claims lock the replica row then the claim row; releases must take them in the same order."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    from scheduling.router import replica_release

    replica = ReplicaFactory(node=NodeFactory())

    def cycles(_worker: int) -> None:
        try:
            for _ in range(25):
                lease = claim(model_name="m")
                replica_release(lease.replica_id, lease.owner)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(cycles, range(12)))  # a deadlock would raise here
    replica.refresh_from_db()
    assert replica.in_flight == 0
    assert InFlightClaim.objects.get(replica=replica).count == 0
