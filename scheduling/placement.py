"""Placement: which node gets a new replica, and which idle replica to evict when none fits.

Pure functions from plain data to plain data (no database, no Django): the services fetch a snapshot,
call these, and claim the result under a row lock (BEHAVIOUR §4).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

REASON_NO_MATCHING_NODE = "no node matches the selector"
REASON_NO_FREE_SLOT = "no free slot"
REASON_NOT_ENOUGH_VRAM = "not enough VRAM"


@dataclass(frozen=True)
class ModelRequirement:
    """What a new replica of `name` needs: a node matching `selector` with a free slot and `vram_bytes`."""

    name: str
    vram_bytes: int = 0
    selector: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeSnapshot:
    """One schedulable node (approved, `healthy`, `backend`) as seen for placing model M.

    `replicas_of_model` counts M's rows on the node in any state; `in_flight` is the node's total in-flight.
    A node whose `total_vram` is 0 reports no VRAM (a CPU node) and is placed on by slots alone.
    """

    id: Any
    name: str
    effective_cap: int
    replicas_of_model: int = 0
    total_vram: int = 0
    available_vram: int = 0
    reserved_vram: int = 0
    in_flight: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def effective_free_vram(self) -> int:
        return self.available_vram - self.reserved_vram

    @property
    def free_slots(self) -> int:
        return max(self.effective_cap - self.replicas_of_model, 0)

    @property
    def vram_limited(self) -> bool:
        return self.total_vram > 0


@dataclass(frozen=True)
class CandidateFilter:
    """The nodes that can take a replica now; `reason` says why none can when `candidates` is empty."""

    candidates: list[NodeSnapshot]
    reason: str = ""


@dataclass(frozen=True)
class IdleReplica:
    """A loaded replica with no request in flight, a possible eviction victim."""

    id: Any
    node_id: Any
    model_name: str
    replica_index: int
    last_used: datetime | None = None
    vram_bytes: int = 0

    @property
    def process_key(self) -> str:
        return f"{self.model_name}#{self.replica_index}"


def selector_matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Every `key: value` of the selector is a label of the node, exact strings; a missing key never matches."""
    return all(key in labels and labels[key] == value for key, value in selector.items())


def vram_fits(model: ModelRequirement, node: NodeSnapshot, *, freed: int = 0) -> bool:
    """Whether the node has VRAM for the model (after `freed` bytes come back)."""
    if model.vram_bytes <= 0 or not node.vram_limited:
        return True
    return node.effective_free_vram + freed >= model.vram_bytes


def filter_candidates(model: ModelRequirement, nodes: Iterable[NodeSnapshot]) -> CandidateFilter:
    """Schedulable nodes matching the selector, with a free slot for the model and VRAM enough for it.

    When none is left, the reason names the first filter that emptied the list.
    """
    matching = [node for node in nodes if selector_matches(node.labels, model.selector)]
    if not matching:
        return CandidateFilter([], REASON_NO_MATCHING_NODE)
    with_slot = [node for node in matching if node.free_slots > 0]
    if not with_slot:
        return CandidateFilter([], REASON_NO_FREE_SLOT)
    fitting = [node for node in with_slot if vram_fits(model, node)]
    if not fitting:
        return CandidateFilter([], REASON_NOT_ENOUGH_VRAM)
    return CandidateFilter(fitting)


def rank_key(node: NodeSnapshot) -> tuple[bool, int, int, str]:
    """Spread before stacking, then most effective free VRAM, then least in-flight, then name."""
    return (node.replicas_of_model > 0, -node.effective_free_vram, node.in_flight, node.name)


def rank_candidates(model: ModelRequirement, candidates: Iterable[NodeSnapshot]) -> list[NodeSnapshot]:
    """Candidates best first (BEHAVIOUR §4.2). `model` is taken for a later per-rule bin-packing mode."""
    return sorted(candidates, key=rank_key)


def place(model: ModelRequirement, nodes: Iterable[NodeSnapshot]) -> CandidateFilter:
    """Filter then rank: the candidates best first, or none with the reason."""
    result = filter_candidates(model, nodes)
    return CandidateFilter(rank_candidates(model, result.candidates), result.reason)


def _last_used_key(replica: IdleReplica) -> tuple[bool, datetime | None, str, int]:
    # Never-used replicas count as the least recently used; ties broken by key for determinism.
    return (replica.last_used is not None, replica.last_used, replica.model_name, replica.replica_index)


def choose_eviction(
    model: ModelRequirement,
    nodes: Sequence[NodeSnapshot],
    idle_replicas: Iterable[IdleReplica],
    *,
    replica_counts: Mapping[str, int],
    min_replicas: Mapping[str, int],
) -> IdleReplica | None:
    """The least recently used idle replica whose removal makes `model` fit on its node.

    Only replicas on `nodes` (schedulable) that match the model's selector are considered, never a replica of
    the model itself, and never one whose model would drop below its rule's `min_replicas` (counted over
    `replica_counts`, its loading and loaded replicas). Slots are per model, so removing another model's
    replica frees VRAM only: the node must already have a free slot for the model.
    """
    by_id = {node.id: node for node in nodes if selector_matches(node.labels, model.selector)}
    for replica in sorted(idle_replicas, key=_last_used_key):
        node = by_id.get(replica.node_id)
        if node is None or replica.model_name == model.name:
            continue
        if replica_counts.get(replica.model_name, 0) - 1 < min_replicas.get(replica.model_name, 0):
            continue
        if node.free_slots > 0 and vram_fits(model, node, freed=replica.vram_bytes):
            return replica
    return None


class PlacementError(Exception):
    """A replica could not be placed or loaded; `reason` is one sentence for the operator or the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoCapacity(PlacementError):
    """Nothing fits, even after eviction: no node matches, no free slot, or not enough VRAM."""


class UnknownModel(PlacementError):
    """The model is not in the catalog, so there is nothing to load."""


class LoadFailed(PlacementError):
    """The agent could not start the replica (or it did not become ready in time); nothing was left behind.
    `retry_after`: seconds before the model's next load attempt (`scheduling.loadfailures`), when known."""

    retry_after: int | None = None
