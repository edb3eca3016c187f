"""How a replica is placed: the one pipeline (BEHAVIOUR §4). Router cold path, reconciler, eviction and the
dry run (`GET /api/plan`, `cluster_status --why`) all go through it.

1. **Snapshot** — `cluster_snapshot()`: every node, label, replica row and rule in four queries.
2. **Eligibility** — `judge(model, node)`: the first verdict that applies, in this order: `not_approved`,
   `draining`, `not_healthy`, `selector_mismatch` (the missing `key=value`), `backend_missing` (the node's
   agent reported the backends it can start and the model's catalog `backend` is not one of them; a node that
   reported none is not refused), `no_free_slot` (used/cap), `not_enough_vram` (needed vs free after
   reservations), `eviction_candidate` (room only by evicting an idle replica: which one); None when the node
   can take the replica.
3. **Ranking** — `rank_key`: spread before stacking, then a node holding all the model's files (by sha256,
   from its heartbeat) before one that would download them, then most effective free VRAM, then least
   in-flight, then name. `evaluate()` applies 2 and 3 to a snapshot: every node gets its verdict, the best eligible one
   is `chosen`, the others `ranked_lower`; with no eligible node, the least recently used eviction victim.
4. **Claim** — `replica_claim()`: locks the node row, re-judges it on fresh figures with the same predicate,
   and inserts a `loading` row (`downloading` when the model has files the node does not hold yet) with its
   VRAM reservation, or answers the verdict that refused it.

A slot is a replica row of the model on the node in any state (an index in use cannot be claimed again).
A node reporting no VRAM (`total_vram` 0, a CPU node) is placed on by slots alone.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg.errors
from django.db import IntegrityError, transaction
from django.db.models import BigIntegerField, BooleanField, F, OuterRef, Subquery
from django.db.models.expressions import RawSQL
from django.utils import timezone

from localai_cluster.db_router import primary_reads
from nodes.choices import NodeStatus, NodeType, ReplicaState
from nodes.models import ModelReplica, Node, NodeLabel, process_key
from scheduling.choices import Verdict
from scheduling.models import ModelConfig, SchedulingRule

logger = logging.getLogger("scheduling.placement")

GiB = 1024**3
LIVE_STATES = (ReplicaState.DOWNLOADING, ReplicaState.LOADING, ReplicaState.LOADED)

# Headlines of a refusal, by the furthest verdict any node reached.
REASON_NO_MATCHING_NODE = "no node matches the selector"
REASON_NO_FREE_SLOT = "no free slot"
REASON_NOT_ENOUGH_VRAM = "not enough VRAM"


def reason_no_backend(backend: str) -> str:
    """The headline when every node that matched the selector lacks the model's backend."""
    return f"no node offers backend {backend}"


# Nodes named in a refusal message (the decision record keeps them all).
MESSAGE_NODES = 8


def gib(size: int) -> str:
    return f"{size / GiB:.1f} GiB"


# --- the snapshot (plain data) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRequirement:
    """What a new replica of `name` needs: a node matching `selector` that can start `backend` (the catalog's;
    '' when unknown: any node) with a free slot and `vram_bytes`."""

    name: str
    vram_bytes: int = 0
    selector: Mapping[str, str] = field(default_factory=dict)
    artifacts: frozenset[str] = frozenset()  # sha256 of the model's catalog `files`
    backend: str = ""


@dataclass(frozen=True)
class NodeSnapshot:
    """One backend node as seen for placing a model: `replicas_of_model` counts that model's rows on it in any
    state, `in_flight` the node's total."""

    id: Any
    name: str
    effective_cap: int
    replicas_of_model: int = 0
    total_vram: int = 0
    available_vram: int = 0
    reserved_vram: int = 0
    in_flight: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    approved: bool = True
    status: str = NodeStatus.HEALTHY
    address: str = ""
    artifacts: frozenset[str] = frozenset()  # sha256 of the files the agent holds (heartbeat)
    # Names of the backends the agent can start (registration); empty: not reported, any backend allowed.
    backends: frozenset[str] = frozenset()

    def offers(self, backend: str) -> bool:
        """Whether the node can start `backend`: yes when either is unknown (no backend named, or the node
        reported none)."""
        return not backend or not self.backends or backend in self.backends

    def holds(self, model: ModelRequirement) -> bool:
        """Whether the node holds every file of the model (False for a model without files)."""
        return bool(model.artifacts) and model.artifacts <= self.artifacts

    @property
    def effective_free_vram(self) -> int:
        return self.available_vram - self.reserved_vram

    @property
    def free_slots(self) -> int:
        return max(self.effective_cap - self.replicas_of_model, 0)

    @property
    def vram_limited(self) -> bool:
        return self.total_vram > 0

    @property
    def schedulable(self) -> bool:
        return self.approved and self.status == NodeStatus.HEALTHY


@dataclass(frozen=True)
class ReplicaView:
    id: Any
    node_id: Any
    model_name: str
    replica_index: int
    state: str = ReplicaState.LOADED
    in_flight: int = 0
    idle_since: datetime | None = None  # last use, else load time
    vram_bytes: int = 0

    @property
    def process_key(self) -> str:
        return process_key(self.model_name, self.replica_index)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def idle(self) -> bool:
        return self.state == ReplicaState.LOADED and self.in_flight == 0


@dataclass(frozen=True)
class RuleView:
    id: Any
    model_name: str
    selector: Mapping[str, str]
    min_replicas: int
    max_replicas: int
    unsatisfiable_until: datetime | None = None
    unsatisfiable_ticks: int = 0
    target_in_flight: int = 0
    upscale_delay: int = 30
    downscale_delay: int | None = None
    scale_to_zero_after: int = 0
    scale_up_since: datetime | None = None
    scale_down_since: datetime | None = None
    scaled_up_at: datetime | None = None
    backend: str = ""  # the model's catalog backend ('' when the catalog does not know the model)


@dataclass
class ClusterSnapshot:
    """Backend nodes (keyed by id, `replicas_of_model` 0), every replica row, every rule (keyed by model)."""

    nodes: dict[Any, NodeSnapshot]
    replicas: list[ReplicaView]
    rules: dict[str, RuleView]
    _rows: dict[str, dict[Any, int]] | None = field(default=None, repr=False)

    @property
    def live_replicas(self) -> list[ReplicaView]:
        return [replica for replica in self.replicas if replica.live]

    def rows_of(self, model_name: str) -> Mapping[Any, int]:
        """The model's rows (any state) per node id; the index is built once per snapshot."""
        if self._rows is None:
            self._rows = defaultdict(dict)
            for replica in self.replicas:
                per_node = self._rows[replica.model_name]
                per_node[replica.node_id] = per_node.get(replica.node_id, 0) + 1
        return self._rows.get(model_name, {})

    def nodes_for(self, model_name: str) -> list[NodeSnapshot]:
        """Every backend node with `replicas_of_model` counted for `model_name`."""
        rows = self.rows_of(model_name)
        # Most nodes host no row of a given model: those keep the snapshot's own object (count 0).
        return [
            replace(node, replicas_of_model=rows[node.id]) if node.id in rows else node
            for node in self.nodes.values()
        ]

    def requirement(
        self, model_name: str, vram_bytes: int, artifacts: frozenset[str] = frozenset(), backend: str = ""
    ) -> ModelRequirement:
        """The model's requirement with its rule's selector, and its catalog backend (`backend`, else the
        one the snapshot read with the rule)."""
        rule = self.rules.get(model_name)
        return ModelRequirement(
            model_name,
            vram_bytes,
            dict(rule.selector) if rule else {},
            artifacts,
            backend or (rule.backend if rule else ""),
        )

    def evaluate(self, model: ModelRequirement) -> Plan:
        """`evaluate` over this snapshot, eviction victims included."""
        counts: dict[str, int] = defaultdict(int)
        for replica in self.live_replicas:
            counts[replica.model_name] += 1
        minimums = {name: rule.min_replicas for name, rule in self.rules.items()}
        idle = [r for r in self.replicas if r.idle and r.model_name != model.name]
        return evaluate(
            model, self.nodes_for(model.name), idle=idle, live_counts=counts, min_replicas=minimums
        )


def _names(value: Any) -> frozenset[str]:
    """A node's JSON list of names (the artifacts' sha256 its heartbeat lists, the backends it registered) as
    a set; anything but a list is none."""
    return frozenset(str(item) for item in value) if isinstance(value, list) else frozenset()


def model_artifacts(files: Any) -> frozenset[str]:
    """The sha256 of a catalog model's `files` (those that have one)."""
    if not isinstance(files, list):
        return frozenset()
    return frozenset(str(f["sha256"]) for f in files if isinstance(f, dict) and f.get("sha256"))


def _selector(value: Any) -> dict[str, str]:
    return dict(value) if isinstance(value, dict) else {}


_AUTOSCALE_FIELDS = (
    "target_in_flight",
    "upscale_delay",
    "downscale_delay",
    "scale_to_zero_after",
    "scale_up_since",
    "scale_down_since",
    "scaled_up_at",
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_micros(column: str) -> RawSQL:
    """A timestamp column as whole microseconds since the epoch, exactly: the snapshot reads tens of
    thousands of them, and Django's timestamp loader parses each text form in Python (most of a large
    snapshot's cost, docs/scaling.md)."""
    return RawSQL(
        f"(EXTRACT(EPOCH FROM date_trunc('second', {column}))::bigint * 1000000"
        f" + EXTRACT(MICROSECONDS FROM {column})::bigint %% 1000000)",
        (),
        output_field=BigIntegerField(),
    )


def _from_micros(micros: int | None) -> datetime | None:
    return None if micros is None else _EPOCH + timedelta(microseconds=micros)


def cluster_snapshot() -> ClusterSnapshot:
    """The cluster as placement sees it, in four queries whatever its size (each rule with its model's catalog
    backend, read in the rules' query)."""
    labels: dict[Any, dict[str, str]] = defaultdict(dict)
    for node_id, key, value in NodeLabel.objects.values_list("node_id", "key", "value"):
        labels[node_id][key] = value
    replicas = [
        ReplicaView(id, node_id, model, index, state, in_flight, _from_micros(idle), vram)
        for id, node_id, model, index, state, in_flight, idle, vram in ModelReplica.objects.annotate(
            idle_micros=_epoch_micros(
                'COALESCE("nodes_modelreplica"."last_used", "nodes_modelreplica"."loaded_at")'
            )
        ).values_list(
            "id", "node_id", "model_name", "replica_index", "state", "in_flight", "idle_micros", "vram_bytes"
        )
    ]
    in_flight: dict[Any, int] = defaultdict(int)
    for replica in replicas:
        in_flight[replica.node_id] += replica.in_flight
    nodes = {
        n["id"]: NodeSnapshot(
            id=n["id"],
            name=n["name"],
            effective_cap=n["max_replicas_override"] or n["worker_max_replicas_per_model"],
            total_vram=n["total_vram"],
            available_vram=n["available_vram"],
            reserved_vram=n["reserved_vram"],
            in_flight=in_flight[n["id"]],
            labels=labels.get(n["id"], {}),
            approved=n["approved"],
            status=n["status"],
            address=n["address"],
            artifacts=_names(n["artifacts"]),
            backends=_names(n["backends"]),
        )
        for n in Node.objects.filter(node_type=NodeType.BACKEND)
        .annotate(approved=RawSQL('"nodes_node"."approved_at" IS NOT NULL', (), output_field=BooleanField()))
        .values(
            "id",
            "name",
            "status",
            "approved",
            "max_replicas_override",
            "worker_max_replicas_per_model",
            "total_vram",
            "available_vram",
            "reserved_vram",
            "address",
            "artifacts",
            "backends",
        )
    }
    rules = {
        r["model_name"]: RuleView(
            r["id"],
            r["model_name"],
            _selector(r["node_selector"]),
            r["min_replicas"],
            r["max_replicas"],
            r["unsatisfiable_until"],
            r["unsatisfiable_ticks"],
            **{name: r[name] for name in _AUTOSCALE_FIELDS},
            backend=r["backend"] or "",
        )
        for r in SchedulingRule.objects.annotate(
            backend=Subquery(ModelConfig.objects.filter(name=OuterRef("model_name")).values("backend")[:1])
        ).values(
            "id",
            "model_name",
            "node_selector",
            "min_replicas",
            "max_replicas",
            "unsatisfiable_until",
            "unsatisfiable_ticks",
            *_AUTOSCALE_FIELDS,
            "backend",
        )
    }
    return ClusterSnapshot(nodes, replicas, rules)


# --- the warm path's definition in SQL ------------------------------------------------------------------


def routable_replica_sql(replica: str, node: str, model_param: str) -> str:
    """The SQL condition "this replica may serve a request now" over `replica` and `node` aliases: the
    replica `loaded`, its node approved, `healthy`, a backend, and carrying every `key=value` of the model's
    rule's selector (exact strings) — `gate` above, for the router's one-statement claim (BEHAVIOUR §3)."""
    return f"""{replica}.state = '{ReplicaState.LOADED.value}'
  AND {node}.status = '{NodeStatus.HEALTHY.value}'
  AND {node}.node_type = '{NodeType.BACKEND.value}'
  AND {node}.approved_at IS NOT NULL
  AND NOT EXISTS (
    SELECT 1
    FROM {SchedulingRule._meta.db_table} s
    CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(s.node_selector) = 'object'
                                       THEN s.node_selector ELSE '{{}}'::jsonb END) AS sel
    WHERE s.model_name = {model_param}
      AND NOT EXISTS (
        SELECT 1 FROM {NodeLabel._meta.db_table} l
        WHERE l.node_id = {node}.id AND l.key = sel.key AND to_jsonb(l.value) = sel.value
      )
  )"""


# --- eligibility (pure) -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """Why a node cannot take the replica: its verdict, one line of detail, and for `eviction_candidate` the
    replica whose removal makes room."""

    verdict: str
    detail: str
    victim: ReplicaView | None = None


def missing_selector_label(labels: Mapping[str, str], selector: Mapping[str, str]) -> str:
    """The first `key=value` of the selector the labels lack ('' when all match; exact strings)."""
    for key, value in selector.items():
        if not (isinstance(value, str) and labels.get(key) == value):
            return f"{key}={value}"
    return ""


def selector_matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return not missing_selector_label(labels, selector)


_HEALTHY = NodeStatus.HEALTHY.value


def gate(node: NodeSnapshot, selector: Mapping[str, str], backend: str = "") -> Judgement | None:
    """The checks that do not depend on the node's room: approval, drain, health, selector, and whether the
    node can start the model's `backend` (a node that reported no backends, or no backend named: yes)."""
    labels = node.labels
    if (
        node.approved
        and node.status == _HEALTHY
        and all(labels.get(k) == v for k, v in selector.items())
        and node.offers(backend)
    ):
        return None  # the common case, without building a verdict
    if not node.approved:
        return Judgement(Verdict.NOT_APPROVED, "not approved")
    if node.status == NodeStatus.DRAINING:
        return Judgement(Verdict.DRAINING, "draining")
    if node.status != NodeStatus.HEALTHY:
        return Judgement(Verdict.NOT_HEALTHY, str(node.status))
    missing = missing_selector_label(node.labels, selector)
    if missing:
        return Judgement(Verdict.SELECTOR_MISMATCH, f"selector {missing} missing")
    if not node.offers(backend):
        offers = ", ".join(sorted(node.backends))
        return Judgement(Verdict.BACKEND_MISSING, f"backend {backend} not offered (offers: {offers})")
    return None


def vram_fits(model: ModelRequirement, node: NodeSnapshot, *, freed: int = 0) -> bool:
    if model.vram_bytes <= 0 or not node.vram_limited:
        return True
    return node.effective_free_vram + freed >= model.vram_bytes


def _last_used_key(replica: ReplicaView) -> tuple[bool, datetime, str, int]:
    # Never-used replicas count as the least recently used; ties broken by key for determinism.
    when = replica.idle_since or datetime.min.replace(tzinfo=UTC)
    return (replica.idle_since is not None, when, replica.model_name, replica.replica_index)


def judge(
    model: ModelRequirement,
    node: NodeSnapshot,
    *,
    evictable: Iterable[ReplicaView] = (),
    live_counts: Mapping[str, int] | None = None,
    min_replicas: Mapping[str, int] | None = None,
) -> Judgement | None:
    """The first verdict that keeps `node` from taking a replica of `model`, or None when it can.

    `evictable`: idle loaded replicas of other models on the node; the least recently used one whose removal
    makes the VRAM fit, and whose model keeps its rule's minimum (over `live_counts`), turns
    `not_enough_vram` into `eviction_candidate`. Slots are per model: evicting frees VRAM only."""
    refused = gate(node, model.selector, model.backend)
    if refused:
        return refused
    if node.free_slots <= 0:
        return Judgement(Verdict.NO_FREE_SLOT, f"{node.replicas_of_model}/{node.effective_cap} slots used")
    if vram_fits(model, node):
        return None
    detail = f"needs {gib(model.vram_bytes)}, {gib(max(node.effective_free_vram, 0))} free"
    counts, minimums = live_counts or {}, min_replicas or {}
    for replica in sorted(evictable, key=_last_used_key):
        if replica.node_id != node.id or replica.model_name == model.name or not replica.idle:
            continue
        if counts.get(replica.model_name, 0) - 1 < minimums.get(replica.model_name, 0):
            continue
        if vram_fits(model, node, freed=replica.vram_bytes):
            return Judgement(
                Verdict.EVICTION_CANDIDATE, f"{detail}; room by evicting {replica.process_key}", replica
            )
    return Judgement(Verdict.NOT_ENOUGH_VRAM, detail)


# --- ranking and the plan (pure) --------------------------------------------------------------------------


def rank_key(node: NodeSnapshot, model: ModelRequirement | None = None) -> tuple[bool, bool, int, int, str]:
    """Spread before stacking, then a node holding all the model's files, then most effective free VRAM,
    then least in-flight, then name."""
    holds = model is not None and node.holds(model)
    return (node.replicas_of_model > 0, not holds, -node.effective_free_vram, node.in_flight, node.name)


def ranking_terms(model: ModelRequirement, node: NodeSnapshot) -> str:
    vram = f"{gib(node.effective_free_vram)} free" if node.vram_limited else "no VRAM reported"
    files = ""
    if model.artifacts:
        count = len(model.artifacts)
        files = (
            f", holds all {count} file(s)"
            if node.holds(model)
            else f", {len(model.artifacts - node.artifacts)} of {count} file(s) to download"
        )
    return (
        f"{node.replicas_of_model} replica(s) of {model.name} here{files}, {vram}, {node.in_flight} in flight"
    )


@dataclass(frozen=True)
class Candidate:
    """One node's line in a plan or a decision record."""

    node_id: Any
    node: str
    verdict: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"node": self.node, "verdict": self.verdict, "detail": self.detail}

    def line(self) -> str:
        return f"{self.node}: {self.detail}"


_VERDICT_ORDER = {verdict: index for index, verdict in enumerate(Verdict.values)}


@dataclass
class Plan:
    """What placing `model` would do on one snapshot: every node with its verdict (eligible ones best
    first, then the others by name), the eligible nodes ranked, and — when none is eligible — the eviction
    that would make room."""

    model: ModelRequirement
    candidates: list[Candidate]
    eligible: list[NodeSnapshot]
    victim: ReplicaView | None = None
    victim_node: NodeSnapshot | None = None

    @property
    def chosen(self) -> NodeSnapshot | None:
        return self.eligible[0] if self.eligible else None

    @property
    def headline(self) -> str:
        """The refusal in three words, by the furthest check any node passed."""
        furthest = max((_VERDICT_ORDER[c.verdict] for c in self.candidates), default=-1)
        if furthest >= _VERDICT_ORDER[Verdict.NOT_ENOUGH_VRAM]:
            return REASON_NOT_ENOUGH_VRAM
        if furthest == _VERDICT_ORDER[Verdict.NO_FREE_SLOT]:
            return REASON_NO_FREE_SLOT
        if furthest == _VERDICT_ORDER[Verdict.BACKEND_MISSING]:
            return reason_no_backend(self.model.backend)
        return REASON_NO_MATCHING_NODE

    def refusal(self) -> str:
        """`cannot place M: <headline> (node: reason; …)`, the gateway's and the breaker's text."""
        lines = [c.line() for c in self.candidates]
        more = f"; and {len(lines) - MESSAGE_NODES} more" if len(lines) > MESSAGE_NODES else ""
        nodes = f" ({'; '.join(lines[:MESSAGE_NODES])}{more})" if lines else " (no backend node)"
        return f"cannot place {self.model.name}: {self.headline}{nodes}"

    def with_refusals(self, refused: Mapping[Any, Judgement]) -> Plan:
        """The plan with the verdicts a claim answered under the node's lock in place of the snapshot's."""
        if not refused:
            return self
        candidates = [
            Candidate(c.node_id, c.node, refused[c.node_id].verdict, refused[c.node_id].detail)
            if c.node_id in refused
            else c
            for c in self.candidates
        ]
        eligible = [node for node in self.eligible if node.id not in refused]
        rank = {node.id: index for index, node in enumerate(eligible)}
        candidates = [
            replace(c, verdict=Verdict.CHOSEN if rank[c.node_id] == 0 else Verdict.RANKED_LOWER)
            if c.node_id in rank
            else c
            for c in candidates
        ]
        return replace(self, candidates=_ordered(candidates), eligible=eligible)

    def records(self) -> list[dict[str, str]]:
        return [candidate.as_dict() for candidate in self.candidates]

    def as_dict(self) -> dict[str, Any]:
        """The dry run's answer (`GET /api/plan`, `cluster_status --why`)."""
        chosen = self.chosen
        return {
            "model": self.model.name,
            "vram_bytes": self.model.vram_bytes,
            "selector": dict(self.model.selector),
            "chosen": chosen.name if chosen else None,
            "evict": self.victim.process_key if self.victim else None,
            "evict_node": self.victim_node.name if self.victim_node else None,
            "message": "" if chosen else self.refusal(),
            "candidates": self.records(),
        }


_ELIGIBLE = frozenset({Verdict.CHOSEN, Verdict.RANKED_LOWER})


def _ordered(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Eligible nodes in their order (chosen first), then the refused ones by name."""
    first: list[Candidate] = []
    rest: list[Candidate] = []
    for candidate in candidates:
        (first if candidate.verdict in _ELIGIBLE else rest).append(candidate)
    return first + sorted(rest, key=lambda c: c.node)


def evaluate(
    model: ModelRequirement,
    nodes: Iterable[NodeSnapshot],
    *,
    idle: Iterable[ReplicaView] = (),
    live_counts: Mapping[str, int] | None = None,
    min_replicas: Mapping[str, int] | None = None,
) -> Plan:
    """Every node judged and the eligible ones ranked (BEHAVIOUR §4.2). With none eligible, the eviction
    victim is the least recently used idle replica among the `eviction_candidate` nodes' victims."""
    by_node: dict[Any, list[ReplicaView]] = defaultdict(list)
    for replica in idle:
        by_node[replica.node_id].append(replica)
    eligible: list[NodeSnapshot] = []
    refused: list[tuple[NodeSnapshot, Judgement]] = []
    for node in nodes:
        judgement = judge(
            model,
            node,
            evictable=by_node.get(node.id, ()),
            live_counts=live_counts,
            min_replicas=min_replicas,
        )
        if judgement is None:
            eligible.append(node)
        else:
            refused.append((node, judgement))
    eligible.sort(key=lambda node: rank_key(node, model))
    candidates = [
        Candidate(
            node.id,
            node.name,
            Verdict.CHOSEN if rank == 0 else Verdict.RANKED_LOWER,
            ranking_terms(model, node),
        )
        for rank, node in enumerate(eligible)
    ]
    candidates += [Candidate(node.id, node.name, j.verdict, j.detail) for node, j in refused]
    plan = Plan(model, _ordered(candidates), eligible)
    if not eligible:
        victims = [(j.victim, node) for node, j in refused if j.victim is not None]
        if victims:
            plan.victim, plan.victim_node = min(victims, key=lambda pair: _last_used_key(pair[0]))
    return plan


def choose_nodes(model: ModelRequirement, count: int, eligible: Iterable[NodeSnapshot]) -> list[NodeSnapshot]:
    """Up to `count` placements for one model among its eligible nodes (a plan's `eligible`), each ranked
    after the previous one was counted in: replicas spread across nodes before they stack (pure)."""
    view = {node.id: node for node in eligible}
    picks = []
    for _ in range(count):
        if not view:
            break
        best = min(view.values(), key=lambda node: rank_key(node, model))
        picks.append(best)
        after = replace(
            best,
            replicas_of_model=best.replicas_of_model + 1,
            reserved_vram=best.reserved_vram + (max(model.vram_bytes, 0) if best.vram_limited else 0),
        )
        if judge(model, after) is None:
            view[best.id] = after
        else:
            del view[best.id]
    return picks


# --- the claim (under the node's row lock) ----------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A claim's answer: the `loading` row, or the verdict that refused it on the locked row."""

    replica: ModelReplica | None
    refused: Judgement | None = None


def _free_indexes(cap: int, taken: Iterable[int]) -> list[int]:
    used = set(taken)
    return [index for index in range(cap) if index not in used]


def replica_claim(
    *,
    node_id: Any,
    model_name: str,
    vram_bytes: int = 0,
    backend: str = "",
    selector: Mapping[str, str] | None = None,
    artifacts: frozenset[str] = frozenset(),
) -> Claim:
    """Claims a slot for one replica of the model on the node in one short transaction: locks the node row,
    judges it again on what is committed now (same predicate as the plan, no eviction), inserts a `loading`
    row at the lowest free index (a unique violation means another scheduler took it: the next one) and adds
    the reservation (`vram_bytes`, nothing on a node reporting no VRAM). Never raises for a lost race: the
    refusal says which check failed. With `artifacts` (the model's files' sha256) the node does not hold
    all of, the row starts `downloading` (it counts against capacity exactly like `loading`)."""
    if isinstance(vram_bytes, bool) or not isinstance(vram_bytes, int) or vram_bytes < 0:
        raise ValueError("vram_bytes must be a whole number of bytes, at least 0")
    model = ModelRequirement(model_name, vram_bytes, dict(selector or {}), backend=backend)
    now = timezone.now()
    with primary_reads(), transaction.atomic():
        node = Node.objects.select_for_update().filter(pk=node_id).first()
        if node is None:
            return Claim(None, Judgement(Verdict.NOT_HEALTHY, "removed"))
        if node.node_type != NodeType.BACKEND:
            return Claim(None, Judgement(Verdict.NOT_HEALTHY, f"{node.node_type} node"))
        taken = list(
            ModelReplica.objects.filter(node=node, model_name=model_name).values_list(
                "replica_index", flat=True
            )
        )
        snapshot = NodeSnapshot(
            id=node.id,
            name=node.name,
            effective_cap=node.effective_max_replicas,
            replicas_of_model=len(taken),
            total_vram=node.total_vram,
            available_vram=node.available_vram,
            reserved_vram=node.reserved_vram,
            labels=dict(NodeLabel.objects.filter(node=node).values_list("key", "value")) if selector else {},
            approved=node.approved_at is not None,
            status=node.status,
            backends=_names(node.backends),
        )
        refused = judge(model, snapshot)
        if refused is not None:
            return Claim(None, refused)
        reserve = vram_bytes if node.total_vram > 0 else 0
        held = _names(node.artifacts)
        state = ReplicaState.DOWNLOADING if artifacts and not artifacts <= held else ReplicaState.LOADING
        replica = None
        for index in _free_indexes(snapshot.effective_cap, taken):
            try:
                with transaction.atomic():
                    replica = ModelReplica.objects.create(
                        node=node,
                        model_name=model_name,
                        replica_index=index,
                        state=state,
                        load_started_at=now,
                        vram_bytes=reserve,
                        backend=backend,
                    )
                break
            except IntegrityError as error:
                if not isinstance(error.__cause__, psycopg.errors.UniqueViolation):
                    raise
                logger.info(
                    "slot %r on %r was taken meanwhile; trying the next",
                    process_key(model_name, index),
                    node.name,
                )
        if replica is None:
            cap = snapshot.effective_cap
            return Claim(None, Judgement(Verdict.NO_FREE_SLOT, f"{cap}/{cap} slots used"))
        if reserve:
            Node.objects.filter(pk=node.pk).update(reserved_vram=F("reserved_vram") + reserve)
    return Claim(replica)


def claim_any(
    plan: Plan, *, vram_bytes: int, backend: str, artifacts: frozenset[str] = frozenset()
) -> tuple[ModelReplica | None, Plan]:
    """Claims on the plan's eligible nodes best first until one claim wins; the plan comes back with the
    refusals of the claims that lost."""
    refused: dict[Any, Judgement] = {}
    for node in plan.eligible:
        claim = replica_claim(
            node_id=node.id,
            model_name=plan.model.name,
            vram_bytes=vram_bytes,
            backend=backend,
            selector=plan.model.selector,
            artifacts=artifacts,
        )
        if claim.replica is not None:
            return claim.replica, plan.with_refusals(refused)
        assert claim.refused is not None
        refused[node.id] = claim.refused
    return None, plan.with_refusals(refused)


@dataclass(frozen=True)
class ClaimRequest:
    """One slot wanted by a batch claim (`replicas_claim`)."""

    node_id: Any
    model_name: str
    vram_bytes: int = 0
    backend: str = ""
    selector: Mapping[str, str] = field(default_factory=dict)
    artifacts: frozenset[str] = frozenset()  # the model's files' sha256: a node without them all downloads


@dataclass(frozen=True)
class BatchClaim:
    """A batch claim's answer for one request: the `loading` row and its node (id, name, address and token
    salt: what a load needs), or the verdict that refused it."""

    replica: ModelReplica | None
    node: Node | None = None
    refused: Judgement | None = None


def replicas_claim(requests: list[ClaimRequest]) -> list[BatchClaim]:
    """`replica_claim` for many slots in one short transaction and a fixed number of statements whatever their
    number: the nodes' rows locked in id order (every writer of a node's replicas locks its row first, so the
    indexes read next cannot change), their labels and taken indexes read once, each request judged in turn
    on the committed figures plus the requests granted before it (same predicate as the plan), then every
    `loading` row inserted in one statement and the reservations added in one more. Answers one `BatchClaim`
    per request, in order. A unique violation (a writer that did not lock the node) falls back to one
    `replica_claim` per request."""
    from django.db.models import BigIntegerField, Case, Value, When

    if not requests:
        return []
    for request in requests:
        if isinstance(request.vram_bytes, bool) or not isinstance(request.vram_bytes, int):
            raise ValueError("vram_bytes must be a whole number of bytes, at least 0")
        if request.vram_bytes < 0:
            raise ValueError("vram_bytes must be a whole number of bytes, at least 0")
    now = timezone.now()
    node_ids = sorted({request.node_id for request in requests}, key=str)
    models = sorted({request.model_name for request in requests})
    try:
        with primary_reads(), transaction.atomic():
            locked = {
                node.id: node
                for node in Node.objects.select_for_update()
                .filter(pk__in=node_ids)
                .order_by("id")
                .only(
                    "id",
                    "name",
                    "node_type",
                    "address",
                    "token_salt",
                    "status",
                    "approved_at",
                    "max_replicas_override",
                    "worker_max_replicas_per_model",
                    "total_vram",
                    "available_vram",
                    "reserved_vram",
                    "artifacts",
                    "backends",
                )
            }
            taken: dict[tuple[Any, str], set[int]] = defaultdict(set)
            for node_id, model_name, index in ModelReplica.objects.filter(
                node_id__in=node_ids, model_name__in=models
            ).values_list("node_id", "model_name", "replica_index"):
                taken[(node_id, model_name)].add(index)
            labels: dict[Any, dict[str, str]] = defaultdict(dict)
            if any(request.selector for request in requests):
                for node_id, key, value in NodeLabel.objects.filter(node_id__in=node_ids).values_list(
                    "node_id", "key", "value"
                ):
                    labels[node_id][key] = value
            reserved: dict[Any, int] = defaultdict(int)
            answers: list[BatchClaim] = []
            rows: list[ModelReplica] = []
            for request in requests:
                node = locked.get(request.node_id)
                if node is None:
                    answers.append(BatchClaim(None, refused=Judgement(Verdict.NOT_HEALTHY, "removed")))
                    continue
                if node.node_type != NodeType.BACKEND:
                    refused = Judgement(Verdict.NOT_HEALTHY, f"{node.node_type} node")
                    answers.append(BatchClaim(None, refused=refused))
                    continue
                used = taken[(node.id, request.model_name)]
                snapshot = NodeSnapshot(
                    id=node.id,
                    name=node.name,
                    effective_cap=node.effective_max_replicas,
                    replicas_of_model=len(used),
                    total_vram=node.total_vram,
                    available_vram=node.available_vram,
                    reserved_vram=node.reserved_vram + reserved[node.id],
                    labels=labels.get(node.id, {}),
                    approved=node.approved_at is not None,
                    status=node.status,
                    backends=_names(node.backends),
                )
                model = ModelRequirement(
                    request.model_name, request.vram_bytes, dict(request.selector), backend=request.backend
                )
                verdict = judge(model, snapshot)
                if verdict is not None:
                    answers.append(BatchClaim(None, refused=verdict))
                    continue
                index = _free_indexes(snapshot.effective_cap, used)[0]
                used.add(index)
                reserve = request.vram_bytes if node.total_vram > 0 else 0
                reserved[node.id] += reserve
                downloads = request.artifacts and not request.artifacts <= _names(node.artifacts)
                row = ModelReplica(
                    node=node,
                    model_name=request.model_name,
                    replica_index=index,
                    state=ReplicaState.DOWNLOADING if downloads else ReplicaState.LOADING,
                    load_started_at=now,
                    vram_bytes=reserve,
                    backend=request.backend,
                )
                rows.append(row)
                answers.append(BatchClaim(row, node=node))
            with transaction.atomic():
                ModelReplica.objects.bulk_create(rows)
            grown = {node_id: size for node_id, size in reserved.items() if size}
            if grown:
                Node.objects.filter(pk__in=list(grown)).update(
                    reserved_vram=F("reserved_vram")
                    + Case(
                        *(When(pk=node_id, then=Value(size)) for node_id, size in grown.items()),
                        default=Value(0),
                        output_field=BigIntegerField(),
                    )
                )
    except IntegrityError as error:
        if not isinstance(error.__cause__, psycopg.errors.UniqueViolation):
            raise
        logger.info("a batch claim lost a slot to a concurrent writer; claiming one by one")
        return _claim_one_by_one(requests)
    return answers


def _claim_one_by_one(requests: list[ClaimRequest]) -> list[BatchClaim]:
    answers = []
    for request in requests:
        claim = replica_claim(
            node_id=request.node_id,
            model_name=request.model_name,
            vram_bytes=request.vram_bytes,
            backend=request.backend,
            selector=request.selector,
            artifacts=request.artifacts,
        )
        node = (
            Node.objects.only("id", "name", "address", "token_salt").filter(pk=request.node_id).first()
            if claim.replica is not None
            else None
        )
        answers.append(BatchClaim(claim.replica, node=node, refused=claim.refused))
    return answers
