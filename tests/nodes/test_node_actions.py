"""Approve, drain, resume, deregister, admin delete, and the capacity events they send (SCENARIOS 16–18)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from nodes import services
from nodes.choices import NodeStatus
from nodes.exceptions import InvalidTransition
from nodes.models import ModelReplica, Node, NodeLabel
from nodes.selectors import node_labels
from nodes.tokens import node_token_for
from scheduling.models import SchedulingRule
from tests.factories import (
    TEST_CREDENTIAL,
    NodeFactory,
    NodeLabelFactory,
    ReplicaFactory,
    RuleFactory,
    eligible_names,
)

pytestmark = pytest.mark.django_db


def test_approve_makes_a_pending_node_healthy_and_approved():
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    services.node_approve(node=node)
    node.refresh_from_db()
    assert node.status == NodeStatus.HEALTHY
    assert node.approved_at is not None


@pytest.mark.parametrize("status", [NodeStatus.HEALTHY, NodeStatus.DRAINING, NodeStatus.OFFLINE])
def test_approve_refuses_a_node_that_is_not_pending(status):
    node = NodeFactory(status=status)
    approved_at = node.approved_at
    with pytest.raises(InvalidTransition):
        services.node_approve(node=node)
    node.refresh_from_db()
    assert node.status == status
    assert node.approved_at == approved_at


def test_drain_then_resume():
    node = NodeFactory()
    services.node_drain(node=node)
    node.refresh_from_db()
    assert node.status == NodeStatus.DRAINING
    assert node.name not in eligible_names()
    services.node_resume(node=node)
    node.refresh_from_db()
    assert node.status == NodeStatus.HEALTHY
    assert node.name in eligible_names()


def test_drain_is_idempotent():
    node = NodeFactory(status=NodeStatus.DRAINING)
    assert services.node_drain(node=node).status == NodeStatus.DRAINING


def test_drain_refuses_a_node_never_approved():
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    with pytest.raises(InvalidTransition):
        services.node_drain(node=node)
    node.refresh_from_db()
    assert node.status == NodeStatus.PENDING


@pytest.mark.parametrize("status", [NodeStatus.PENDING, NodeStatus.HEALTHY, NodeStatus.OFFLINE])
def test_resume_only_from_draining(status):
    node = NodeFactory(status=status, approved_at=None if status == NodeStatus.PENDING else timezone.now())
    with pytest.raises(InvalidTransition):
        services.node_resume(node=node)
    node.refresh_from_db()
    assert node.status == status


def test_worker_deregister_keeps_node_approval_labels_and_override():
    node = NodeFactory(max_replicas_override=3, reserved_vram=100)
    NodeLabelFactory(node=node, key="env", value="prod")
    ReplicaFactory(node=node)
    services.node_deregister(node=node)
    node.refresh_from_db()
    assert node.status == NodeStatus.OFFLINE
    assert node.approved_at is not None
    assert node.max_replicas_override == 3
    assert node.reserved_vram == 0
    assert node_labels(node=node)["env"] == "prod"
    assert not ModelReplica.objects.filter(node=node).exists()


def test_deregistered_node_registers_again_as_the_same_healthy_node():
    node = NodeFactory(name="w1")
    services.node_deregister(node=node)
    result = services.node_register(name="w1", address="127.0.0.1:1", node_credential=TEST_CREDENTIAL)
    assert result.node.pk == node.pk
    assert result.node.status == NodeStatus.HEALTHY


def test_admin_delete_removes_node_labels_replicas_and_stops_processes(
    fake_agent, django_capture_on_commit_callbacks
):
    node = NodeFactory(address=fake_agent.address)
    token = node_token_for(node)
    NodeLabelFactory(node=node, key="owner", value="ops")
    ReplicaFactory(node=node, model_name="m", replica_index=0)
    ReplicaFactory(node=node, model_name="n", replica_index=0)
    with django_capture_on_commit_callbacks(execute=True):
        keys = services.node_delete(node=node)
    assert keys == ["m#0", "n#0"]
    assert not Node.objects.filter(pk=node.pk).exists()
    assert not NodeLabel.objects.filter(node_id=node.pk).exists()
    assert not ModelReplica.objects.filter(node_id=node.pk).exists()
    assert sorted(fake_agent.stopped) == ["m#0", "n#0"]
    assert set(fake_agent.tokens) == {token}


def test_admin_delete_with_an_unreachable_agent_still_deletes(django_capture_on_commit_callbacks):
    from tests.conftest import free_port

    node = NodeFactory(address=f"127.0.0.1:{free_port()}")
    ReplicaFactory(node=node)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.node_delete(node=node) == ["m#0"]
    assert not Node.objects.filter(pk=node.pk).exists()


def test_stop_on_agent_stops_exactly_one_key(fake_agent):
    node = NodeFactory(address=fake_agent.address)
    assert services.replica_stop_on_agent(node=node, process_key="m#1") == ["m#1"]
    assert fake_agent.stopped == ["m#1"]


def _trip_all_breakers():
    RuleFactory(
        model_name="a", unsatisfiable_ticks=3, unsatisfiable_until=timezone.now() + timedelta(minutes=5)
    )
    RuleFactory(model_name="b", unsatisfiable_ticks=1)


@pytest.mark.parametrize(
    "event",
    [
        "register",
        "approve",
        "drain",
        "resume",
        "deregister",
        "delete",
        "labels_replace",
        "labels_merge",
        "label_remove",
        "override_set",
        "override_reset",
    ],
)
def test_every_capacity_event_clears_all_breakers(event, django_capture_on_commit_callbacks):
    pending = NodeFactory(name="p", status=NodeStatus.PENDING, approved_at=None, address="")
    draining = NodeFactory(name="d", status=NodeStatus.DRAINING, max_replicas_override=2, address="")
    NodeLabelFactory(node=draining, key="env", value="x")
    actions = {
        "register": lambda: services.node_register(name="new", address="127.0.0.1:1"),
        "approve": lambda: services.node_approve(node=pending),
        "drain": lambda: services.node_drain(node=NodeFactory(address="")),
        "resume": lambda: services.node_resume(node=draining),
        "deregister": lambda: services.node_deregister(node=draining),
        "delete": lambda: services.node_delete(node=draining),
        "labels_replace": lambda: services.node_labels_replace(node=draining, labels={"a": "b"}),
        "labels_merge": lambda: services.node_labels_merge(node=draining, labels={"a": "b"}),
        "label_remove": lambda: services.node_label_remove(node=draining, key="env"),
        "override_set": lambda: services.node_override_set(node=draining, value=5),
        "override_reset": lambda: services.node_override_reset(node=draining),
    }
    _trip_all_breakers()
    with django_capture_on_commit_callbacks(execute=True):
        actions[event]()
    assert list(SchedulingRule.objects.values_list("unsatisfiable_ticks", "unsatisfiable_until")) == [
        (0, None),
        (0, None),
    ]


def test_capacity_event_is_sent_only_on_commit(capacity_events, django_capture_on_commit_callbacks):
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.node_approve(node=node)
    assert capacity_events == []
    for callback in callbacks:
        callback()
    assert len(capacity_events) == 1


def test_a_failed_transition_sends_no_event(capacity_events, django_capture_on_commit_callbacks):
    node = NodeFactory()
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(InvalidTransition):
        services.node_approve(node=node)
    assert capacity_events == []
