"""Capacity, replica slots and the replica lifecycle (SCENARIOS 26–35)."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from nodes import selectors, services
from nodes.choices import LABEL_REPLICA_SLOTS, NodeStatus, NodeType, ReplicaState
from nodes.models import ModelReplica
from nodes.selectors import cluster_capacity, lowest_free_replica_index, node_free_slots, node_labels
from tests.factories import NodeFactory, NodeLabelFactory, ReplicaFactory

pytestmark = pytest.mark.django_db


def test_cluster_capacity_worked_example():
    n1 = NodeFactory(worker_max_replicas_per_model=4)
    n2 = NodeFactory(worker_max_replicas_per_model=2)
    n3 = NodeFactory(worker_max_replicas_per_model=1)
    ReplicaFactory(node=n1, model_name="m")
    ReplicaFactory(node=n3, model_name="m")
    ReplicaFactory(node=n2, model_name="other")  # another model does not count
    assert cluster_capacity(model_name="m") == 5
    assert cluster_capacity(model_name="m", node_ids=[n2.pk, n3.pk]) == 2
    for node in (n2, n3):
        NodeLabelFactory(node=node, key="pool", value="small")
    assert cluster_capacity(model_name="m", selector={"pool": "small"}) == 2


def test_cluster_capacity_is_one_query(django_assert_num_queries):
    for _ in range(5):
        NodeFactory(worker_max_replicas_per_model=2)
    with django_assert_num_queries(1):
        assert cluster_capacity(model_name="m", selector={"node.name": "x"}) == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"status": NodeStatus.PENDING, "approved_at": None},
        {"status": NodeStatus.DRAINING},
        {"status": NodeStatus.UNHEALTHY},
        {"status": NodeStatus.OFFLINE},
        {"node_type": NodeType.AGENT},
    ],
)
def test_unschedulable_nodes_add_no_capacity(fields):
    NodeFactory(worker_max_replicas_per_model=4, **fields)
    assert cluster_capacity(model_name="m") == 0


def test_a_load_in_progress_takes_a_slot():
    node = NodeFactory(worker_max_replicas_per_model=2)
    ReplicaFactory(node=node, replica_index=0, state=ReplicaState.LOADING)
    ReplicaFactory(node=node, replica_index=1, state=ReplicaState.LOADED)
    assert node_free_slots(node=node, model_name="m") == 0


def test_lowering_the_cap_clamps_free_slots_at_zero_and_evicts_nothing():
    node = NodeFactory(worker_max_replicas_per_model=4)
    for index in range(4):
        ReplicaFactory(node=node, replica_index=index)
    services.node_override_set(node=node, value=2)
    node.refresh_from_db()
    assert node_free_slots(node=node, model_name="m") == 0
    assert cluster_capacity(model_name="m") == 0
    assert ModelReplica.objects.filter(node=node).count() == 4


def test_override_reset_falls_back_at_once():
    node = NodeFactory(worker_max_replicas_per_model=1, max_replicas_override=4)
    services.node_override_reset(node=node)
    node.refresh_from_db()
    assert node.max_replicas_override is None
    assert node.effective_max_replicas == 1
    assert node_labels(node=node)[LABEL_REPLICA_SLOTS] == "1"


def test_override_set_adds_slots_at_once():
    node = NodeFactory(worker_max_replicas_per_model=1)
    ReplicaFactory(node=node)
    services.node_override_set(node=node, value=3)
    node.refresh_from_db()
    assert node_labels(node=node)[LABEL_REPLICA_SLOTS] == "3"
    assert node_free_slots(node=node, model_name="m") == 2


@pytest.mark.parametrize("value", [0, -1, True, "2"])
def test_override_must_be_at_least_one(value):
    from nodes.exceptions import InvalidValue

    with pytest.raises(InvalidValue):
        services.node_override_set(node=NodeFactory(), value=value)


def test_lowest_free_replica_index():
    node = NodeFactory(worker_max_replicas_per_model=4)
    assert lowest_free_replica_index(node=node, model_name="m") == 0
    ReplicaFactory(node=node, replica_index=0)
    ReplicaFactory(node=node, replica_index=2)
    assert lowest_free_replica_index(node=node, model_name="m") == 1
    ReplicaFactory(node=node, replica_index=1)
    ReplicaFactory(node=node, replica_index=3)
    assert lowest_free_replica_index(node=node, model_name="m") is None


def test_replicas_of_one_model_are_independent_rows():
    node = NodeFactory(worker_max_replicas_per_model=2)
    r0 = ReplicaFactory(node=node, replica_index=0)
    r1 = ReplicaFactory(node=node, replica_index=1)
    assert r0.pk != r1.pk and r0.address != r1.address
    assert services.replica_in_flight_claim(replica_id=r1.pk)
    assert services.replica_in_flight_claim(replica_id=r1.pk)
    assert services.replica_remove(replica_id=r0.pk).pk == r0.pk
    r1_after = ModelReplica.objects.get(pk=r1.pk)
    assert (r1_after.address, r1_after.in_flight) == (r1.address, 2)


def test_database_rejects_a_second_row_for_the_same_slot():
    node = NodeFactory()
    first = ReplicaFactory(node=node, replica_index=0, address="127.0.0.1:1")
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelReplica.objects.create(node=node, model_name="m", replica_index=0, address="127.0.0.1:2")
    first.refresh_from_db()
    assert first.address == "127.0.0.1:1"
    assert ModelReplica.objects.count() == 1


def test_claim_that_loses_a_slot_takes_the_next_index(monkeypatch):
    """A unique violation at insert (another scheduler took the slot) becomes the next index, not an error."""
    node = NodeFactory(worker_max_replicas_per_model=3)
    ReplicaFactory(node=node, replica_index=1)
    # As if the index had been computed before the other scheduler's row appeared.
    monkeypatch.setattr(services, "free_replica_indexes", lambda *, cap, taken: [1, 2])
    replica = services.replica_claim_slot(node_id=node.pk, model_name="m")
    assert replica is not None and replica.replica_index == 2


def test_claim_that_loses_every_slot_answers_none(monkeypatch):
    node = NodeFactory(worker_max_replicas_per_model=3)
    ReplicaFactory(node=node, replica_index=1)
    monkeypatch.setattr(services, "free_replica_indexes", lambda *, cap, taken: [1])
    assert services.replica_claim_slot(node_id=node.pk, model_name="m") is None
    assert ModelReplica.objects.count() == 1


def test_claim_inserts_a_loading_row_at_the_lowest_free_index():
    node = NodeFactory(worker_max_replicas_per_model=3)
    ReplicaFactory(node=node, replica_index=0)
    replica = services.replica_claim_slot(node_id=node.pk, model_name="m", backend="echo")
    assert (replica.replica_index, replica.state, replica.backend) == (1, ReplicaState.LOADING, "echo")
    assert replica.load_started_at is not None


def test_claim_on_a_full_node_answers_none():
    node = NodeFactory(worker_max_replicas_per_model=1)
    ReplicaFactory(node=node)
    assert services.replica_claim_slot(node_id=node.pk, model_name="m") is None


@pytest.mark.parametrize(
    "fields",
    [
        {"status": NodeStatus.PENDING, "approved_at": None},
        {"status": NodeStatus.DRAINING},
        {"node_type": NodeType.AGENT},
    ],
)
def test_claim_on_an_unschedulable_node_answers_none(fields):
    node = NodeFactory(**fields)
    assert services.replica_claim_slot(node_id=node.pk, model_name="m") is None


def test_claim_rechecks_the_selector():
    node = NodeFactory()
    NodeLabelFactory(node=node, key="env", value="dev")
    assert services.replica_claim_slot(node_id=node.pk, model_name="m", selector={"env": "prod"}) is None
    assert services.replica_claim_slot(node_id=node.pk, model_name="m", selector={"env": "dev"}) is not None


def test_claim_on_a_deleted_node_answers_none():
    node = NodeFactory()
    node_id = node.pk
    node.delete()
    assert services.replica_claim_slot(node_id=node_id, model_name="m") is None


def test_mark_loaded_keeps_the_row():
    node = NodeFactory()
    replica = services.replica_claim_slot(node_id=node.pk, model_name="m")
    assert services.replica_mark_loaded(replica_id=replica.pk, address="127.0.0.1:9000")
    row = ModelReplica.objects.get(pk=replica.pk)
    assert (row.state, row.address) == (ReplicaState.LOADED, "127.0.0.1:9000")
    assert row.loaded_at is not None


def test_mark_loaded_of_a_removed_row_answers_false():
    node = NodeFactory()
    replica = services.replica_claim_slot(node_id=node.pk, model_name="m")
    services.replica_remove(replica_id=replica.pk)
    assert not services.replica_mark_loaded(replica_id=replica.pk, address="127.0.0.1:9000")


def test_in_flight_claim_needs_a_loaded_replica():
    loading = ReplicaFactory(state=ReplicaState.LOADING)
    assert not services.replica_in_flight_claim(replica_id=loading.pk)
    loaded = ReplicaFactory()
    assert services.replica_in_flight_claim(replica_id=loaded.pk)
    loaded.refresh_from_db()
    assert loaded.in_flight == 1 and loaded.last_used is not None


def test_in_flight_release_never_goes_negative():
    replica = ReplicaFactory(in_flight=1)
    services.replica_in_flight_release(replica_id=replica.pk)
    services.replica_in_flight_release(replica_id=replica.pk)
    replica.refresh_from_db()
    assert replica.in_flight == 0


def test_remove_of_a_missing_replica_answers_none():
    assert services.replica_remove(replica_id=123456789) is None


def test_free_replica_indexes_is_pure():
    assert selectors.free_replica_indexes(cap=4, taken=[0, 2]) == [1, 3]
    assert selectors.free_replica_indexes(cap=2, taken=[0, 1, 5]) == []
