"""A replica removed while a claim of it is under way: both take the replica row before its claim rows (the
router's lock order), so the removal waits for the claim instead of deadlocking with it (docs/reliability.md,
"Removing a replica while it is claimed")."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from django.db import connection

from nodes.inflight import plain_connection_params
from nodes.models import InFlightClaim, ModelReplica
from nodes.services import replica_remove
from tests.conftest import wait_until
from tests.factories import NodeFactory, ReplicaFactory

pytestmark = pytest.mark.django_db(transaction=True)


def _remove(replica_id: int) -> ModelReplica | None:
    try:
        return replica_remove(replica_id=replica_id)
    finally:
        connection.close()


def _waits_for(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", [pid])
        return cursor.fetchone()[0] > 0


def test_a_replica_removed_while_a_claim_holds_it_waits_for_the_claim_and_takes_its_claim_rows():
    replica = ReplicaFactory(node=NodeFactory(), model_name="m", in_flight=1)
    owner = uuid.uuid4()
    InFlightClaim.objects.create(owner=owner, replica=replica, count=1)
    # A claim under way, in the claim statement's order: the replica row locked and counted, its claim row next.
    with psycopg.connect(**plain_connection_params()) as claim:
        claim.execute("SELECT id FROM nodes_modelreplica WHERE id = %s FOR UPDATE", [replica.pk])
        claim.execute("UPDATE nodes_modelreplica SET in_flight = in_flight + 1 WHERE id = %s", [replica.pk])
        with ThreadPoolExecutor(1) as pool:
            removal = pool.submit(_remove, replica.pk)
            wait_until(lambda: _waits_for(claim.info.backend_pid), timeout=30, message="the removal to wait")
            claim.execute(
                "INSERT INTO nodes_inflightclaim (owner, replica_id, count) VALUES (%s, %s, 1) "
                "ON CONFLICT (owner, replica_id) DO UPDATE SET count = nodes_inflightclaim.count + 1",
                [owner, replica.pk],
            )
            claim.commit()
            assert removal.result(timeout=30) is not None
    assert not ModelReplica.objects.filter(pk=replica.pk).exists()
    assert not InFlightClaim.objects.filter(owner=owner).exists()  # gone with the replica, in the database
