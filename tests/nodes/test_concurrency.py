"""Races on real PostgreSQL transactions: threads, each with its own connection (closed at the end)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from rest_framework.test import APIClient

from nodes import services
from nodes.models import ModelReplica, Node
from tests.factories import TEST_CREDENTIAL, NodeFactory, ReplicaFactory, claim_row

pytestmark = pytest.mark.django_db(transaction=True)
GiB = 1024**3


def race(count: int, action: Callable[[], Any]) -> list[Any]:
    """Run `action` in `count` threads released together; answers each one's result or exception."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(slot: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[slot] = action()
        except Exception as error:  # the test asserts there was none
            results[slot] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_two_racing_reservations_cannot_both_pass():
    node = NodeFactory(total_vram=5 * GiB, available_vram=5 * GiB, worker_max_replicas_per_model=4)
    models = iter(["a", "b"])
    lock = threading.Lock()

    def claim():
        with lock:
            model = next(models)
        return claim_row(node_id=node.pk, model_name=model, vram_bytes=4 * GiB)

    results = race(2, claim)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len([r for r in results if r is not None]) == 1
    node.refresh_from_db()
    assert node.reserved_vram == 4 * GiB
    assert ModelReplica.objects.count() == 1


def test_two_claims_of_the_same_slot_make_one_row_and_the_loser_answers_none():
    node = NodeFactory(worker_max_replicas_per_model=2)
    ReplicaFactory(node=node, replica_index=0)
    results = race(2, lambda: claim_row(node_id=node.pk, model_name="m"))
    assert not [r for r in results if isinstance(r, Exception)], results
    winners = [r for r in results if r is not None]
    assert [r.replica_index for r in winners] == [1]
    assert ModelReplica.objects.filter(node=node, replica_index=1).count() == 1


def test_two_claims_of_the_same_free_index_spread_to_the_next_one():
    node = NodeFactory(worker_max_replicas_per_model=3)
    ReplicaFactory(node=node, replica_index=0)
    results = race(2, lambda: claim_row(node_id=node.pk, model_name="m"))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r.replica_index for r in results) == [1, 2]


def test_concurrent_registrations_of_one_name_make_one_node():
    results = race(
        4,
        lambda: services.node_register(name="w1", address="127.0.0.1:1", node_credential=TEST_CREDENTIAL),
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    assert Node.objects.filter(name="w1").count() == 1
    assert sorted(r.created for r in results) == [False, False, False, True]
    assert len({r.node.pk for r in results}) == 1


def test_concurrent_registrations_over_http_answer_one_201_and_one_200():
    def post():
        body = {"name": "w1", "address": "127.0.0.1:1", "node_credential": TEST_CREDENTIAL}
        return APIClient().post("/api/node/register", body, format="json")

    results = race(2, post)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r.status_code for r in results) == [200, 201]
    assert len({r.json()["id"] for r in results}) == 1


def test_heartbeat_racing_a_claim_keeps_the_new_reservation():
    """A heartbeat that does not list a fresh claim keeps its reservation, whichever commits first."""
    node = NodeFactory(total_vram=10 * GiB, available_vram=10 * GiB, worker_max_replicas_per_model=2)
    actions = iter(
        [
            lambda: claim_row(node_id=node.pk, model_name="m", vram_bytes=3 * GiB),
            lambda: services.node_heartbeat(node=node, available_vram=10 * GiB, replicas=[]),
        ]
    )
    lock = threading.Lock()

    def step():
        with lock:
            action = next(actions)
        return action()

    results = race(2, step)
    assert not [r for r in results if isinstance(r, Exception)], results
    node.refresh_from_db()
    assert node.reserved_vram == 3 * GiB
