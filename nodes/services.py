"""Writes of the registry (BEHAVIOUR §2). Every service is keyword-only, owns its transaction, and sends
`cluster_capacity_changed` on commit when it changes where models can go. Network calls to agents happen
only after commit, and their failures are logged, never raised.

Reservation bookkeeping: a replica row holds a VRAM reservation of `vram_bytes` from its claim until a
worker heartbeat (or registration) lists its process key, which sets `last_seen_at`; from then on the
worker's own free-VRAM figure accounts for it. So `last_seen_at IS NULL` means "still reserved", and removing
such a row gives back exactly its `vram_bytes` (never taking `reserved_vram` below 0).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, QuerySet
from django.db.models.functions import Greatest
from django.utils import timezone

from audit import services as audit
from audit.models import Action
from nodes.choices import (
    AUTO_LABELS,
    LABEL_GPU_VENDOR,
    LABEL_GPU_VRAM,
    LABEL_NODE_NAME,
    LABEL_REPLICA_SLOTS,
    LabelSource,
    NodeStatus,
    NodeType,
    ReplicaState,
)
from nodes.exceptions import InvalidTransition, InvalidValue, NameTaken
from nodes.models import ModelReplica, Node, NodeLabel, process_key
from nodes.selectors import node_admin_labels, node_labels
from nodes.signals import cluster_capacity_changed
from nodes.tokens import (
    credential_matches,
    new_token_salt,
    node_token_for,
    node_token_matches,
    token_hash,
)

logger = logging.getLogger(__name__)

GiB = 1024**3
MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
LABEL_MAX_LENGTH = 255
# Labels an admin may leave on a node (auto-labels not counted); a worker sends at most as many of its own.
MAX_NODE_LABELS = 256
# Backend names an agent may report (each at most as long as a catalog model's `backend`).
MAX_NODE_BACKENDS = 256
BACKEND_NAME_MAX_LENGTH = 64


# Heartbeat intervals a freshly loaded replica may go unlisted (its load raced the heartbeat).
LOADED_GRACE_HEARTBEATS = 3


@dataclass(frozen=True)
class RegisterResult:
    """What a registration did: the node, whether it is new, and its new token (shown to the worker only)."""

    node: Node
    created: bool
    node_token: str


@dataclass(frozen=True)
class HeartbeatResult:
    """The answer to a heartbeat: the node's status, its effective cap, and the process keys the worker runs
    that have no replica row (orphans the agent stops after a second confirmation), and whether the next
    heartbeat should list the replicas in full rather than send their digest only."""

    status: str
    max_replicas_per_model: int
    orphans: list[str] = field(default_factory=list)
    # True when the agent should list its replicas in full next time (its set and the rows differ).
    send_replicas: bool = False


# --- helpers ---------------------------------------------------------------------------------------------


def gpu_vram_bucket(total_vram: int) -> str:
    """The `gpu.vram` label for a total VRAM in bytes: `80GB+`, `48GB`, `24GB`, `16GB`, `8GB`, else `<n>GB`
    (whole GiB, rounded down)."""
    gib = total_vram / GiB
    for floor, label in ((80, "80GB+"), (48, "48GB"), (24, "24GB"), (16, "16GB"), (8, "8GB")):
        if gib >= floor:
            return label
    return f"{int(gib)}GB"


def _capacity_changed(reason: str) -> None:
    """Send `cluster_capacity_changed` once the current transaction commits (at once outside one)."""

    def send() -> None:
        for receiver, response in cluster_capacity_changed.send_robust(sender=Node, reason=reason):
            if isinstance(response, Exception):
                logger.error(
                    "receiver %r of cluster_capacity_changed failed: %s",
                    receiver,
                    response,
                    exc_info=response,
                )

    transaction.on_commit(send)


def _lock_node(node_id: Any) -> Node:
    """The node row, locked until the transaction ends; raises `Node.DoesNotExist` when it is gone."""
    return Node.objects.select_for_update().get(pk=node_id)


def _validate_labels(labels: Mapping[str, str] | None, *, field_name: str = "labels") -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise InvalidValue("Expected a map of string keys to string values.", field=field_name)
    for key, value in labels.items():
        if not isinstance(key, str) or not key or len(key) > LABEL_MAX_LENGTH:
            raise InvalidValue(f"Label keys must be 1 to {LABEL_MAX_LENGTH} characters.", field=field_name)
        if not isinstance(value, str) or len(value) > LABEL_MAX_LENGTH:
            raise InvalidValue(
                f"Label {key!r}: values must be strings of at most {LABEL_MAX_LENGTH} characters.",
                field=field_name,
            )
    return dict(labels)


def _without_auto_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Auto-labels belong to the control plane: a worker or admin value for one is ignored."""
    return {key: value for key, value in labels.items() if key not in AUTO_LABELS}


def _upsert_labels(node: Node, labels: Mapping[str, str], *, source: str) -> None:
    """Insert or update the given labels in one statement, recording `source`; other labels are untouched."""
    if not labels:
        return
    NodeLabel.objects.bulk_create(
        [NodeLabel(node=node, key=key, value=value, source=source) for key, value in labels.items()],
        update_conflicts=True,
        unique_fields=["node", "key"],
        update_fields=["value", "source"],
    )


def _refresh_worker_labels(node: Node, labels: Mapping[str, str]) -> None:
    """The worker's word on its labels: its keys get its values, worker keys it no longer sends go, and a key
    an admin set keeps the admin's value (admin intent wins)."""
    admin_keys = set(
        NodeLabel.objects.filter(node=node, source=LabelSource.ADMIN).values_list("key", flat=True)
    )
    wanted = {key: value for key, value in labels.items() if key not in admin_keys}
    NodeLabel.objects.filter(node=node, source=LabelSource.WORKER).exclude(key__in=wanted).delete()
    _upsert_labels(node, wanted, source=LabelSource.WORKER)


def _refresh_auto_labels(node: Node) -> None:
    """Write `node.replica-slots` (= effective cap), `node.name`, `gpu.vendor` and `gpu.vram` from the node's
    fields. `gpu.vendor` is absent when the worker reports no vendor, `gpu.vram` when it reports no VRAM."""
    present = {LABEL_REPLICA_SLOTS: str(node.effective_max_replicas), LABEL_NODE_NAME: node.name}
    absent = []
    if node.gpu_vendor:
        present[LABEL_GPU_VENDOR] = node.gpu_vendor
    else:
        absent.append(LABEL_GPU_VENDOR)
    if node.total_vram > 0:
        present[LABEL_GPU_VRAM] = gpu_vram_bucket(node.total_vram)
    else:
        absent.append(LABEL_GPU_VRAM)
    _upsert_labels(node, present, source=LabelSource.AUTO)
    if absent:
        NodeLabel.objects.filter(node=node, key__in=absent).delete()


def _validate_backends(backends: Iterable[str] | None) -> list[str]:
    """The reported backend names, sorted without duplicates: at most `MAX_NODE_BACKENDS`, each 1 to
    `BACKEND_NAME_MAX_LENGTH` characters without control characters."""
    if backends is None:
        return []
    if isinstance(backends, str | bytes | Mapping):
        raise InvalidValue("Expected a list of backend names.", field="backends")
    names = list(backends)
    if len(names) > MAX_NODE_BACKENDS:
        raise InvalidValue(f"At most {MAX_NODE_BACKENDS} backends.", field="backends")
    for name in names:
        if (
            not isinstance(name, str)
            or not name
            or len(name) > BACKEND_NAME_MAX_LENGTH
            or not name.isprintable()
        ):
            raise InvalidValue(
                f"Backend names are 1 to {BACKEND_NAME_MAX_LENGTH} printable characters.", field="backends"
            )
    return sorted(set(names))


def _check_size(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BIGINT:
        raise InvalidValue("Must be a whole number of bytes, at least 0.", field=name)


def _check_cap(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT:
        raise InvalidValue("Must be a whole number, at least 1.", field=name)


def _reported_key(replica: Mapping[str, Any] | str) -> str:
    return replica if isinstance(replica, str) else str(replica.get("key", ""))


def _status_when_back(node: Node) -> str:
    """The status of a node coming back (registration, or a heartbeat after it went unhealthy/offline):
    `draining` when an admin drained it, else `healthy` when approved, else `pending`."""
    if not node.is_approved:
        return NodeStatus.PENDING
    return NodeStatus.DRAINING if node.drained_by_admin else NodeStatus.HEALTHY


def _audit_node(action: str, node: Node, *, before: Any, after: Any) -> None:
    """The audit entry of an admin action on `node` (inside the action's transaction)."""
    audit.record(
        action=action,
        target_type="node",
        target_id=node.pk,
        target_name=node.name,
        before=before,
        after=after,
    )


def _status_state(node: Node) -> dict[str, Any]:
    return {"status": node.status, "approved_at": node.approved_at, "drained_by_admin": node.drained_by_admin}


def _cap_state(node: Node) -> dict[str, Any]:
    return {
        "max_replicas_override": node.max_replicas_override,
        "replica_slots": node.effective_max_replicas,
    }


def _replica_keys(node: Node) -> list[str]:
    return [
        process_key(model_name, replica_index)
        for model_name, replica_index in ModelReplica.objects.filter(node=node)
        .order_by("model_name", "replica_index")
        .values_list("model_name", "replica_index")
    ]


# --- registration and heartbeat -----------------------------------------------------------------------------


def replicas_locked(replicas: QuerySet[ModelReplica]) -> list[Any]:
    """Locks the rows of `replicas` in id order, in the caller's transaction, and answers their ids. Every
    statement that locks or writes several replica rows takes them in id order first, as the router's batched
    claims and releases do: two such statements then never wait for each other in a cycle (docs/reliability.md,
    "Removing a replica while it is claimed")."""
    return list(replicas.select_for_update(of=("self",)).order_by("pk").values_list("pk", flat=True))


def replicas_delete(replicas: QuerySet[ModelReplica]) -> None:
    """Deletes the rows of `replicas`, locked in id order first (`replicas_locked`), in the caller's
    transaction."""
    replicas_locked(replicas)
    replicas.delete()


def node_register(
    *,
    name: str,
    node_type: str = NodeType.BACKEND,
    address: str = "",
    total_vram: int = 0,
    available_vram: int = 0,
    total_ram: int = 0,
    available_ram: int = 0,
    gpu_vendor: str = "",
    labels: Mapping[str, str] | None = None,
    max_replicas_per_model: int = 1,
    replicas: Iterable[str] = (),
    node_credential: str = "",
    node_token: str = "",
    backends: Iterable[str] | None = None,
) -> RegisterResult:
    """Register a worker: a new name makes a node (`pending`, or `healthy` and approved when
    `LOCALAI_AUTO_APPROVE_NODES`) whose credential is `node_credential` (when given); a known name must prove
    it is the same agent — its stored credential, or its current node token — else `NameTaken` is raised and
    nothing changes. A wrong credential is refused even with the right token.

    Guarantees: concurrent registrations of one new name make exactly one node (one gets `created=True`);
    the node keeps its id, its approval (dropped when the address changes without the credential proved)
    and an admin's drain; the worker's labels are refreshed (its keys upserted, worker keys it no longer
    sends removed) and an admin's labels kept, also over a worker label of the same key; an admin override is
    kept and the worker's value stored; auto-labels refreshed; every replica row is removed (its backend
    holds the previous backend token; `replicas` the worker lists become orphans of its next heartbeats);
    `reserved_vram` is 0; a new node token and backend token revoke the previous ones; `backends` (the
    names of the backends the agent can start) replace the stored ones, sorted without duplicates.
    """
    if not name or len(name) > 255:
        raise InvalidValue("Must be 1 to 255 characters.", field="name")
    if node_type not in NodeType.values:
        raise InvalidValue(f"Must be one of {', '.join(NodeType.values)}.", field="node_type")
    _check_cap("max_replicas_per_model", max_replicas_per_model)
    for size_name, size in (
        ("total_vram", total_vram),
        ("available_vram", available_vram),
        ("total_ram", total_ram),
        ("available_ram", available_ram),
    ):
        _check_size(size_name, size)
    worker_labels = _without_auto_labels(_validate_labels(labels))
    backend_names = _validate_backends(backends)
    del replicas  # every row goes: see the docstring
    now = timezone.now()

    with transaction.atomic():
        # INSERT ... ON CONFLICT DO NOTHING: a concurrent registration of the same new name waits for ours
        # to commit and then finds the row, instead of failing on the unique name.
        candidate = Node(
            id=uuid.uuid4(),
            name=name,
            status=NodeStatus.PENDING,
            credential_hash=token_hash(node_credential) if node_credential else "",
        )
        Node.objects.bulk_create([candidate], ignore_conflicts=True)
        node = Node.objects.select_for_update().get(name=name)
        created = node.pk == candidate.pk
        proved_credential = created or credential_matches(node, node_credential)
        if not created:
            wrong_credential = bool(node_credential and node.credential_hash and not proved_credential)
            if wrong_credential or not (proved_credential or node_token_matches(node, node_token)):
                logger.warning(
                    "registration of node %r refused: it proved neither credential nor token", name
                )
                raise NameTaken(name=name)
            if node_credential and not node.credential_hash:
                node.credential_hash = token_hash(node_credential)
            if address != node.address and not proved_credential and node.approved_at is not None:
                # The node token travels to the node's address on every gRPC call; it does not prove the
                # agent moved, so a new address must be approved again.
                logger.warning("node %r moved to %r without its credential: approval dropped", name, address)
                node.approved_at = None
                node.drained_by_admin = False

        if settings.LOCALAI_AUTO_APPROVE_NODES and node.approved_at is None:
            node.approved_at = now
        node.status = _status_when_back(node)
        node.node_type = node_type
        node.address = address
        node.total_vram = total_vram
        node.available_vram = available_vram
        node.reserved_vram = 0
        node.total_ram = total_ram
        node.available_ram = available_ram
        node.gpu_vendor = gpu_vendor
        node.worker_max_replicas_per_model = max_replicas_per_model
        node.backends = backend_names
        node.last_heartbeat = now
        node.token_salt = new_token_salt()
        new_node_token = node_token_for(node)
        node.token_hash = token_hash(new_node_token)
        node.save()

        _refresh_worker_labels(node, worker_labels)
        _refresh_auto_labels(node)
        replicas_delete(ModelReplica.objects.filter(node=node))
        _capacity_changed(f"node {name} registered")

    logger.info("node %r %s (%s)", name, "registered" if created else "registered again", node.status)
    return RegisterResult(node=node, created=created, node_token=new_node_token)


# Statuses an unchanged heartbeat keeps as they are (`unhealthy` and `offline` come back through the full path).
_STEADY_STATUSES = (NodeStatus.HEALTHY.value, NodeStatus.DRAINING.value, NodeStatus.PENDING.value)
_REPLICA_KEY_SQL = "r.model_name || '#' || r.replica_index::text"
# One statement: the node's row, by primary key, only when the token is the node's, its status steady, its
# total VRAM and vendor as reported (they drive auto-labels), every replica row already heard from, and the
# digest of its rows (computed in SQL exactly as `replica_digest` does) equal to the digest reported.
_UNCHANGED_HEARTBEAT_SQL = f"""
UPDATE {Node._meta.db_table} AS n
SET last_heartbeat = %(now)s,
    updated_at = %(now)s,
    available_vram = COALESCE(%(available_vram)s, n.available_vram),
    available_ram = COALESCE(%(available_ram)s, n.available_ram),
    total_ram = COALESCE(%(total_ram)s, n.total_ram),
    artifacts = COALESCE(%(artifacts)s::jsonb, n.artifacts)
WHERE n.id = %(node_id)s
  AND n.token_hash = %(token_hash)s
  AND n.token_hash <> ''
  AND n.status IN {_STEADY_STATUSES!r}
  AND (%(total_vram)s::bigint IS NULL OR n.total_vram = %(total_vram)s::bigint)
  AND (%(gpu_vendor)s::text IS NULL OR n.gpu_vendor = %(gpu_vendor)s::text)
  AND %(digest)s = (
    SELECT encode(sha256(convert_to(
             coalesce(string_agg({_REPLICA_KEY_SQL}, E'\\n' ORDER BY {_REPLICA_KEY_SQL} COLLATE "C"), ''),
             'UTF8')), 'hex')
    FROM {ModelReplica._meta.db_table} r
    WHERE r.node_id = n.id
  )
  AND NOT EXISTS (
    SELECT 1 FROM {ModelReplica._meta.db_table} r WHERE r.node_id = n.id AND r.last_seen_at IS NULL
  )
RETURNING n.status, COALESCE(n.max_replicas_override, n.worker_max_replicas_per_model)
"""


def node_heartbeat_unchanged(
    *,
    node_id: Any,
    token: str | None,
    digest: str,
    available_vram: int | None = None,
    total_vram: int | None = None,
    available_ram: int | None = None,
    total_ram: int | None = None,
    gpu_vendor: str | None = None,
    artifacts: Iterable[str] | None = None,
) -> HeartbeatResult | None:
    """A heartbeat that reports nothing new, in ONE indexed UPDATE (authentication included): when `token`
    is the node's, its status is `healthy`, `draining` or `pending`, its total VRAM and GPU vendor are as
    reported, every replica row was already heard from, and `digest` (`replica_digest` of the agent's keys)
    equals the digest of the node's replica rows, it records `last_heartbeat` and the reported free figures
    and answers. None otherwise — nothing was written, and the caller authenticates and runs
    `node_heartbeat`, which reconciles. The reported free VRAM is written as is: no tolerance is needed,
    since writing it costs nothing more in the same statement.

    A heartbeat it answers lists exactly the node's rows, all of them already heard from: the full
    reconciliation would delete nothing, add no orphan and keep the reservation (0), so skipping it changes
    nothing but the rows' `last_seen_at` (the health probe counts such a heartbeat as news of every replica
    loaded before it: `scheduling.health`)."""
    if not token or not digest:
        return None
    try:
        node_uuid = node_id if isinstance(node_id, uuid.UUID) else uuid.UUID(str(node_id))
    except (TypeError, ValueError, AttributeError):
        return None
    for size_name, size in (
        ("total_vram", total_vram),
        ("available_vram", available_vram),
        ("total_ram", total_ram),
        ("available_ram", available_ram),
    ):
        _check_size(size_name, size)
    params: dict[str, Any] = {
        "now": timezone.now(),
        "node_id": node_uuid,
        "token_hash": token_hash(token),
        "digest": digest,
        "available_vram": available_vram,
        "total_vram": total_vram,
        "available_ram": available_ram,
        "total_ram": total_ram,
        "gpu_vendor": None if gpu_vendor is None else gpu_vendor[:64],
        # The model files it holds (sha256) are written as reported, in the same statement.
        "artifacts": None if artifacts is None else json.dumps(sorted(set(artifacts))),
    }
    with connection.cursor() as cursor:
        cursor.execute(_UNCHANGED_HEARTBEAT_SQL, params)
        row = cursor.fetchone()
    if row is None:
        return None
    return HeartbeatResult(status=row[0], max_replicas_per_model=row[1])


def node_heartbeat(
    *,
    node: Node,
    replicas: Iterable[Mapping[str, Any] | str] = (),
    available_vram: int | None = None,
    total_vram: int | None = None,
    available_ram: int | None = None,
    total_ram: int | None = None,
    gpu_vendor: str | None = None,
    artifacts: Iterable[str] | None = None,
) -> HeartbeatResult:
    """Record a heartbeat: resources (a figure left None is kept), `last_heartbeat`, and the replica rows.

    Guarantees: never approves (an approved `unhealthy`/`offline` node becomes `healthy`, an unapproved one
    `pending`; `draining` and `pending` stay); rows the worker lists get `last_seen_at`; a row it does not
    list is removed, except a `loading` one younger than `LOCALAI_LOAD_TIMEOUT` and a `loaded` one loaded within
    the last `LOADED_GRACE_HEARTBEATS` heartbeat intervals; `reserved_vram` becomes the
    sum of `vram_bytes` of the `loading` rows it does not list yet (0 when it lists them all). A bounded
    number of queries whatever the number of replicas. Raises `Node.DoesNotExist` if the node was deleted.
    """
    for size_name, size in (
        ("total_vram", total_vram),
        ("available_vram", available_vram),
        ("total_ram", total_ram),
        ("available_ram", available_ram),
    ):
        _check_size(size_name, size)
    listed = {key for key in (_reported_key(replica) for replica in replicas) if key}
    now = timezone.now()
    load_deadline = now - timedelta(seconds=settings.LOCALAI_LOAD_TIMEOUT)
    # A row still staging its files is kept for the download timeout on top (the agent lists processes only).
    download_deadline = load_deadline - timedelta(seconds=settings.LOCALAI_DOWNLOAD_TIMEOUT)
    # A heartbeat the agent built just before a load reached it does not list that replica yet; a row that
    # became `loaded` within the last few heartbeat intervals is kept until a later heartbeat speaks for it.
    loaded_deadline = now - timedelta(seconds=LOADED_GRACE_HEARTBEATS * settings.LOCALAI_HEARTBEAT_INTERVAL)

    with transaction.atomic():
        locked = _lock_node(node.pk)
        rows = ModelReplica.objects.filter(node=locked).values_list(
            "pk", "model_name", "replica_index", "state", "load_started_at", "loaded_at", "vram_bytes"
        )
        known: set[str] = set()
        seen: list[int] = []
        gone: list[int] = []
        reserved = 0
        for pk, model_name, replica_index, state, load_started_at, loaded_at, vram_bytes in rows:
            key = process_key(model_name, replica_index)
            known.add(key)
            if key in listed:
                seen.append(pk)
            elif (
                state == ReplicaState.LOADING and (load_started_at is None or load_started_at > load_deadline)
            ) or (
                state == ReplicaState.DOWNLOADING
                and (load_started_at is None or load_started_at > download_deadline)
            ):
                reserved += vram_bytes  # a load still on its way: keep its slot and its reservation
            elif state == ReplicaState.LOADED and loaded_at is not None and loaded_at > loaded_deadline:
                continue  # loaded after this heartbeat was built
            else:
                gone.append(pk)
        replicas_locked(ModelReplica.objects.filter(pk__in=gone + seen))
        if gone:
            ModelReplica.objects.filter(pk__in=gone).delete()
        if seen:
            ModelReplica.objects.filter(pk__in=seen).update(last_seen_at=now)

        previous_status = locked.status
        if locked.status in (NodeStatus.OFFLINE, NodeStatus.UNHEALTHY):
            locked.status = _status_when_back(locked)
        old_gpu_labels = (locked.gpu_vendor, locked.total_vram and gpu_vram_bucket(locked.total_vram))
        if available_vram is not None:
            locked.available_vram = available_vram
        if total_vram is not None:
            locked.total_vram = total_vram
        if available_ram is not None:
            locked.available_ram = available_ram
        if total_ram is not None:
            locked.total_ram = total_ram
        if gpu_vendor is not None:
            locked.gpu_vendor = gpu_vendor[:64]
        if artifacts is not None:
            locked.artifacts = sorted(set(artifacts))
        locked.reserved_vram = reserved
        locked.last_heartbeat = now
        locked.save(
            update_fields=[
                "status",
                "available_vram",
                "total_vram",
                "available_ram",
                "total_ram",
                "gpu_vendor",
                "artifacts",
                "reserved_vram",
                "last_heartbeat",
                "updated_at",
            ]
        )
        if old_gpu_labels != (locked.gpu_vendor, locked.total_vram and gpu_vram_bucket(locked.total_vram)):
            _refresh_auto_labels(locked)
        if locked.status == NodeStatus.HEALTHY and previous_status != NodeStatus.HEALTHY:
            _capacity_changed(f"node {locked.name} is back")

    if gone:
        logger.info("node %r: removed %d replica row(s) whose process is gone", locked.name, len(gone))
    orphans = sorted(listed - known)
    return HeartbeatResult(
        status=locked.status,
        max_replicas_per_model=locked.effective_max_replicas,
        orphans=orphans,
        # Rows kept unlisted (a load on its way, a replica loaded since) or orphans: the sets still differ,
        # so the agent's next heartbeat lists its replicas rather than a digest that cannot match.
        send_replicas=bool(orphans) or len(known) - len(seen) - len(gone) > 0,
    )


# --- node actions -------------------------------------------------------------------------------------------


def node_approve(*, node: Node) -> Node:
    """`pending` → `healthy` with `approved_at` set. Raises `InvalidTransition` from any other status."""
    now = timezone.now()
    with transaction.atomic():
        locked = _lock_node(node.pk)
        if locked.status != NodeStatus.PENDING:
            raise InvalidTransition(node=locked, action="approve", status=locked.status)
        before = _status_state(locked)
        locked.status = NodeStatus.HEALTHY
        locked.approved_at = now
        locked.drained_by_admin = False
        locked.save(update_fields=["status", "approved_at", "drained_by_admin", "updated_at"])
        _audit_node(Action.NODE_APPROVE, locked, before=before, after=_status_state(locked))
        _capacity_changed(f"node {locked.name} approved")
    return locked


def node_drain(*, node: Node, by_admin: bool = True) -> Node:
    """Mark an approved node `draining` at once: no new placements, no new requests to its replicas; work in
    flight finishes. An admin's drain (`by_admin`) survives the agent's re-registrations until an admin
    resumes the node; the agent's own drain (before it deregisters) does not. Draining a draining node
    changes only that flag. Raises `InvalidTransition` for a node never approved (resuming it would
    otherwise approve it). An admin's drain that changed something is audited (not the agent's own)."""
    with transaction.atomic():
        locked = _lock_node(node.pk)
        before = _status_state(locked)
        if locked.status == NodeStatus.DRAINING:
            if by_admin and not locked.drained_by_admin:
                locked.drained_by_admin = True
                locked.save(update_fields=["drained_by_admin", "updated_at"])
                _audit_node(Action.NODE_DRAIN, locked, before=before, after=_status_state(locked))
            return locked
        if not locked.is_approved:
            raise InvalidTransition(node=locked, action="drain", status=locked.status)
        locked.status = NodeStatus.DRAINING
        locked.drained_by_admin = locked.drained_by_admin or by_admin
        locked.save(update_fields=["status", "drained_by_admin", "updated_at"])
        if by_admin:
            _audit_node(Action.NODE_DRAIN, locked, before=before, after=_status_state(locked))
        _capacity_changed(f"node {locked.name} draining")
    return locked


def node_resume(*, node: Node) -> Node:
    """`draining` → `healthy` (schedulable again). Raises `InvalidTransition` from any other status."""
    with transaction.atomic():
        locked = _lock_node(node.pk)
        if locked.status != NodeStatus.DRAINING:
            raise InvalidTransition(node=locked, action="resume", status=locked.status)
        before = _status_state(locked)
        locked.status = NodeStatus.HEALTHY
        locked.drained_by_admin = False
        locked.save(update_fields=["status", "drained_by_admin", "updated_at"])
        _audit_node(Action.NODE_RESUME, locked, before=before, after=_status_state(locked))
        _capacity_changed(f"node {locked.name} resumed")
    return locked


def node_deregister(*, node: Node) -> Node:
    """The worker's own graceful shutdown: the node goes `offline` and loses its replica rows (and any
    reservation) but keeps its id, approval, labels and override, so a restart comes back as the same node."""
    with transaction.atomic():
        locked = _lock_node(node.pk)
        replicas_delete(ModelReplica.objects.filter(node=locked))
        locked.status = NodeStatus.OFFLINE
        locked.reserved_vram = 0
        locked.save(update_fields=["status", "reserved_vram", "updated_at"])
        _capacity_changed(f"node {locked.name} deregistered")
    return locked


def node_delete(*, node: Node) -> list[str]:
    """An admin removes the node with its labels and replica rows. Returns the process keys it hosted; after
    commit its agent is asked to stop each of them (errors are logged, never raised)."""
    with transaction.atomic():
        locked = _lock_node(node.pk)
        keys = _replica_keys(locked)
        address, name, token = locked.address, locked.name, node_token_for(locked)
        before = {
            **_status_state(locked),
            "address": address,
            "node_type": locked.node_type,
            **_cap_state(locked),
            "labels": node_admin_labels(node=locked),
            "replicas": keys,
        }
        _audit_node(Action.NODE_DELETE, locked, before=before, after=None)
        replicas_locked(ModelReplica.objects.filter(node=locked))
        locked.delete()
        if keys and address:
            transaction.on_commit(
                lambda: _stop_on_agent(address=address, token=token, keys=keys, node_name=name)
            )
        _capacity_changed(f"node {name} deleted")
    logger.info("node %r deleted (%d replica(s))", name, len(keys))
    return keys


def _stop_on_agent(*, address: str, token: str, keys: list[str], node_name: str) -> list[str]:
    """Ask an agent to stop exact process keys; returns the keys it stopped. Never raises: an agent that
    cannot be reached is logged and the remaining keys are skipped."""
    stopped: list[str] = []
    try:
        from nodes.agent_clients import worker_control_client
        from worker_client.errors import WorkerError
    except ImportError:  # pragma: no cover - the client ships with the project
        logger.exception("cannot stop %s on %r: worker_client is unavailable", keys, node_name)
        return stopped
    try:
        client = worker_control_client(address, token, timeout=settings.LOCALAI_AGENT_CALL_TIMEOUT)
    except Exception:
        logger.exception("cannot reach the agent of %r at %r to stop %s", node_name, address, keys)
        return stopped
    for key in keys:
        try:
            stopped.extend(client.stop_replica(key))
        except WorkerError as error:
            logger.warning("agent of %r did not stop %r: %s", node_name, key, error)
            if error.connect_failed:
                logger.warning(
                    "agent of %r unreachable: not stopping %s", node_name, keys[keys.index(key) + 1 :]
                )
                break
        except Exception:
            logger.exception("agent of %r did not stop %r", node_name, key)
    return stopped


def replica_stop_on_agent(*, node: Node, process_key: str) -> list[str]:
    """Ask the node's agent to stop exactly `process_key` (network call: use outside transactions). Returns
    the keys stopped; failures are logged and answer []."""
    if not node.address:
        return []
    return _stop_on_agent(
        address=node.address, token=node_token_for(node), keys=[process_key], node_name=node.name
    )


def replica_unload(*, node: Node, replicas: Iterable[ModelReplica]) -> list[str]:
    """Unloads these replica rows of the node (API and page): each row goes at once (no new request reaches
    it; requests in flight on it are cut off), then — after commit — the agent is asked to stop exactly
    their process keys. Returns the keys of the rows removed (a row already gone is skipped). Audited as
    `node.unload` (the node's replica keys before and after), in the same transaction."""
    replicas = list(replicas)
    with transaction.atomic():
        before = _replica_keys(node)
        replicas_locked(ModelReplica.objects.filter(pk__in=[replica.id for replica in replicas]))
        removed = [
            replica.process_key
            for replica in replicas
            if replica.node_id == node.pk and replica_remove(replica_id=replica.id) is not None
        ]
        if removed:
            after = [key for key in before if key not in removed]
            _audit_node(Action.NODE_UNLOAD, node, before={"replicas": before}, after={"replicas": after})

            def stop() -> None:
                for key in removed:
                    replica_stop_on_agent(node=node, process_key=key)

            transaction.on_commit(stop)
    if removed:
        logger.info("unloaded %r from %r", removed, node.name)
    return removed


# --- labels and override ------------------------------------------------------------------------------------


def node_labels_replace(*, node: Node, labels: Mapping[str, str]) -> dict[str, str]:
    """Replace every label with `labels`; auto-labels are the control plane's (values given for them are
    ignored) and stay current, so `node.replica-slots` still equals the effective cap. Returns all labels."""
    wanted = _without_auto_labels(_validate_labels(labels))
    with transaction.atomic():
        locked = _lock_node(node.pk)
        before = node_admin_labels(node=locked)
        NodeLabel.objects.filter(node=locked).exclude(key__in=AUTO_LABELS).exclude(key__in=wanted).delete()
        _upsert_labels(locked, wanted, source=LabelSource.ADMIN)
        _refresh_auto_labels(locked)
        _audit_node(
            Action.NODE_LABELS,
            locked,
            before={"labels": before},
            after={"labels": node_admin_labels(node=locked)},
        )
        _capacity_changed(f"labels of node {locked.name} replaced")
    return node_labels(node=locked)


def node_labels_merge(*, node: Node, labels: Mapping[str, str]) -> dict[str, str]:
    """Set the given labels (insert or update), keeping every other one. Auto-label keys are ignored.
    Raises `InvalidValue` when the node would carry more than `MAX_NODE_LABELS` labels. Returns all labels."""
    wanted = _without_auto_labels(_validate_labels(labels))
    with transaction.atomic():
        locked = _lock_node(node.pk)
        before = node_admin_labels(node=locked)
        _upsert_labels(locked, wanted, source=LabelSource.ADMIN)
        if NodeLabel.objects.filter(node=locked).exclude(key__in=AUTO_LABELS).count() > MAX_NODE_LABELS:
            raise InvalidValue(f"A node carries at most {MAX_NODE_LABELS} labels.", field="labels")
        _refresh_auto_labels(locked)
        _audit_node(
            Action.NODE_LABELS,
            locked,
            before={"labels": before},
            after={"labels": node_admin_labels(node=locked)},
        )
        _capacity_changed(f"labels of node {locked.name} changed")
    return node_labels(node=locked)


def node_label_remove(*, node: Node, key: str) -> bool:
    """Remove one label; True when it existed. Raises `InvalidValue` for an auto-label key."""
    if key in AUTO_LABELS:
        raise InvalidValue(f"{key} is managed by the control plane.", field="key")
    with transaction.atomic():
        locked = _lock_node(node.pk)
        before = node_admin_labels(node=locked)
        deleted, _ = NodeLabel.objects.filter(node=locked, key=key).delete()
        if deleted:
            after = {k: v for k, v in before.items() if k != key}
            _audit_node(Action.NODE_LABELS, locked, before={"labels": before}, after={"labels": after})
            _capacity_changed(f"label {key} removed from node {locked.name}")
    return bool(deleted)


def node_override_set(*, node: Node, value: int) -> Node:
    """Set the admin cap override (≥ 1); it survives re-registration. `node.replica-slots` follows at once.
    Lowering it evicts nothing (free slots clamp at 0)."""
    _check_cap("value", value)
    with transaction.atomic():
        locked = _lock_node(node.pk)
        before = _cap_state(locked)
        locked.max_replicas_override = value
        locked.save(update_fields=["max_replicas_override", "updated_at"])
        _refresh_auto_labels(locked)
        _audit_node(Action.NODE_OVERRIDE_SET, locked, before=before, after=_cap_state(locked))
        _capacity_changed(f"override of node {locked.name} set to {value}")
    return locked


def node_override_reset(*, node: Node) -> Node:
    """Drop the override: the worker's own value is the effective cap at once, and `node.replica-slots`
    follows."""
    with transaction.atomic():
        locked = _lock_node(node.pk)
        before = _cap_state(locked)
        locked.max_replicas_override = None
        locked.save(update_fields=["max_replicas_override", "updated_at"])
        _refresh_auto_labels(locked)
        _audit_node(Action.NODE_OVERRIDE_RESET, locked, before=before, after=_cap_state(locked))
        _capacity_changed(f"override of node {locked.name} reset")
    return locked


# --- replicas -----------------------------------------------------------------------------------------------


def replica_mark_loaded(*, replica_id: Any, address: str) -> bool:
    """`loading` (or `downloading`) → `loaded` on the same row, with the agent's address and `loaded_at`. False
    when the row is gone or not loading (it was removed meanwhile: the caller should stop the process)."""
    updated = ModelReplica.objects.filter(
        pk=replica_id, state__in=[ReplicaState.LOADING, ReplicaState.DOWNLOADING]
    ).update(state=ReplicaState.LOADED, address=address, loaded_at=timezone.now(), progress=1.0)
    return updated == 1


def replicas_mark_loaded(*, loaded: Sequence[tuple[Any, str]]) -> set[Any]:
    """`replica_mark_loaded` for many rows (replica id, the agent's address) in one UPDATE; answers the ids it
    changed (a row missing from the answer was removed or is no longer loading)."""
    if not loaded:
        return set()
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE nodes_modelreplica AS r"
            " SET state = %s, address = v.address, loaded_at = %s, progress = 1.0"
            " FROM unnest(%s::bigint[], %s::text[]) AS v(id, address)"
            " WHERE r.id = v.id AND r.state = ANY(%s) RETURNING r.id",
            [
                ReplicaState.LOADED,
                timezone.now(),
                [replica_id for replica_id, _ in loaded],
                [address for _, address in loaded],
                [ReplicaState.LOADING, ReplicaState.DOWNLOADING],
            ],
        )
        return {row[0] for row in cursor.fetchall()}


def replica_download_progress(*, node: Node, reports: Iterable[Mapping[str, Any]]) -> int:
    """The agent's staging progress for its `downloading` rows: `bytes`, `total`, `rate`, and `progress`
    (bytes/total); a report with `state` `loading` (files in place) moves the row to `loading` with a fresh
    `load_started_at` (its load timeout starts now). Rows in any other state are left alone; answers how
    many rows changed."""
    changed = 0
    for report in reports:
        model_name, _, index = str(report["key"]).rpartition("#")
        if not model_name or not index.isdigit():
            continue
        rows = ModelReplica.objects.filter(
            node=node, model_name=model_name, replica_index=int(index), state=ReplicaState.DOWNLOADING
        )
        total = int(report.get("total") or 0)
        done = min(int(report.get("bytes") or 0), total) if total else int(report.get("bytes") or 0)
        if report.get("state") == ReplicaState.LOADING:
            changed += rows.update(
                state=ReplicaState.LOADING,
                load_started_at=timezone.now(),
                progress=1.0,
                download_bytes=F("download_total"),
                download_rate=0,
            )
        else:
            changed += rows.update(
                progress=(done / total) if total else 0.0,
                download_bytes=done,
                download_total=total,
                download_rate=int(report.get("rate") or 0),
            )
    return changed


def replica_remove(*, replica_id: Any) -> ModelReplica | None:
    """Delete one replica row (its siblings are untouched) and give back the reservation it still holds
    (never taking `reserved_vram` below 0). Returns the deleted row, or None when it was already gone."""
    replica = ModelReplica.objects.select_related("node").filter(pk=replica_id).first()
    if replica is None:
        return None
    with transaction.atomic():
        # Node row first, as every writer of a node's replicas does, so no two of them deadlock.
        list(Node.objects.select_for_update().filter(pk=replica.node_id).values_list("pk", flat=True))
        current = ModelReplica.objects.filter(pk=replica_id).values_list("vram_bytes", "last_seen_at").first()
        if current is None:
            return None
        vram_bytes, last_seen_at = current
        ModelReplica.objects.filter(pk=replica_id).delete()
        release = vram_bytes if last_seen_at is None else 0
        if release:
            Node.objects.filter(pk=replica.node_id).update(
                reserved_vram=Greatest(F("reserved_vram") - release, 0)
            )
    return replica
