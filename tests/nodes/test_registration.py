"""Registration (BEHAVIOUR §2, SCENARIOS 1–12 at the service level)."""

from __future__ import annotations

import pytest

from nodes import services
from nodes.choices import LABEL_GPU_VENDOR, LABEL_GPU_VRAM, LABEL_NODE_NAME, LABEL_REPLICA_SLOTS, NodeStatus
from nodes.exceptions import InvalidValue
from nodes.models import ModelReplica, Node
from nodes.selectors import node_labels
from nodes.tokens import node_token_for, node_token_matches
from tests.factories import TEST_CREDENTIAL, NodeFactory, NodeLabelFactory, ReplicaFactory

pytestmark = pytest.mark.django_db
GiB = 1024**3


def register(name: str = "w1", **fields):
    return services.node_register(
        name=name, **{"address": "127.0.0.1:50051", "node_credential": TEST_CREDENTIAL, **fields}
    )


def test_new_name_registers_pending_without_approval_and_gets_a_token(settings):
    settings.LOCALAI_AUTO_APPROVE_NODES = False
    result = register()
    node = Node.objects.get(name="w1")
    assert result.created
    assert node.status == NodeStatus.PENDING
    assert node.approved_at is None
    assert result.node_token
    assert node_token_matches(node, result.node_token)
    assert node.token_hash and result.node_token not in node.token_hash


def test_new_name_with_auto_approve_is_healthy_and_approved(settings):
    settings.LOCALAI_AUTO_APPROVE_NODES = True
    register()
    node = Node.objects.get(name="w1")
    assert node.status == NodeStatus.HEALTHY
    assert node.approved_at is not None


def test_pending_node_reregistering_keeps_id_takes_new_address_stays_pending():
    first = register(address="10.0.0.1:50051")
    second = register(address="10.0.0.2:50051")
    assert not second.created
    assert second.node.pk == first.node.pk
    node = Node.objects.get(name="w1")
    assert node.address == "10.0.0.2:50051"
    assert node.status == NodeStatus.PENDING
    assert Node.objects.filter(name="w1").count() == 1


@pytest.mark.parametrize("status", [NodeStatus.UNHEALTHY, NodeStatus.OFFLINE])
def test_approved_node_reregistering_becomes_healthy(settings, status):
    settings.LOCALAI_AUTO_APPROVE_NODES = False
    node = NodeFactory(name="w1", status=status)
    result = register()
    assert result.node.pk == node.pk
    node.refresh_from_db()
    assert node.status == NodeStatus.HEALTHY


def test_reregister_keeps_admin_labels_while_worker_labels_refresh():
    register(labels={"tier": "a", "gpu": "a100"})
    node = Node.objects.get(name="w1")
    services.node_labels_merge(node=node, labels={"owner": "ops"})
    register(labels={"tier": "b", "gpu": "a100"})
    labels = node_labels(node=node)
    assert labels["owner"] == "ops"
    assert labels["tier"] == "b"
    assert labels["gpu"] == "a100"


def test_register_without_cap_defaults_to_one_with_slots_label():
    register()
    node = Node.objects.get(name="w1")
    assert node.worker_max_replicas_per_model == 1
    assert node.effective_max_replicas == 1
    assert node_labels(node=node)[LABEL_REPLICA_SLOTS] == "1"


def test_register_writes_auto_labels():
    register(max_replicas_per_model=4, gpu_vendor="nvidia", total_vram=24 * GiB)
    labels = node_labels(node=Node.objects.get(name="w1"))
    assert labels[LABEL_REPLICA_SLOTS] == "4"
    assert labels[LABEL_GPU_VENDOR] == "nvidia"
    assert labels[LABEL_NODE_NAME] == "w1"
    assert labels[LABEL_GPU_VRAM] == "24GB"


def test_worker_cannot_set_auto_labels():
    register(max_replicas_per_model=2, labels={LABEL_REPLICA_SLOTS: "9", LABEL_NODE_NAME: "evil"})
    labels = node_labels(node=Node.objects.get(name="w1"))
    assert labels[LABEL_REPLICA_SLOTS] == "2"
    assert labels[LABEL_NODE_NAME] == "w1"


def test_node_without_gpu_has_no_gpu_labels():
    register(gpu_vendor="", total_vram=0)
    labels = node_labels(node=Node.objects.get(name="w1"))
    assert LABEL_GPU_VENDOR not in labels
    assert LABEL_GPU_VRAM not in labels


@pytest.mark.parametrize(
    ("total_vram", "bucket"),
    [
        (80 * GiB, "80GB+"),
        (50 * GiB, "48GB"),
        (24 * GiB, "24GB"),
        (20 * GiB, "16GB"),
        (12 * GiB, "8GB"),
        (8_000_000_000, "7GB"),
    ],
)
def test_gpu_vram_label_buckets(total_vram, bucket):
    register(total_vram=total_vram)
    assert node_labels(node=Node.objects.get(name="w1"))[LABEL_GPU_VRAM] == bucket


def test_override_survives_reregistration_and_worker_value_is_stored():
    register(max_replicas_per_model=1)
    node = Node.objects.get(name="w1")
    services.node_override_set(node=node, value=4)
    register(max_replicas_per_model=1)
    node.refresh_from_db()
    assert node.max_replicas_override == 4
    assert node.worker_max_replicas_per_model == 1
    assert node.effective_max_replicas == 4
    assert node_labels(node=node)[LABEL_REPLICA_SLOTS] == "4"


def test_reregister_removes_every_replica_row_even_the_listed_ones():
    # Their backends were started with the previous backend token, which the new registration replaces:
    # the rows go, and processes the agent still runs become orphans of its next heartbeats.
    node = NodeFactory(name="w1", worker_max_replicas_per_model=2)
    ReplicaFactory(node=node, model_name="m", replica_index=0)
    ReplicaFactory(node=node, model_name="m", replica_index=1)
    register(max_replicas_per_model=2, replicas=["m#1"])
    assert not ModelReplica.objects.filter(node=node).exists()


def test_reregister_resets_reservation():
    node = NodeFactory(name="w1", reserved_vram=5 * GiB)
    register()
    node.refresh_from_db()
    assert node.reserved_vram == 0


def test_reregister_issues_a_new_token_and_revokes_the_old_one():
    first = register()
    second = register()
    node = Node.objects.get(name="w1")
    assert first.node_token != second.node_token
    assert node_token_for(node) == second.node_token
    assert node_token_matches(node, second.node_token)
    assert not node_token_matches(node, first.node_token)


def test_register_keeps_labels_admins_added_with_factory():
    node = NodeFactory(name="w1")
    NodeLabelFactory(node=node, key="rack", value="r1")
    register(labels={"zone": "z"})
    assert node_labels(node=node)["rack"] == "r1"


@pytest.mark.parametrize("cap", [0, -1])
def test_register_refuses_a_cap_below_one(cap):
    with pytest.raises(InvalidValue) as error:
        register(max_replicas_per_model=cap)
    assert error.value.field == "max_replicas_per_model"
    assert not Node.objects.exists()


def test_register_sends_capacity_changed(capacity_events, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        register()
    assert len(capacity_events) == 1
