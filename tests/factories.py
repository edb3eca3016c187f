"""factory-boy factories for the registry and the catalog."""

from __future__ import annotations

import factory
from django.utils import timezone

from audit.models import AuditEntry
from nodes.choices import AUTO_LABELS, LabelSource, NodeStatus, NodeType, ReplicaState
from nodes.models import ModelReplica, Node, NodeLabel
from nodes.tokens import token_hash
from scheduling.models import ModelConfig, SchedulingRule

GiB = 1024**3
# The node credential every factory node has: a test registers a factory node's name again with it.
TEST_CREDENTIAL = "test-node-credential-0123456789abcdef"


class NodeFactory(factory.django.DjangoModelFactory):
    """An approved, healthy backend node with a fresh heartbeat and no VRAM limit unless given."""

    class Meta:
        model = Node

    name = factory.Sequence(lambda n: f"node-{n}")
    node_type = NodeType.BACKEND
    address = factory.Sequence(lambda n: f"127.0.0.1:{40000 + n}")
    status = NodeStatus.HEALTHY
    approved_at = factory.LazyFunction(timezone.now)
    last_heartbeat = factory.LazyFunction(timezone.now)
    worker_max_replicas_per_model = 1
    credential_hash = token_hash(TEST_CREDENTIAL)
    backends = factory.LazyFunction(lambda: ["echo"])  # what every real agent offers


class NodeLabelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = NodeLabel

    node = factory.SubFactory(NodeFactory)
    key = factory.Sequence(lambda n: f"key-{n}")
    value = "value"
    source = factory.LazyAttribute(
        lambda label: LabelSource.AUTO if label.key in AUTO_LABELS else LabelSource.ADMIN
    )


class ReplicaFactory(factory.django.DjangoModelFactory):
    """A loaded replica (index 0 unless given)."""

    class Meta:
        model = ModelReplica

    node = factory.SubFactory(NodeFactory)
    model_name = "m"
    replica_index = 0
    state = ReplicaState.LOADED
    address = factory.Sequence(lambda n: f"127.0.0.1:{45000 + n}")
    loaded_at = factory.LazyFunction(timezone.now)
    last_seen_at = factory.LazyFunction(timezone.now)
    backend = "echo"


class ModelConfigFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelConfig
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"model-{n}")
    backend = "echo"
    model = ""
    options = factory.LazyFunction(dict)
    vram_bytes = 0


class RuleFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = SchedulingRule

    model_name = factory.Sequence(lambda n: f"model-{n}")
    node_selector = factory.LazyFunction(dict)
    min_replicas = 0
    max_replicas = 0


def claim_row(**kwargs):
    """`scheduling.pipeline.replica_claim`'s row, or None when the claim was refused (tests of the claim's
    bookkeeping; tests of why it refused read `replica_claim(...).refused`)."""
    from scheduling.pipeline import replica_claim

    return replica_claim(**kwargs).replica


def eligible_names(*, selector=None, model_name="m"):
    """Names of the nodes the pipeline's gate lets through for a model with this selector (approved, healthy,
    not draining, matching), by name."""
    from scheduling.pipeline import cluster_snapshot, gate

    return sorted(
        node.name for node in cluster_snapshot().nodes_for(model_name) if gate(node, selector or {}) is None
    )


class AuditEntryFactory(factory.django.DjangoModelFactory):
    """An audit entry: alice drained gpu-1 from a page (override any field; `at` defaults to now)."""

    class Meta:
        model = AuditEntry

    at = factory.LazyFunction(timezone.now)
    actor_kind = "user"
    actor_name = "alice"
    via = "page"
    action = "node.drain"
    target_type = "node"
    target_id = "id-1"
    target_name = "gpu-1"
    before = factory.LazyFunction(lambda: {"status": "healthy"})
    after = factory.LazyFunction(lambda: {"status": "draining"})
