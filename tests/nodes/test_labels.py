"""Labels and selectors (SCENARIOS 19–25)."""

from __future__ import annotations

import pytest

from nodes import services
from nodes.choices import LABEL_GPU_VENDOR, LABEL_REPLICA_SLOTS, NodeStatus, NodeType
from nodes.exceptions import InvalidValue
from nodes.models import NodeLabel
from nodes.selectors import node_labels
from tests.factories import NodeFactory, NodeLabelFactory, eligible_names

pytestmark = pytest.mark.django_db


def test_setting_a_label_again_replaces_its_value():
    node = NodeFactory()
    NodeLabelFactory(node=node, key="env", value="dev")
    services.node_labels_merge(node=node, labels={"env": "prod"})
    assert list(NodeLabel.objects.filter(node=node, key="env").values_list("value", flat=True)) == ["prod"]


def test_removing_a_label_keeps_the_others():
    node = NodeFactory()
    NodeLabelFactory(node=node, key="env", value="prod")
    NodeLabelFactory(node=node, key="region", value="eu")
    assert services.node_label_remove(node=node, key="env") is True
    labels = node_labels(node=node)
    assert "env" not in labels
    assert labels["region"] == "eu"


def test_removing_a_missing_label_answers_false():
    assert services.node_label_remove(node=NodeFactory(), key="nope") is False


def test_auto_labels_cannot_be_removed():
    with pytest.raises(InvalidValue):
        services.node_label_remove(node=NodeFactory(), key=LABEL_REPLICA_SLOTS)


def test_replace_drops_old_labels_and_keeps_replica_slots_current():
    node = NodeFactory(worker_max_replicas_per_model=1, max_replicas_override=3)
    NodeLabelFactory(node=node, key="old-key", value="x")
    labels = services.node_labels_replace(node=node, labels={"new-a": "1", "new-b": "2"})
    assert "old-key" not in labels
    assert labels["new-a"] == "1"
    assert labels["new-b"] == "2"
    assert labels[LABEL_REPLICA_SLOTS] == "3"
    assert node_labels(node=node) == labels


def test_merge_keeps_every_other_label():
    node = NodeFactory()
    NodeLabelFactory(node=node, key="env", value="prod")
    labels = services.node_labels_merge(node=node, labels={"tier": "fast"})
    assert labels["env"] == "prod"
    assert labels["tier"] == "fast"


@pytest.mark.parametrize("labels", [{"": "x"}, {"k" * 256: "x"}, {"k": "v" * 256}, {"k": 1}, ["k"]])
def test_bad_labels_are_refused(labels):
    with pytest.raises(InvalidValue):
        services.node_labels_merge(node=NodeFactory(), labels=labels)


def _label(node, **labels):
    for key, value in labels.items():
        NodeLabelFactory(node=node, key=key, value=value)
    return node


def test_selector_needs_every_key():
    n1 = _label(NodeFactory(), env="prod", region="us-east")
    _label(NodeFactory(), env="dev")
    assert eligible_names(selector={"env": "prod", "region": "us-east"}) == [n1.name]
    assert eligible_names(selector={"env": "qa"}) == []


def test_extra_labels_do_not_matter_and_an_empty_selector_matches_all():
    node = _label(NodeFactory(), env="prod", region="eu", tier="a")
    other = NodeFactory()
    assert eligible_names(selector={"env": "prod"}) == [node.name]
    assert eligible_names(selector={}) == sorted([node.name, other.name])
    assert eligible_names() == sorted([node.name, other.name])


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
def test_unschedulable_nodes_never_match(fields):
    _label(NodeFactory(**fields), env="prod")
    assert eligible_names(selector={"env": "prod"}) == []


def test_selector_matching_is_exact_and_a_missing_key_never_matches():
    _label(NodeFactory(), **{LABEL_GPU_VENDOR: "NVIDIA"})
    NodeFactory()
    assert eligible_names(selector={LABEL_GPU_VENDOR: "nvidia"}) == []
    assert eligible_names(selector={LABEL_GPU_VENDOR: ""}) == []
