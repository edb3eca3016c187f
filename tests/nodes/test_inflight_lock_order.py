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


def _replica_statements(run) -> list[str]:
    """The SQL of `run()` that names the replica table, in order."""
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        run()
    return [query["sql"] for query in queries.captured_queries if '"nodes_modelreplica"' in query["sql"]]


def _locked_in_id_order_before_written(statements: list[str]) -> bool:
    writes = [
        index
        for index, sql in enumerate(statements)
        if sql.startswith(('DELETE FROM "nodes_modelreplica"', 'UPDATE "nodes_modelreplica"'))
    ]
    locks = [
        index
        for index, sql in enumerate(statements)
        # `ORDER BY 1`: Django's spelling of the id order when only the id is selected.
        if "FOR UPDATE" in sql
        and ("ORDER BY 1 ASC" in sql or 'ORDER BY "nodes_modelreplica"."id" ASC' in sql)
    ]
    return bool(writes) and bool(locks) and min(locks) < min(writes)


@pytest.mark.parametrize("writer", ["deregister", "delete", "stale", "heartbeat", "alive", "unload"])
def test_writers_of_several_replica_rows_lock_them_in_id_order_first(writer, monkeypatch):
    """The router's batched claims and releases lock several replica rows, in id order; every other statement
    that writes several replica rows locks them in that order first, so none of them can wait for another in a
    cycle (docs/reliability.md, "Removing a replica while it is claimed")."""
    from datetime import timedelta

    from django.utils import timezone

    from nodes import services
    from scheduling import health

    old = timezone.now() - timedelta(hours=1)
    node = NodeFactory(last_heartbeat=old)
    replicas = [
        ReplicaFactory(node=node, model_name="m", replica_index=index, loaded_at=old) for index in range(3)
    ]
    runs = {
        "deregister": lambda: services.node_deregister(node=node),
        "delete": lambda: services.node_delete(node=node),
        "stale": lambda: health.mark_stale_nodes_offline(now=timezone.now()),
        # The agent lists the first replica only: the other two are removed, the first is marked seen.
        "heartbeat": lambda: services.node_heartbeat(node=node, replicas=[replicas[0].process_key]),
        # An operator unloads two replicas, listed in descending id order.
        "unload": lambda: services.replica_unload(node=node, replicas=replicas[:0:-1]),
    }
    if writer == "alive":
        monkeypatch.setattr(health, "_probe", lambda replica: True)
        ModelReplica.objects.update(last_seen_at=old)  # not heard from since an hour: probed, and they answer
        runs["alive"] = lambda: health.probe_unheard_replicas(now=timezone.now())
    assert _locked_in_id_order_before_written(_replica_statements(runs[writer]))


def test_unload_all_locks_the_models_replicas_in_id_order(monkeypatch):
    """The model's "unload all" locks every replica of the model before it stops them: in id order too."""
    from scheduling import services as scheduling_services

    node = NodeFactory()
    for index in range(3):
        ReplicaFactory(node=node, model_name="m", replica_index=index)
    monkeypatch.setattr(
        scheduling_services, "replica_unload", lambda *, node, replicas: [row.process_key for row in replicas]
    )
    statements = _replica_statements(lambda: scheduling_services.model_unload_all(model_name="m"))
    locks = [sql for sql in statements if "FOR UPDATE" in sql]
    assert locks and all('ORDER BY "nodes_modelreplica"."id" ASC' in sql for sql in locks)
