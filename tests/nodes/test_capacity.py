"""Capacity, replica slots and the replica lifecycle (SCENARIOS 26–35)."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from nodes import services
from nodes.choices import LABEL_REPLICA_SLOTS, NodeStatus, NodeType, ReplicaState
from nodes.models import ModelReplica
from nodes.selectors import node_labels
from scheduling import pipeline
from scheduling.choices import Verdict
from tests.factories import NodeFactory, NodeLabelFactory, ReplicaFactory, claim_row


def cluster_capacity(*, model_name, selector=None, node_ids=None):
    """Free slots for the model over the nodes the pipeline's gate lets through (the reconciler's sum)."""
    nodes = pipeline.cluster_snapshot().nodes_for(model_name)
    return sum(
        node.free_slots
        for node in nodes
        if pipeline.gate(node, selector or {}) is None and (node_ids is None or node.id in node_ids)
    )


def node_free_slots(*, node, model_name):
    return next(n.free_slots for n in pipeline.cluster_snapshot().nodes_for(model_name) if n.id == node.pk)


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


def test_the_snapshot_is_four_queries_whatever_the_cluster(django_assert_num_queries):
    for index in range(5):
        ReplicaFactory(node=NodeFactory(worker_max_replicas_per_model=2), model_name=f"m{index}")
    with django_assert_num_queries(4):
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


def test_replicas_of_one_model_are_independent_rows():
    node = NodeFactory(worker_max_replicas_per_model=2)
    r0 = ReplicaFactory(node=node, replica_index=0)
    r1 = ReplicaFactory(node=node, replica_index=1)
    assert r0.pk != r1.pk and r0.address != r1.address
    ModelReplica.objects.filter(pk=r1.pk).update(in_flight=2)
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
    monkeypatch.setattr(pipeline, "_free_indexes", lambda cap, taken: [1, 2])
    replica = claim_row(node_id=node.pk, model_name="m")
    assert replica is not None and replica.replica_index == 2


def test_claim_that_loses_every_slot_answers_none(monkeypatch):
    node = NodeFactory(worker_max_replicas_per_model=3)
    ReplicaFactory(node=node, replica_index=1)
    monkeypatch.setattr(pipeline, "_free_indexes", lambda cap, taken: [1])
    claim = pipeline.replica_claim(node_id=node.pk, model_name="m")
    assert claim.replica is None and claim.refused.verdict == Verdict.NO_FREE_SLOT
    assert ModelReplica.objects.count() == 1


def test_claim_inserts_a_loading_row_at_the_lowest_free_index():
    node = NodeFactory(worker_max_replicas_per_model=3)
    ReplicaFactory(node=node, replica_index=0)
    replica = claim_row(node_id=node.pk, model_name="m", backend="echo")
    assert (replica.replica_index, replica.state, replica.backend) == (1, ReplicaState.LOADING, "echo")
    assert replica.load_started_at is not None


def test_claim_on_a_full_node_answers_none():
    node = NodeFactory(worker_max_replicas_per_model=1)
    ReplicaFactory(node=node)
    assert claim_row(node_id=node.pk, model_name="m") is None


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
    assert claim_row(node_id=node.pk, model_name="m") is None


def test_claim_rechecks_the_selector():
    node = NodeFactory()
    NodeLabelFactory(node=node, key="env", value="dev")
    assert claim_row(node_id=node.pk, model_name="m", selector={"env": "prod"}) is None
    assert claim_row(node_id=node.pk, model_name="m", selector={"env": "dev"}) is not None


def test_claim_on_a_deleted_node_answers_none():
    node = NodeFactory()
    node_id = node.pk
    node.delete()
    assert claim_row(node_id=node_id, model_name="m") is None


def test_mark_loaded_keeps_the_row():
    node = NodeFactory()
    replica = claim_row(node_id=node.pk, model_name="m")
    assert services.replica_mark_loaded(replica_id=replica.pk, address="127.0.0.1:9000")
    row = ModelReplica.objects.get(pk=replica.pk)
    assert (row.state, row.address) == (ReplicaState.LOADED, "127.0.0.1:9000")
    assert row.loaded_at is not None


def test_mark_loaded_of_a_removed_row_answers_false():
    node = NodeFactory()
    replica = claim_row(node_id=node.pk, model_name="m")
    services.replica_remove(replica_id=replica.pk)
    assert not services.replica_mark_loaded(replica_id=replica.pk, address="127.0.0.1:9000")


def test_mark_loaded_of_many_rows_answers_the_rows_it_changed():
    node = NodeFactory(worker_max_replicas_per_model=4)
    kept, removed, downloading, loaded = (claim_row(node_id=node.pk, model_name="m") for _ in range(4))
    services.replica_remove(replica_id=removed.pk)
    ModelReplica.objects.filter(pk=downloading.pk).update(state=ReplicaState.DOWNLOADING)
    ModelReplica.objects.filter(pk=loaded.pk).update(state=ReplicaState.LOADED, address="127.0.0.1:1")
    rows = [
        (kept.pk, "127.0.0.1:9000"),
        (removed.pk, "x"),
        (downloading.pk, "127.0.0.1:9001"),
        (loaded.pk, "y"),
    ]
    assert services.replicas_mark_loaded(loaded=rows) == {kept.pk, downloading.pk}
    assert dict(ModelReplica.objects.values_list("pk", "address")) == {
        kept.pk: "127.0.0.1:9000",
        downloading.pk: "127.0.0.1:9001",
        loaded.pk: "127.0.0.1:1",
    }
    assert set(ModelReplica.objects.values_list("state", flat=True)) == {ReplicaState.LOADED}
    assert ModelReplica.objects.filter(loaded_at=None).count() == 1  # the row already loaded is left alone
    assert services.replicas_mark_loaded(loaded=[]) == set()


def test_remove_of_a_missing_replica_answers_none():
    assert services.replica_remove(replica_id=123456789) is None
