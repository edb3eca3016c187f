"""A web process that dies mid-request gives its in-flight units back (nodes.inflight)."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from localai_cluster import locks
from nodes.inflight import PROCESS_OWNER, inflight_reclaim_dead_owners, plain_connection_params
from nodes.models import InFlightClaim, ModelReplica
from scheduling.health import health_tick
from tests.conftest import wait_until
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


def _release(lease) -> None:
    """`lease.release()` on an event loop of its own, whose hot-path pool is closed before the loop (as
    `tests.scheduling.test_router.claim` does)."""
    from scheduling import router

    async def run() -> None:
        try:
            await lease.release()
        finally:
            await router.close_hot_pools()

    asyncio.run(run())


def test_after_every_session_ended_the_second_claim_takes_a_new_owner_id_and_moves_the_units():
    """A database restart or failover ends the router's sessions (its hot connections and the owner's lock
    session). The claim that finds its pooled
    connection dead casts doubt on the owner's lock session; the next claim checks it (not after
    OWNER_CHECK_INTERVAL), takes a new owner id and moves every unit held to it."""

    from localai_cluster.dbhealth import idle_connection_suspect
    from scheduling import router

    replica = ReplicaFactory(node=NodeFactory(), in_flight=0)

    async def scenario():
        try:
            first = await router.aclaim("m")
            old = first.owner
            # The router's sessions end (the owner's lock session and every pooled hot connection), as in a
            # restart; the test waits until each has exited (a terminated backend exits on its own time: a claim
            # sent to one still exiting meets the shutdown mid-statement, which is not this scenario). Other
            # sessions are left alone: a thread's Django connection ended here would fail a later test.
            pool = await router.hot_pool()
            held = [await pool.getconn() for _ in range(pool.get_stats()["pool_size"])]
            pids = [PROCESS_OWNER._conn.info.backend_pid, *(conn.info.backend_pid for conn in held)]
            for conn in held:
                await pool.putconn(conn)
            with psycopg.connect(**plain_connection_params(), autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids])
                await asyncio.to_thread(
                    wait_until,
                    lambda: (
                        not other.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
                        ).fetchone()[0]
                    ),
                    message="the terminated sessions to exit",
                )
            assert idle_connection_suspect(PROCESS_OWNER._conn)
            second = await router.aclaim("m")  # finds its pooled connection dead
            third = await router.aclaim("m")  # checks the owner's lock session: a new id
            return old, [first, second, third]
        finally:
            await router.close_hot_pools()

    old, leases = asyncio.run(scenario())
    new = PROCESS_OWNER.fresh_id()
    assert new is not None and new != old
    assert [lease.owner for lease in leases] == [new, new, new]
    health_tick()  # the old id's claims: its lock is free
    replica.refresh_from_db()
    assert replica.in_flight == 3
    for lease in leases:
        _release(lease)
    replica.refresh_from_db()
    assert replica.in_flight == 0


def test_a_new_owner_id_takes_over_the_units_still_held_and_the_health_tick_makes_counts_right():
    """After a database switch the counters may be wrong both ways (the hot path commits asynchronously: the
    last claims and releases before the crash may be lost) and the new server holds none of the old locks.
    The units the process still holds move to its new owner id; the health tick reclaims the old id's."""
    replica = ReplicaFactory(node=NodeFactory(), in_flight=0)
    held = [claim(model_name="m") for _ in range(3)]
    old = held[0].owner
    _release(held.pop())
    assert PROCESS_OWNER.held()[replica.id] == 2
    # The crash lost the last claim (async commit): the database shows one unit where two are held.
    InFlightClaim.objects.filter(owner=old).update(count=1)
    ModelReplica.objects.filter(pk=replica.pk).update(in_flight=1)
    PROCESS_OWNER._conn.close()  # the old server went away with the owner's lock

    new = PROCESS_OWNER.id()
    assert new != old
    assert {lease.owner for lease in held} == {new}
    assert InFlightClaim.objects.get(owner=new).count == 2
    health_tick()  # reclaims the old id's unit: its lock is free
    replica.refresh_from_db()
    assert replica.in_flight == 2  # exactly what is held
    for lease in held:
        _release(lease)
    replica.refresh_from_db()
    assert replica.in_flight == 0
    assert InFlightClaim.objects.get(owner=new).count == 0
