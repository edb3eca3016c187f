"""Writes of the scheduling app. Services are keyword-only, typed, and own their transaction."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import grpc
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Least
from django.utils import timezone

from audit import services as audit
from audit.models import Action
from localai_cluster import metrics
from nodes.agent_clients import worker_control_client
from nodes.choices import ReplicaState
from nodes.models import ModelReplica, Node
from nodes.services import (
    replica_mark_loaded,
    replica_remove,
    replica_stop_on_agent,
    replica_unload,
)
from nodes.tokens import node_token_for
from scheduling import pipeline
from scheduling.catalog import model_audit
from scheduling.choices import Outcome, Trigger, Verdict
from scheduling.decisions import decision_record
from scheduling.loadfailures import load_attempt_begin, load_failure_clear, load_failure_note
from scheduling.models import ModelConfig, PlacementDecision, SchedulingRule
from scheduling.pipeline import ModelRequirement
from scheduling.placement import LoadFailed, NoCapacity, PlacementError, UnknownModel
from worker_client.client import LoadResult
from worker_client.errors import WorkerError

# --- scheduling rules (admin API: /api/nodes/scheduling) ---------------------------------------------------


def rule_upsert(
    *,
    model_name: str,
    node_selector: dict[str, str],
    min_replicas: int,
    max_replicas: int,
    target_in_flight: int = 0,
    upscale_delay: int = 30,
    downscale_delay: int | None = None,
    scale_to_zero_after: int = 0,
    prefetch: bool | None = None,
) -> SchedulingRule:
    """Creates the rule of `model_name` or updates it in place (same id). The rule's circuit breaker is reset:
    a new selector or minimum deserves a fresh look on the next reconciler tick; so is the autoscaler's
    pending scale-up or scale-down (its delays start again). The database's check constraints back the
    invariants (min, max ≥ 0; min ≤ max when max > 0; target and delays ≥ 0); callers validate first.
    Audited as `rule.create` / `rule.update`.
    `prefetch` None keeps the rule's current value (False for a new rule)."""
    with transaction.atomic():
        previous = SchedulingRule.objects.select_for_update().filter(model_name=model_name).first()
        rule, created = SchedulingRule.objects.update_or_create(
            model_name=model_name,
            defaults={
                "node_selector": dict(node_selector),
                "min_replicas": min_replicas,
                "max_replicas": max_replicas,
                "target_in_flight": target_in_flight,
                "upscale_delay": upscale_delay,
                "downscale_delay": downscale_delay,
                "scale_to_zero_after": scale_to_zero_after,
                "scale_up_since": None,
                "scale_down_since": None,
                **({} if prefetch is None else {"prefetch": prefetch}),
                "unsatisfiable_ticks": 0,
                "unsatisfiable_until": None,
                "unsatisfiable_reason": "",
            },
        )
        _rule_audit(
            Action.RULE_CREATE if created else Action.RULE_UPDATE,
            model_name,
            before=rule_state(previous),
            after=rule_state(rule),
        )
    return rule


def rule_state(rule: SchedulingRule | None) -> dict[str, Any] | None:
    """A rule as the audit trail records it (None: no rule)."""
    if rule is None:
        return None
    return {
        "node_selector": rule.node_selector,
        "min_replicas": rule.min_replicas,
        "max_replicas": rule.max_replicas,
        "target_in_flight": rule.target_in_flight,
        "upscale_delay": rule.upscale_delay,
        "downscale_delay": rule.downscale_delay,
        "scale_to_zero_after": rule.scale_to_zero_after,
    }


def _breaker_state(rule: SchedulingRule) -> dict[str, Any]:
    return {
        "unsatisfiable_ticks": rule.unsatisfiable_ticks,
        "unsatisfiable_until": rule.unsatisfiable_until,
        "unsatisfiable_reason": rule.unsatisfiable_reason,
    }


def _rule_audit(action: str, model_name: str, *, before: Any, after: Any) -> None:
    audit.record(
        action=action,
        target_type="rule",
        target_id=model_name,
        target_name=model_name,
        before=before,
        after=after,
    )


def rule_delete(*, model_name: str) -> bool:
    """Deletes the rule of `model_name`; True when there was one. Its replicas stay: without a rule nothing
    keeps or trims them, and the router still serves them. Audited as `rule.delete`."""
    with transaction.atomic():
        previous = SchedulingRule.objects.select_for_update().filter(model_name=model_name).first()
        deleted, _ = SchedulingRule.objects.filter(model_name=model_name).delete()
        if deleted:
            _rule_audit(Action.RULE_DELETE, model_name, before=rule_state(previous), after=None)
    return deleted > 0


def rules_breaker_reset(*, model_names: list[str]) -> int:
    """Closes the circuit breaker of these models' rules (the reconciler tries them on its next tick);
    answers how many were open. Each reset is audited as `rule.breaker_reset`."""
    reset = 0
    with transaction.atomic():
        rules = (
            SchedulingRule.objects.select_for_update()
            .filter(model_name__in=model_names)
            .order_by("model_name")
        )
        for rule in rules:
            before = _breaker_state(rule)
            rule.unsatisfiable_ticks, rule.unsatisfiable_until, rule.unsatisfiable_reason = 0, None, ""
            if before == _breaker_state(rule):
                continue
            rule.save(update_fields=["unsatisfiable_ticks", "unsatisfiable_until", "unsatisfiable_reason"])
            _rule_audit(Action.RULE_BREAKER_RESET, rule.model_name, before=before, after=_breaker_state(rule))
            reset += 1
    return reset


# --- end of scheduling rules ------------------------------------------------------------------------------

# --- placement (router and reconciler share this: BEHAVIOUR §4) -------------------------------------------
placement_logger = logging.getLogger("scheduling.placement")


# `ModelOptions` fields a catalog entry's `options` may set, by their proto name or LocalAI's YAML name.
_MODEL_OPTION_FIELDS = {
    "Model": "Model",
    "ContextSize": "ContextSize",
    "context_size": "ContextSize",
    "Seed": "Seed",
    "seed": "Seed",
    "NBatch": "NBatch",
    "batch": "NBatch",
    "Embeddings": "Embeddings",
    "embeddings": "Embeddings",
    "NGPULayers": "NGPULayers",
    "gpu_layers": "NGPULayers",
    "Threads": "Threads",
    "threads": "Threads",
    "ModelFile": "ModelFile",
    "Type": "Type",
    "type": "Type",
    "ModelPath": "ModelPath",
    "Options": "Options",
    "options": "Options",
}
_MODEL_OPTION_TYPES = {
    "Model": str,
    "ContextSize": int,
    "Seed": int,
    "NBatch": int,
    "Embeddings": bool,
    "NGPULayers": int,
    "Threads": int,
    "ModelFile": str,
    "Type": str,
    "ModelPath": str,
}


@dataclass(frozen=True)
class PlacementResult:
    """A replica placed and loaded: its row is `loaded` at `address`."""

    replica_id: int
    model_name: str
    replica_index: int
    node_id: Any
    node_name: str
    address: str
    load_seconds: float
    evicted: list[str] = field(default_factory=list)

    @property
    def process_key(self) -> str:
        return pipeline.process_key(self.model_name, self.replica_index)


def model_options_for(config: ModelConfig) -> dict[str, Any]:
    """The `ModelOptions` a catalog entry loads with: `Model` (the entry's `model`, else its name),
    `ContextSize`, and the fields its `options` set (proto or LocalAI YAML names; `options` as a list of
    `key:value` strings). Other keys are LocalAI settings the backend protocol has no field for: ignored."""
    values: dict[str, Any] = {"Model": config.model or config.name}
    if config.context_size:
        values["ContextSize"] = config.context_size
    for key, value in (config.options or {}).items():
        name = _MODEL_OPTION_FIELDS.get(key)
        if name == "Options":
            items = value if isinstance(value, list) else [value]
            values["Options"] = [*values.get("Options", []), *(str(item) for item in items)]
        elif name and isinstance(value, _MODEL_OPTION_TYPES[name]):
            values[name] = value
    return values


def model_requirement(config: ModelConfig) -> ModelRequirement:
    """What a new replica of a catalog entry needs: its VRAM, its backend, and its rule's selector (none
    without a rule)."""
    rule = SchedulingRule.objects.filter(model_name=config.name).only("node_selector").first()
    selector = dict(rule.node_selector) if rule and isinstance(rule.node_selector, dict) else {}
    return ModelRequirement(
        config.name, config.vram_bytes, selector, pipeline.model_artifacts(config.files), config.backend
    )


def placement_plan(*, model_name: str) -> pipeline.Plan:
    """The dry run: what placing one replica of a catalog model would do now — every node's verdict, the
    node chosen, or the replica an eviction would unload — without claiming or loading anything. Raises
    `UnknownModel` for a model the catalog does not know."""
    config = ModelConfig.objects.filter(name=model_name).first()
    if config is None:
        raise UnknownModel(f"the model {model_name!r} is not in the catalog")
    return pipeline.cluster_snapshot().evaluate(model_requirement(config))


def replica_stop_on_node(*, node_id: Any, process_key: str) -> None:
    """Asks the agent of `node_id` to stop exactly `process_key` (errors logged). No transaction is open."""
    node = Node.objects.filter(pk=node_id).only("id", "name", "address", "token_salt").first()
    if node is not None:
        replica_stop_on_agent(node=node, process_key=process_key)


def replica_load(*, replica: ModelReplica, config: ModelConfig) -> PlacementResult:
    """`LoadReplica` for a claimed `loading` (or `downloading`) row, outside any transaction, with the catalog
    entry's backend, options, VRAM and `files` (staged by the agent first, within `LOCALAI_DOWNLOAD_TIMEOUT`),
    bounded by `LOCALAI_LOAD_TIMEOUT`. Success → the same row `loaded` at the agent's
    address. Failure or timeout → the row deleted, exactly its reservation released, the agent told to stop
    exactly that key, and `LoadFailed` raised."""
    node = Node.objects.only("id", "name", "address", "token_salt").get(pk=replica.node_id)
    try:
        result = replica_load_call(replica=replica, config=config, node=node)
    except WorkerError as error:
        return replica_load_finish(replica=replica, config=config, node=node, outcome=error)
    return replica_load_finish(replica=replica, config=config, node=node, outcome=result)


# An agent refuses every call as UNAUTHENTICATED until it has read the answer to its registration, which
# carries its node token, while the control plane may place on the node from the moment the registration
# commits. A load refused so is tried again for this long (docs/reliability.md, "A node's first moments")
# instead of failing at once and putting the model in its load-failure backoff.
TOKEN_GRACE = 2.0
TOKEN_RETRY_START = 0.05


def replica_load_call(*, replica: ModelReplica, config: ModelConfig, node: Node) -> LoadResult:
    """The network half of `replica_load`: the agent's `LoadReplica` answer (raises `WorkerError`), an
    UNAUTHENTICATED refusal tried again for `TOKEN_GRACE` seconds. No database access, so the reconciler runs
    many in parallel threads; `node` needs id, address and token salt."""
    client = worker_control_client(node.address, node_token_for(node), settings.LOCALAI_AGENT_CALL_TIMEOUT)
    deadline = time.monotonic() + TOKEN_GRACE
    delay = TOKEN_RETRY_START
    while True:
        try:
            return client.load_replica(
                replica.model_name,
                replica.replica_index,
                config.backend,
                model_options_for(config),
                config.vram_bytes,
                load_timeout=settings.LOCALAI_LOAD_TIMEOUT,
                files=list(config.files or []),
                download_timeout=settings.LOCALAI_DOWNLOAD_TIMEOUT,
            )
        except WorkerError as error:
            if error.code != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() + delay > deadline:
                raise
            placement_logger.info(
                "the agent of %r refused %r as unauthenticated (its registration answer may still be on its "
                "way): trying again",
                node.name,
                replica.process_key,
            )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def replica_load_finish(
    *,
    replica: ModelReplica,
    config: ModelConfig,
    node: Node,
    outcome: LoadResult | WorkerError,
    marked: bool | None = None,
) -> PlacementResult:
    """The database half of `replica_load`, given the agent's answer (or its error): one UPDATE on success.
    `marked`: the UPDATE was already made for many rows at once (`nodes.services.replicas_mark_loaded`, the
    reconciler's batch), and whether it changed this row."""
    process_key = replica.process_key
    if isinstance(outcome, WorkerError):
        error = outcome
        replica_remove(replica_id=replica.id)
        replica_stop_on_agent(node=node, process_key=process_key)
        placement_logger.warning("loading %r on %r failed: %r", process_key, node.name, str(error))
        metrics.PLACEMENT_FAILURES.labels(config.name, "load_failed").inc()
        raise LoadFailed(f"loading {config.name} on {node.name} failed: {error.details or error}") from error
    result = outcome
    if marked is None:
        marked = replica_mark_loaded(replica_id=replica.id, address=result.address)
    if not marked:
        # The row went away during the load (node removed, heartbeat reconciliation): do not leave a process.
        replica_stop_on_agent(node=node, process_key=process_key)
        metrics.PLACEMENT_FAILURES.labels(config.name, "load_failed").inc()
        raise LoadFailed(f"the replica {process_key} on {node.name} was removed while it loaded")
    placement_logger.info(
        "loaded %r on %r at %r in %.2fs", process_key, node.name, result.address, result.load_seconds
    )
    metrics.PLACEMENTS.labels(config.name).inc()
    return PlacementResult(
        replica_id=replica.id,
        model_name=replica.model_name,
        replica_index=replica.replica_index,
        node_id=node.id,
        node_name=node.name,
        address=result.address,
        load_seconds=result.load_seconds,
    )


def replica_evict(*, replica: pipeline.ReplicaView) -> bool:
    """Unloads exactly this idle replica: flips it `loaded` → `unloading` only while its in-flight is 0 (so
    no request can claim it any more), asks its agent to stop exactly its key, and removes the row. VRAM the
    worker already counted as used (a replica a heartbeat listed) is credited to the node until the next
    heartbeat reports the real figure, so a placement right after can use it. False when the replica was
    claimed or removed meanwhile (nothing done)."""
    flipped = ModelReplica.objects.filter(pk=replica.id, state=ReplicaState.LOADED, in_flight=0).update(
        state=ReplicaState.UNLOADING
    )
    if not flipped:
        return False
    _unload(replica)
    placement_logger.info("evicted %r", replica.process_key)
    return True


def replica_retire(*, replica: pipeline.ReplicaView) -> bool:
    """Takes a busy replica out of routing for a scale-down: flips it `loaded` → `unloading` whatever its
    in-flight, so no new request claims it while the ones it holds run to their end (their releases still
    count down its in-flight); `replicas_unload_retired` unloads it once it is idle. False when it was no
    longer `loaded`."""
    return bool(
        ModelReplica.objects.filter(pk=replica.id, state=ReplicaState.LOADED).update(
            state=ReplicaState.UNLOADING
        )
    )


def replicas_unload_retired(*, replicas: list[pipeline.ReplicaView]) -> list[str]:
    """Unloads the `unloading` replicas among `replicas` whose in-flight came down to 0 (retired ones whose
    last request ended); answers their process keys."""
    done = []
    for replica in replicas:
        if replica.state != ReplicaState.UNLOADING or replica.in_flight > 0:
            continue
        if ModelReplica.objects.filter(pk=replica.id, state=ReplicaState.UNLOADING, in_flight=0).exists():
            _unload(replica)
            done.append(replica.process_key)
    return done


def _unload(replica: pipeline.ReplicaView) -> None:
    """Stops an `unloading` replica's process on its agent, removes its row, credits its VRAM."""
    row = ModelReplica.objects.filter(pk=replica.id).values_list("vram_bytes", "last_seen_at").first()
    node = Node.objects.filter(pk=replica.node_id).only("id", "name", "address", "token_salt").first()
    if node is not None:
        replica_stop_on_agent(node=node, process_key=replica.process_key)
    replica_remove(replica_id=replica.id)
    vram_bytes, last_seen_at = row or (0, None)
    if vram_bytes and last_seen_at is not None:
        Node.objects.filter(pk=replica.node_id, total_vram__gt=0).update(
            available_vram=Least(F("available_vram") + vram_bytes, F("total_vram"))
        )


def replica_place(*, model_name: str, trigger: str = Trigger.REQUEST) -> PlacementResult:
    """Places and loads one new replica of a catalog model (BEHAVIOUR §4) through `scheduling.pipeline`.

    Plans on a fresh snapshot and claims on the eligible nodes best first (each claim re-judges its node under
    the row lock); the load then runs outside any transaction. When every claim lost a race, it plans once
    more on a fresh snapshot; when no node is eligible, it evicts the plan's victim (the least recently used
    idle replica whose removal makes room) and plans once more. Every attempt writes one decision record
    (and the eviction its own). Raises `UnknownModel` (not in the catalog), `NoCapacity(reason)` — the
    reason names each node's verdict — or `LoadFailed` (the load failed; row, reservation and process gone;
    the failure starts or doubles the model's cooldown) — `LoadBackingOff` (nothing started) while it runs.
    Call it from sync code; from async code run it in a thread. Must not be called inside a transaction.
    """
    config = ModelConfig.objects.filter(name=model_name).first()
    if config is None:
        raise UnknownModel(f"the model {model_name!r} is not in the catalog")
    attempt = load_attempt_begin(model_name=model_name)  # LoadBackingOff while a failed load's cooldown runs
    started = time.monotonic()
    requirement = model_requirement(config)
    evicted: list[str] = []
    reranked = False
    while True:
        plan = pipeline.cluster_snapshot().evaluate(requirement)
        had_candidates = bool(plan.eligible)
        replica, plan = pipeline.claim_any(
            plan, vram_bytes=config.vram_bytes, backend=config.backend, artifacts=requirement.artifacts
        )
        if replica is not None:
            break
        if had_candidates and not reranked:
            reranked = True  # every claim lost a race: rank once more on what is committed now
            continue
        if plan.victim is not None and not evicted and replica_evict(replica=plan.victim):
            evicted.append(plan.victim.process_key)
            decision_record(
                model_name=plan.victim.model_name,
                trigger=trigger,
                outcome=Outcome.EVICTED,
                node_name=plan.victim_node.name if plan.victim_node else "",
                replica_index=plan.victim.replica_index,
                message=f"evicted {plan.victim.process_key} to make room for {model_name}",
                candidates=plan.records(),
            )
            continue
        message = plan.refusal()
        metrics.PLACEMENT_FAILURES.labels(model_name, "no_capacity").inc()
        decision_record(
            model_name=model_name,
            trigger=trigger,
            outcome=Outcome.NO_CAPACITY,
            duration=time.monotonic() - started,
            message=message,
            candidates=plan.records(),
        )
        raise NoCapacity(message)
    node_name = next((c.node for c in plan.candidates if c.verdict == Verdict.CHOSEN), "")
    try:
        result = replica_load(replica=replica, config=config)
    except LoadFailed as error:
        load_failure_note(attempt=attempt, error=error)
        decision_record(
            model_name=model_name,
            trigger=trigger,
            outcome=Outcome.LOAD_FAILED,
            node_name=node_name,
            replica_index=replica.replica_index,
            duration=time.monotonic() - started,
            message=error.reason,
            candidates=plan.records(),
        )
        raise
    load_failure_clear(model_name=model_name, reason="loaded")
    decision_record(
        model_name=model_name,
        trigger=trigger,
        outcome=Outcome.PLACED,
        node_name=result.node_name,
        replica_index=result.replica_index,
        duration=time.monotonic() - started,
        message=f"placed {result.process_key} on {result.node_name}",
        candidates=plan.records(),
    )
    return PlacementResult(**{**result.__dict__, "evicted": evicted})


# --- end of placement -------------------------------------------------------------------------------------

# --- admin actions on one catalog model: "load one now" and "unload all" (the models page and the API) ----


@dataclass(frozen=True)
class LoadNowResult:
    """What "load one now" did: `placed` (the replica, loaded) or `error` (why not: `NoCapacity` with every
    node's verdict, `LoadFailed`, `LoadBackingOff`), and the decision record the attempt wrote (None when
    nothing was attempted: the model's load cooldown was running)."""

    placed: PlacementResult | None
    error: PlacementError | None
    decision: PlacementDecision | None

    @property
    def outcome(self) -> str:
        if self.placed is not None:
            return Outcome.PLACED
        if isinstance(self.error, NoCapacity):
            return Outcome.NO_CAPACITY
        return Outcome.LOAD_FAILED


def model_load_one(*, model_name: str) -> LoadNowResult:
    """ "Load one now": places and loads one more replica of a catalog model through the one placement
    pipeline (`replica_place`, trigger `admin`): the same verdicts, ranking, claim, eviction of an idle
    replica when nothing fits, load backoff and decision record as a request's cold load. Answers the
    outcome with the decision record written; raises only `UnknownModel`. Sync, outside any transaction;
    it returns when the load has finished (bounded by `LOCALAI_LOAD_TIMEOUT`)."""
    started = timezone.now()
    placed: PlacementResult | None = None
    error: PlacementError | None = None
    try:
        placed = replica_place(model_name=model_name, trigger=Trigger.ADMIN)
    except UnknownModel:
        raise
    except PlacementError as failure:
        error = failure
    decision = (
        PlacementDecision.objects.filter(
            model_name=model_name, trigger=Trigger.ADMIN, created_at__gte=started
        )
        .exclude(outcome=Outcome.EVICTED)
        .order_by("-created_at", "-id")
        .first()
    )
    placement_logger.info(
        "load one now of %r: %s", model_name, placed.process_key if placed else getattr(error, "reason", "")
    )
    # The placement spans several transactions (claim, load, stamp); its audit entry is written once the
    # outcome is known, in its own transaction with nothing else to roll back.
    with transaction.atomic():
        model_audit(
            Action.MODEL_LOAD_NOW,
            name=model_name,
            before=None,
            after={
                "outcome": "loaded" if placed else "refused",
                "node": placed.node_name if placed else None,
                "process_key": placed.process_key if placed else None,
                "error": None if placed else str(error),
                "decision": decision.pk if decision else None,
            },
        )
    return LoadNowResult(placed=placed, error=error, decision=decision)


@dataclass(frozen=True)
class UnloadedReplica:
    """One replica "unload all" removed (or, in `ReplicasBusy.busy`, would have cut off)."""

    node_name: str
    process_key: str
    state: str
    in_flight: int


class ReplicasBusy(Exception):
    """ "Unload all" without `force` found replicas serving requests: nothing was unloaded."""

    def __init__(self, model_name: str, busy: list[UnloadedReplica]) -> None:
        self.model_name = model_name
        self.busy = busy
        listed = ", ".join(f"{r.process_key} on {r.node_name} ({r.in_flight} in flight)" for r in busy)
        requests = sum(r.in_flight for r in busy)
        super().__init__(
            f"{len(busy)} replica{'s' if len(busy) != 1 else ''} of {model_name} "
            f"{'are' if len(busy) != 1 else 'is'} serving {requests} request{'s' if requests != 1 else ''} "
            f"({listed}); nothing was unloaded. Unload anyway to cut {'them' if requests != 1 else 'it'} off."
        )


def model_unload_all(*, model_name: str, force: bool = False) -> list[UnloadedReplica]:
    """ "Unload all": removes every replica row of the model, on every node, in one transaction, then (after
    commit) asks each agent to stop exactly those process keys (`nodes.services.replica_unload`, the one
    unload). A replica serving requests is never cut off silently: without `force`, any replica with
    requests in flight makes it raise `ReplicasBusy` (listing them) and nothing changes; with `force` they
    are unloaded too and their requests cut off, as the per-replica Unload does. The rows are locked (node
    rows first, as every writer of replicas does) so no request can claim a replica between the check and
    the removal. Answers the replicas removed ([] when there were none). A rule with a minimum places
    replicas again on the reconciler's next tick, and a request loads one on demand."""
    with transaction.atomic():
        node_ids = sorted(
            set(ModelReplica.objects.filter(model_name=model_name).values_list("node_id", flat=True)), key=str
        )
        if not node_ids:
            return []
        list(Node.objects.select_for_update().filter(pk__in=node_ids).order_by("pk").values_list("pk"))
        # Locked in id order (`nodes.services.replicas_locked`'s rule), then grouped by node.
        rows = list(
            ModelReplica.objects.select_for_update(of=("self",))
            .select_related("node")
            .filter(model_name=model_name, node_id__in=node_ids)
            .order_by("pk")
        )
        rows.sort(key=lambda row: (row.node.name, row.replica_index))
        described = {
            row.pk: UnloadedReplica(row.node.name, row.process_key, row.state, row.in_flight) for row in rows
        }
        busy = [described[row.pk] for row in rows if row.in_flight > 0]
        if busy and not force:
            raise ReplicasBusy(model_name, busy)
        removed: list[UnloadedReplica] = []
        for _, group in groupby(rows, key=lambda row: row.node_id):
            replicas = list(group)
            keys = set(replica_unload(node=replicas[0].node, replicas=replicas))
            removed += [described[row.pk] for row in replicas if row.process_key in keys]
        if removed:
            model_audit(
                Action.MODEL_UNLOAD_ALL,
                name=model_name,
                before={"replicas": [vars(r) for r in removed], "force": force},
                after={"replicas": []},
            )
    placement_logger.info(
        "unload all of %r: %s%s",
        model_name,
        [r.process_key for r in removed],
        " (requests in flight cut off)" if busy else "",
    )
    return removed


# --- model files: prefetch (issue 15) ----------------------------------------------------------------------


@dataclass(frozen=True)
class PrefetchResult:
    """One node asked to stage a model's files: what it is downloading and what it already holds, or the
    error of the call."""

    node_name: str
    downloading: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    error: str = ""


def model_prefetch(*, model_name: str, only_missing: bool = False) -> list[PrefetchResult]:
    """Asks every schedulable node matching the model's rule's selector (and able to start its backend, when
    the node reported its backends) to stage the model's `files` ahead
    of any load (`StageFiles`: the agent starts the downloads in the background and answers at once). With
    `only_missing`, nodes whose heartbeat already lists every file are skipped (the reconciler's prefetch).
    Raises `UnknownModel`. Errors per node are answered, not raised."""
    config = ModelConfig.objects.filter(name=model_name).first()
    if config is None:
        raise UnknownModel(f"the model {model_name!r} is not in the catalog")
    files = list(config.files or [])
    if not files:
        return []
    requirement = model_requirement(config)
    results: list[PrefetchResult] = []
    for node in pipeline.cluster_snapshot().nodes.values():
        if pipeline.gate(node, requirement.selector, requirement.backend) is not None:
            continue
        if only_missing and node.holds(requirement):
            continue
        row = Node.objects.only("id", "name", "address", "token_salt").filter(pk=node.id).first()
        if row is None:
            continue
        client = worker_control_client(row.address, node_token_for(row), settings.LOCALAI_AGENT_CALL_TIMEOUT)
        try:
            downloading, held = client.stage_files(
                model_name, files, download_timeout=settings.LOCALAI_DOWNLOAD_TIMEOUT
            )
        except WorkerError as error:
            placement_logger.warning("prefetch of %s on %s failed: %s", model_name, node.name, error)
            results.append(PrefetchResult(node.name, error=str(error.details or error)))
            continue
        if downloading:
            placement_logger.info("prefetching %s on %s: %s", model_name, node.name, ", ".join(downloading))
        results.append(PrefetchResult(node.name, downloading, held))
    return results


def model_prefetch_now(*, model_name: str) -> list[PrefetchResult]:
    """An admin's prefetch (`POST /api/models/{name}/prefetch`): `model_prefetch` on every matching node, then
    one `model.prefetch` audit entry with what each node answered (the reconciler's own prefetch for a
    `prefetch: true` rule is not an admin action and is not audited)."""
    results = model_prefetch(model_name=model_name)
    with transaction.atomic():
        model_audit(
            Action.MODEL_PREFETCH,
            name=model_name,
            before=None,
            after={
                "nodes": {
                    result.node_name: {
                        "downloading": result.downloading,
                        "held": result.held,
                        "error": result.error,
                    }
                    for result in results
                }
            },
        )
    return results
