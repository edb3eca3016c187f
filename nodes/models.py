from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from nodes.choices import LabelSource, NodeStatus, NodeType, ReplicaState

# The one spelling of a replica's process key, `<model>#<index>`, shared with the agent.
from worker_client.agent.keys import process_key as process_key


class Node(models.Model):
    """One worker agent. `name` names it, but only its credential proves it: a registration of a known name
    must present `credential_hash`'s secret (the agent's state file) or the current node token. Approval is
    kept apart from status so a pending node that goes stale and comes back is still pending;
    `drained_by_admin` keeps an admin's drain across the agent's re-registrations."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255, unique=True)
    node_type = models.CharField(max_length=16, choices=NodeType.choices, default=NodeType.BACKEND)
    address = models.CharField(max_length=255, blank=True, default="")
    status = models.CharField(max_length=16, choices=NodeStatus.choices, default=NodeStatus.PENDING)
    approved_at = models.DateTimeField(null=True, blank=True)
    total_vram = models.BigIntegerField(default=0)
    available_vram = models.BigIntegerField(default=0)
    reserved_vram = models.BigIntegerField(default=0)
    total_ram = models.BigIntegerField(default=0)
    available_ram = models.BigIntegerField(default=0)
    gpu_vendor = models.CharField(max_length=64, blank=True, default="")
    worker_max_replicas_per_model = models.IntegerField(default=1)
    max_replicas_override = models.IntegerField(null=True, blank=True)
    token_hash = models.CharField(max_length=64, blank=True, default="", editable=False, db_index=True)
    token_salt = models.CharField(max_length=64, blank=True, default="", editable=False)
    # SHA-256 (hex) of the agent's node credential; empty for a node registered without one.
    credential_hash = models.CharField(max_length=64, blank=True, default="", editable=False)
    drained_by_admin = models.BooleanField(default=False)
    # Names of the backends the agent can start (built-in `echo` plus its `--backends-config` entries), as it
    # reported them at its last registration; sorted, no duplicates.
    backends = models.JSONField(default=list, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    # sha256 of the model files the agent holds, verified (its last heartbeat): placement prefers them.
    artifacts = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(reserved_vram__gte=0), name="node_reserved_vram_gte_0"),
            models.CheckConstraint(
                condition=Q(worker_max_replicas_per_model__gte=1), name="node_worker_cap_gte_1"
            ),
            models.CheckConstraint(
                condition=Q(max_replicas_override__isnull=True) | Q(max_replicas_override__gte=1),
                name="node_override_gte_1",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def effective_max_replicas(self) -> int:
        """The admin override when set, else what the worker's flag says."""
        return self.max_replicas_override or self.worker_max_replicas_per_model

    @property
    def is_approved(self) -> bool:
        return self.approved_at is not None

    @property
    def effective_free_vram(self) -> int:
        return self.available_vram - self.reserved_vram


class NodeLabel(models.Model):
    """A `key=value` label on a node; selectors match labels by exact strings. `source` says who set it: an
    admin's label is never overwritten by the worker's label of the same key."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="labels")
    key = models.CharField(max_length=255)
    value = models.CharField(max_length=255, blank=True, default="")
    source = models.CharField(max_length=8, choices=LabelSource.choices, default=LabelSource.ADMIN)

    class Meta:
        ordering = ["key"]
        constraints = [models.UniqueConstraint(fields=["node", "key"], name="nodelabel_unique_node_key")]

    def __str__(self) -> str:
        return f"{self.key}={self.value}"


class ApiKeyNotDeletable(Exception):
    """API keys are revoked, never deleted: deleting the last one would open the gateway to everyone."""

    def __init__(self) -> None:
        super().__init__("API keys cannot be deleted; revoke them instead.")


class ModelReplica(models.Model):
    """One backend process serving one model in one slot of one node. The row exists from the moment its
    slot is claimed (state `loading`), so a load in progress counts against capacity."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="replicas")
    model_name = models.CharField(max_length=255)
    replica_index = models.IntegerField()
    state = models.CharField(max_length=16, choices=ReplicaState.choices, default=ReplicaState.LOADING)
    address = models.CharField(max_length=255, blank=True, default="")
    in_flight = models.IntegerField(default=0)
    last_used = models.DateTimeField(null=True, blank=True)
    load_started_at = models.DateTimeField(null=True, blank=True)
    loaded_at = models.DateTimeField(null=True, blank=True)
    # Last time the control plane heard of this process (a heartbeat listing it, a request, a probe).
    last_seen_at = models.DateTimeField(null=True, blank=True)
    vram_bytes = models.BigIntegerField(default=0)
    backend = models.CharField(max_length=64, blank=True, default="")
    # Staging of the model's files (state `downloading`), as the agent last reported it.
    progress = models.FloatField(default=0.0)  # 0–1
    download_bytes = models.BigIntegerField(default=0)
    download_total = models.BigIntegerField(default=0)
    download_rate = models.BigIntegerField(default=0)  # bytes per second

    class Meta:
        ordering = ["node__name", "model_name", "replica_index"]
        constraints = [
            models.UniqueConstraint(
                fields=["node", "model_name", "replica_index"], name="modelreplica_unique_slot"
            ),
            models.CheckConstraint(condition=Q(replica_index__gte=0), name="modelreplica_index_gte_0"),
            models.CheckConstraint(condition=Q(in_flight__gte=0), name="modelreplica_in_flight_gte_0"),
            models.CheckConstraint(condition=Q(vram_bytes__gte=0), name="modelreplica_vram_gte_0"),
        ]
        indexes = [models.Index(fields=["model_name", "state"], name="modelreplica_model_state")]

    def __str__(self) -> str:
        return f"{self.process_key} on {self.node_id}"

    @property
    def process_key(self) -> str:
        return process_key(self.model_name, self.replica_index)


class ApiKeyQuerySet(models.QuerySet):
    def delete(self):  # type: ignore[override]
        raise ApiKeyNotDeletable


class ApiKey(models.Model):
    """A bearer key for `/v1/*` (every key) and `/api/nodes/*`, `/api/models/*` (admin keys). Only a hash is
    stored; the key itself is shown once at creation. Keys are revoked, never deleted (the gateway is open
    only while no key was ever made): `delete()` raises, and a database trigger refuses `DELETE` too."""

    name = models.CharField(max_length=255)
    prefix = models.CharField(max_length=16, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    is_admin = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def delete(self, *args, **kwargs):  # type: ignore[override]
        raise ApiKeyNotDeletable


class InFlightClaim(models.Model):
    """How many in-flight units one web process (`owner`) holds on one replica. The router writes it in the
    same statement as `ModelReplica.in_flight`, so when a web process dies mid-request the health monitor
    can give back exactly the units it held (see `nodes.inflight`)."""

    owner = models.UUIDField()
    # Deleted with its replica by PostgreSQL (`ON DELETE CASCADE`, migration 0007), not by Django: Django's
    # cascade deletes the claim rows before the replica row, the reverse of the router's lock order (replica
    # row, then claim row), and a claim of the same replica meanwhile deadlocked with it (docs/reliability.md,
    # "Removing a replica while it is claimed").
    replica = models.ForeignKey(ModelReplica, on_delete=models.DO_NOTHING, related_name="claims")
    count = models.IntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "replica"], name="inflightclaim_unique_owner_replica"),
            models.CheckConstraint(condition=Q(count__gte=0), name="inflightclaim_count_gte_0"),
        ]
        indexes = [models.Index(fields=["owner"], name="inflightclaim_owner")]

    def __str__(self) -> str:
        return f"{self.owner}: {self.count} on replica {self.replica_id}"
