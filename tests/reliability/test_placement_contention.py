"""Placement under contention on real PostgreSQL (QUALITY.md, "Concurrency"): many schedulers racing for a few
tight nodes never over-commit VRAM, never take one slot twice, and fail only with a clean `NoCapacity`."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from django.db import connection

from nodes.models import ModelReplica, Node
from scheduling.placement import NoCapacity
from scheduling.services import replica_place
from tests.factories import GiB, ModelConfigFactory, NodeFactory
from tests.reliability import invariants
from tests.scheduling.fake_agent import FakeAgent, FakeAgentServer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

NODES = 10
MODELS = 20
PLACEMENTS = 200
THREADS = 16  # the database pool holds 20 connections; a wider pool would only queue on it


def _plain_connection() -> psycopg.Connection:
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg.connect(**params, autocommit=True)


class InvariantWatcher:
    """Checks the invariants over and over from its own session while the placements run."""

    def __init__(self) -> None:
        self.samples = 0
        self.violations: list[invariants.Violations] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invariant-watcher", daemon=True)

    def _run(self) -> None:
        with _plain_connection() as conn, conn.cursor() as cursor:
            while not self._stop.is_set():
                found = invariants.check(cursor)
                self.samples += 1
                if found:
                    self.violations.append(found)
                time.sleep(0.005)

    def __enter__(self) -> InvariantWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _place(model_name: str, start: threading.Event) -> str:
    start.wait()
    try:
        replica_place(model_name=model_name)
        return "placed"
    except NoCapacity:
        return "no_capacity"
    except Exception as error:  # anything else is a failure of the invariant "only clean NoCapacity"
        return f"{type(error).__name__}: {error}"
    finally:
        connection.close()


def test_concurrent_placements_on_tight_nodes_keep_every_invariant():
    agent = FakeAgent()
    with FakeAgentServer(agent) as server:
        # 10 nodes of 10 GiB, 2 slots per model each; every model needs 3 GiB: 3 replicas fit a node, 30 the
        # cluster, and 200 placements over 20 models fight for them (evicting idle ones when nothing fits).
        for _ in range(NODES):
            NodeFactory(
                address=server.address,
                worker_max_replicas_per_model=2,
                total_vram=10 * GiB,
                available_vram=10 * GiB,
            )
        models = [ModelConfigFactory(name=f"race-{i:02d}", vram_bytes=3 * GiB).name for i in range(MODELS)]
        start = threading.Event()
        with InvariantWatcher() as watcher, ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(_place, models[i % MODELS], start) for i in range(PLACEMENTS)]
            start.set()
            outcomes = Counter(future.result(timeout=120) for future in futures)

    assert set(outcomes) <= {"placed", "no_capacity"}, outcomes
    assert outcomes["placed"] >= NODES * 3, outcomes  # the cluster filled up before anything was refused
    assert watcher.samples > 0
    assert watcher.violations == [], watcher.violations[:3]

    with _plain_connection() as conn, conn.cursor() as cursor:
        assert not invariants.check(cursor)
        cursor.execute(invariants.IN_FLIGHT_SQL)
        assert cursor.fetchone() == (0, 0)
    rows = ModelReplica.objects.all()
    assert rows.count() <= NODES * 3
    assert set(rows.values_list("state", flat=True)) == {"loaded"}
    assert all(node.reserved_vram >= 0 for node in Node.objects.all())
    # Every LoadReplica became a row, or its row was evicted afterwards (its process stopped by exact key).
    assert len(agent.loads) == outcomes["placed"]
    assert len(agent.loads) - len(agent.stops) == rows.count()
