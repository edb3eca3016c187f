"""Node identity (issue 11, item 1) and admin intent (item 2) at the service level: a known name must prove
it is the same agent; backend tokens rotate; an admin's drain and labels outlive the worker's word."""

from __future__ import annotations

import pytest

from nodes import services
from nodes.choices import LabelSource, NodeStatus
from nodes.exceptions import NameTaken
from nodes.models import ModelReplica, Node, NodeLabel
from nodes.selectors import node_labels
from nodes.tokens import (
    BACKEND_TOKEN_CACHE_SIZE,
    _hmac_token,
    backend_token,
    backend_token_for,
    node_token_for,
    token_hash,
)
from scheduling.pipeline import selector_matches
from tests.factories import TEST_CREDENTIAL, NodeFactory, ReplicaFactory

pytestmark = pytest.mark.django_db
OTHER_CREDENTIAL = "another-agent-credential-0123456789abcdef"


def register(name: str = "w1", **fields):
    return services.node_register(name=name, **{"address": "10.0.0.1:50051", **fields})


def snapshot(node: Node) -> dict:
    node.refresh_from_db()
    fields = {f.attname: getattr(node, f.attname) for f in Node._meta.concrete_fields}
    labels = sorted(NodeLabel.objects.filter(node=node).values_list("key", "value", "source"))
    replicas = sorted(ModelReplica.objects.filter(node=node).values_list("pk", flat=True))
    return {"fields": fields, "labels": labels, "replicas": replicas}


@pytest.mark.parametrize(
    "proof",
    [
        {},
        {"node_credential": OTHER_CREDENTIAL},
        {"node_token": "made-up"},
        {"node_credential": OTHER_CREDENTIAL, "node_token": "made-up"},
    ],
    ids=["nothing", "another-credential", "wrong-token", "both-wrong"],
)
def test_known_name_without_its_proof_is_refused_and_nothing_changes(proof):
    node = NodeFactory(name="w1", address="10.0.0.1:50051", gpu_vendor="nvidia")
    services.node_labels_merge(node=node, labels={"owner": "ops"})
    ReplicaFactory(node=node, model_name="m")
    before = snapshot(node)
    with pytest.raises(
        NameTaken, match="node w1 is registered by another agent; delete it first or present its"
    ):
        register(address="6.6.6.6:50051", labels={"owner": "evil", "x": "y"}, gpu_vendor="evil", **proof)
    assert snapshot(node) == before


def test_known_name_with_its_credential_keeps_approval_even_at_a_new_address(settings):
    settings.LOCALAI_AUTO_APPROVE_NODES = False
    node = NodeFactory(name="w1", address="10.0.0.1:50051")
    result = register(address="10.0.0.9:50051", node_credential=TEST_CREDENTIAL)
    assert result.node.pk == node.pk
    node.refresh_from_db()
    assert (node.address, node.status) == ("10.0.0.9:50051", NodeStatus.HEALTHY)
    assert node.approved_at is not None


def test_current_node_token_proves_the_name_but_a_move_needs_approval_again(settings):
    settings.LOCALAI_AUTO_APPROVE_NODES = False
    first = register(node_credential=TEST_CREDENTIAL)
    services.node_approve(node=first.node)
    same_place = register(node_token=first.node_token)
    assert same_place.node.status == NodeStatus.HEALTHY
    moved = register(address="10.0.0.9:50051", node_token=same_place.node_token)
    node = Node.objects.get(name="w1")
    assert moved.node.pk == node.pk
    assert node.address == "10.0.0.9:50051"
    assert (node.status, node.approved_at) == (NodeStatus.PENDING, None)


def test_a_previous_node_token_is_no_proof():
    first = register()
    register(node_token=first.node_token)
    with pytest.raises(NameTaken):
        register(node_token=first.node_token)


def test_a_wrong_credential_is_refused_even_with_the_right_token():
    first = register(node_credential=TEST_CREDENTIAL)
    with pytest.raises(NameTaken):
        register(node_credential=OTHER_CREDENTIAL, node_token=first.node_token)


def test_a_node_without_credential_adopts_one_proved_by_its_token():
    first = register()
    assert Node.objects.get(name="w1").credential_hash == ""
    register(node_token=first.node_token, node_credential=TEST_CREDENTIAL)
    assert Node.objects.get(name="w1").credential_hash == token_hash(TEST_CREDENTIAL)
    register(node_credential=TEST_CREDENTIAL)


def test_new_name_records_only_the_hash_of_its_credential():
    register(node_credential=TEST_CREDENTIAL)
    stored = Node.objects.get(name="w1").credential_hash
    assert stored == token_hash(TEST_CREDENTIAL)
    assert TEST_CREDENTIAL not in stored


def test_admin_delete_hands_the_name_over_to_a_fresh_registration(settings):
    settings.LOCALAI_AUTO_APPROVE_NODES = False
    node = NodeFactory(name="w1")
    services.node_delete(node=node)
    result = register(node_credential=OTHER_CREDENTIAL)
    assert result.created and result.node.pk != node.pk
    assert (result.node.status, result.node.approved_at) == (NodeStatus.PENDING, None)


def test_backend_token_rotates_with_every_registration():
    first = register(node_credential=TEST_CREDENTIAL)
    old_backend_token = backend_token_for(first.node)
    second = register(node_credential=TEST_CREDENTIAL)
    node = Node.objects.get(name="w1")
    assert backend_token_for(node) == backend_token_for(second.node) != old_backend_token
    assert backend_token_for(node) != node_token_for(node)


def uncached_backend_token(node: Node) -> str:
    return _hmac_token(f"backend-token:{node.id}:{node.token_salt}")


def test_a_new_salt_gives_the_new_backend_token_at_once_though_tokens_are_cached():
    first = register(node_credential=TEST_CREDENTIAL).node
    backend_token.cache_clear()
    old = backend_token_for(first)
    assert backend_token(first.id, first.token_salt) == old == uncached_backend_token(first)
    assert backend_token.cache_info().hits >= 1  # the second ask was answered from the cache
    second = register(node_credential=TEST_CREDENTIAL).node  # re-registration: a new salt
    assert second.token_salt != first.token_salt
    assert backend_token(second.id, second.token_salt) == uncached_backend_token(second) != old


def test_the_backend_token_cache_is_bounded():
    backend_token.cache_clear()
    node = NodeFactory()
    for salt in range(BACKEND_TOKEN_CACHE_SIZE + 10):
        backend_token(node.id, str(salt))
    assert backend_token.cache_info().currsize == BACKEND_TOKEN_CACHE_SIZE
    backend_token.cache_clear()


def test_a_secret_key_change_empties_the_backend_token_cache(settings):
    node = NodeFactory()
    before = backend_token_for(node)
    settings.SECRET_KEY = "another-secret-key-for-this-test-0123456789abcdefghijklmnop"
    assert backend_token_for(node) == uncached_backend_token(node) != before


# --- admin intent -----------------------------------------------------------------------------------------


def test_admin_drain_survives_reregistration_until_resumed():
    node = NodeFactory(name="w1")
    services.node_drain(node=node)
    register(node_credential=TEST_CREDENTIAL)
    node.refresh_from_db()
    assert (node.status, node.drained_by_admin) == (NodeStatus.DRAINING, True)
    services.node_resume(node=node)
    register(node_credential=TEST_CREDENTIAL)
    node.refresh_from_db()
    assert (node.status, node.drained_by_admin) == (NodeStatus.HEALTHY, False)


def test_the_agents_own_drain_ends_with_its_deregistration():
    node = NodeFactory(name="w1")
    services.node_drain(node=node, by_admin=False)
    services.node_deregister(node=node)
    register(node_credential=TEST_CREDENTIAL)
    node.refresh_from_db()
    assert (node.status, node.drained_by_admin) == (NodeStatus.HEALTHY, False)


def test_admin_drain_survives_going_offline_and_heartbeating_again():
    node = NodeFactory(name="w1")
    services.node_drain(node=node)
    services.node_drain(node=node, by_admin=False)  # the agent's own drain on SIGTERM changes nothing
    Node.objects.filter(pk=node.pk).update(status=NodeStatus.OFFLINE)
    services.node_heartbeat(node=node)
    node.refresh_from_db()
    assert node.status == NodeStatus.DRAINING


def test_an_admin_drain_of_a_self_draining_node_is_kept():
    node = NodeFactory(name="w1")
    services.node_drain(node=node, by_admin=False)
    services.node_drain(node=node)
    register(node_credential=TEST_CREDENTIAL)
    node.refresh_from_db()
    assert node.status == NodeStatus.DRAINING


def test_admin_label_wins_over_the_worker_label_of_the_same_key_and_worker_keys_refresh():
    register(node_credential=TEST_CREDENTIAL, labels={"tier": "a", "zone": "z1", "old": "x"})
    node = Node.objects.get(name="w1")
    services.node_labels_merge(node=node, labels={"tier": "gold"})
    register(node_credential=TEST_CREDENTIAL, labels={"tier": "b", "zone": "z2"})
    labels = node_labels(node=node)
    assert labels["tier"] == "gold"
    assert labels["zone"] == "z2"
    assert "old" not in labels
    sources = dict(NodeLabel.objects.filter(node=node).values_list("key", "source"))
    assert sources["tier"] == LabelSource.ADMIN
    assert sources["zone"] == LabelSource.WORKER
    assert sources["node.name"] == LabelSource.AUTO
    # Selectors match the effective labels: the admin's.
    assert selector_matches(node_labels(node=node), {"tier": "gold"})
    assert not selector_matches(node_labels(node=node), {"tier": "b"})


def test_an_admin_label_removed_goes_back_to_the_worker_at_its_next_registration():
    register(node_credential=TEST_CREDENTIAL, labels={"tier": "a"})
    node = Node.objects.get(name="w1")
    services.node_labels_merge(node=node, labels={"tier": "gold"})
    services.node_label_remove(node=node, key="tier")
    register(node_credential=TEST_CREDENTIAL, labels={"tier": "b"})
    assert NodeLabel.objects.get(node=node, key="tier").source == LabelSource.WORKER
    assert node_labels(node=node)["tier"] == "b"


def test_admin_replace_makes_every_label_the_admins():
    register(node_credential=TEST_CREDENTIAL, labels={"zone": "z1"})
    node = Node.objects.get(name="w1")
    services.node_labels_replace(node=node, labels={"zone": "z9"})
    register(node_credential=TEST_CREDENTIAL, labels={"zone": "z2"})
    assert node_labels(node=node)["zone"] == "z9"


def test_admin_merges_cannot_take_a_node_past_256_labels():
    from nodes.exceptions import InvalidValue

    node = NodeFactory(name="w1")
    services.node_labels_merge(node=node, labels={f"a{i}": "v" for i in range(200)})
    with pytest.raises(InvalidValue, match="at most 256"):
        services.node_labels_merge(node=node, labels={f"b{i}": "v" for i in range(57)})
    assert NodeLabel.objects.filter(node=node, key__startswith="b").count() == 0
    services.node_labels_merge(node=node, labels={f"b{i}": "v" for i in range(56)})
