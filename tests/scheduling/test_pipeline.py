"""The placement pipeline (scheduling.pipeline): its choices as pure functions (SCENARIOS §3: 66–75, 80–85),
then every verdict, the claim's refusals, the dry run and the decision records on the real database."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connections
from django.utils import timezone

from nodes.choices import NodeStatus
from nodes.models import ModelReplica, Node
from scheduling import pipeline, services
from scheduling.choices import Outcome, Trigger, Verdict
from scheduling.models import PlacementDecision
from scheduling.pipeline import (
    REASON_NO_FREE_SLOT,
    REASON_NO_MATCHING_NODE,
    REASON_NOT_ENOUGH_VRAM,
    ModelRequirement,
    NodeSnapshot,
    ReplicaView,
    evaluate,
    rank_key,
    selector_matches,
)
from scheduling.placement import NoCapacity
from scheduling.services import placement_plan, replica_place
from tests.factories import (
    ModelConfigFactory,
    NodeFactory,
    NodeLabelFactory,
    ReplicaFactory,
    RuleFactory,
)


@dataclass
class Placed:
    candidates: list
    reason: str


def place(model, nodes):
    """The plan's eligible nodes best first, or none with the headline reason."""
    plan = evaluate(model, list(nodes))
    return Placed(plan.eligible, "" if plan.eligible else plan.headline)


def rank_candidates(model, nodes):
    return sorted(nodes, key=rank_key)


def choose_eviction(model, nodes, idle_replicas, *, replica_counts, min_replicas):
    plan = evaluate(model, nodes, idle=idle_replicas, live_counts=replica_counts, min_replicas=min_replicas)
    return plan.victim


GiB = 1024**3
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def node(name, *, free=0, reserved=0, total=None, cap=1, hosted=0, in_flight=0, labels=None, backends=()):
    """A snapshot with `free` GiB available (total defaults to available, 0 meaning a CPU node); `backends`:
    what its agent reported it can start (none: not reported)."""
    available = free * GiB
    return NodeSnapshot(
        id=name,
        name=name,
        effective_cap=cap,
        replicas_of_model=hosted,
        total_vram=(total if total is not None else free) * GiB,
        available_vram=available,
        reserved_vram=reserved * GiB,
        in_flight=in_flight,
        labels=labels or {},
        backends=frozenset(backends),
    )


def names(nodes):
    return [n.name for n in nodes]


def test_more_effective_free_vram_wins():  # 66
    result = place(ModelRequirement("m", 8 * GiB), [node("small", free=4), node("big", free=16)])
    assert names(result.candidates) == ["big"]


def test_model_larger_than_any_node_is_refused_with_vram_reason():  # 67
    result = place(ModelRequirement("m", 32 * GiB), [node("tiny", free=2)])
    assert result.candidates == []
    assert result.reason == REASON_NOT_ENOUGH_VRAM


def test_reserved_vram_counts_against_free():  # 68
    nodes = [node("five", free=5), node("twenty", free=20, reserved=18)]
    result = place(ModelRequirement("m", 8 * GiB), nodes)
    assert result.candidates == []
    assert result.reason == REASON_NOT_ENOUGH_VRAM


def test_vram_is_a_limit_not_a_preference():  # 69
    nodes = [node("a", free=4, cap=4), node("b", free=4, cap=2)]
    assert place(ModelRequirement("m", 8 * GiB), nodes).candidates == []


def test_cpu_node_is_placed_on_by_slots_alone():  # 70
    result = place(ModelRequirement("m", 8 * GiB), [node("cpu", free=0, total=0)])
    assert names(result.candidates) == ["cpu"]


def test_cpu_node_without_slot_is_refused_for_slots():
    result = place(ModelRequirement("m", 8 * GiB), [node("cpu", total=0, hosted=1)])
    assert result.reason == REASON_NO_FREE_SLOT


def test_spread_before_stacking():  # 71
    nodes = [node("a", free=40, cap=2, hosted=1), node("b", free=10, cap=2)]
    assert names(place(ModelRequirement("m"), nodes).candidates) == ["b", "a"]


def test_stacks_on_the_only_node_with_a_free_slot():  # 72
    result = place(ModelRequirement("m"), [node("only", free=10, cap=2, hosted=1)])
    assert names(result.candidates) == ["only"]


def test_full_node_has_no_free_slot():
    result = place(ModelRequirement("m"), [node("only", free=10, cap=2, hosted=2)])
    assert result.reason == REASON_NO_FREE_SLOT


def test_ranking_order_d_e_c_b_a():  # 73
    candidates = [
        node("a", free=40, cap=2, hosted=1),
        node("b", free=10),
        node("c", free=20, in_flight=3),
        node("d", free=20, in_flight=1),
        node("e", free=20, in_flight=1),
    ]
    assert names(rank_candidates(ModelRequirement("m"), candidates)) == ["d", "e", "c", "b", "a"]
    assert names(rank_candidates(ModelRequirement("m"), reversed(candidates))) == ["d", "e", "c", "b", "a"]


def test_selector_restricts_candidates_and_no_selector_takes_any():  # 74
    nodes = [
        node("nv", free=8, labels={"gpu.vendor": "nvidia"}),
        node("amd", free=16, labels={"gpu.vendor": "amd"}),
    ]
    assert names(place(ModelRequirement("m", selector={"gpu.vendor": "nvidia"}), nodes).candidates) == ["nv"]
    assert names(place(ModelRequirement("m"), nodes).candidates) == ["amd", "nv"]


def test_selector_matching_no_node_says_so():  # 75
    result = place(ModelRequirement("m", selector={"env": "qa"}), [node("n", free=8, labels={"env": "prod"})])
    assert result.candidates == []
    assert result.reason == REASON_NO_MATCHING_NODE


def test_no_nodes_at_all_means_no_matching_node():
    assert place(ModelRequirement("m"), []).reason == REASON_NO_MATCHING_NODE


def test_selector_matching_is_exact_and_missing_key_never_matches():
    assert selector_matches({"gpu.vendor": "nvidia", "x": "y"}, {"gpu.vendor": "nvidia"})
    assert not selector_matches({"gpu.vendor": "NVIDIA"}, {"gpu.vendor": "nvidia"})
    assert not selector_matches({}, {"gpu.vendor": ""})
    assert selector_matches({}, {})


def test_slot_reason_wins_over_vram_reason_when_no_slot_anywhere():
    nodes = [node("full", free=40, hosted=1), node("small", free=1, total=0, hosted=1)]
    assert place(ModelRequirement("m", 8 * GiB), nodes).reason == REASON_NO_FREE_SLOT


def test_a_node_whose_agent_lacks_the_models_backend_is_refused_one_that_reported_none_is_not():
    nodes = [
        node("echo-only", free=40, backends=["echo", "whisper"]),
        node("llama", free=8, backends=["echo", "llama-cpp"]),
        node("old-agent", free=16),  # reported no backends (an older agent): allowed, as before
    ]
    plan = evaluate(ModelRequirement("m", 4 * GiB, backend="llama-cpp"), nodes)
    assert names(plan.eligible) == ["old-agent", "llama"]
    refused = {c.node: (c.verdict, c.detail) for c in plan.candidates if c.node == "echo-only"}
    assert refused == {
        "echo-only": (Verdict.BACKEND_MISSING, "backend llama-cpp not offered (offers: echo, whisper)")
    }
    # A model whose backend is unknown (not in the catalog) may go to any node.
    assert names(place(ModelRequirement("m"), nodes).candidates) == ["echo-only", "old-agent", "llama"]


def test_backend_missing_comes_right_after_the_selector_and_before_the_room_checks():
    assert (
        Verdict.values.index(Verdict.BACKEND_MISSING) == Verdict.values.index(Verdict.SELECTOR_MISMATCH) + 1
    )
    model = ModelRequirement("m", 8 * GiB, selector={"gpu": "a100"}, backend="vllm")
    a100 = {"gpu": "a100"}
    # Without the label and the backend: the selector; without slot, VRAM and the backend: the backend.
    assert pipeline.judge(model, node("h100", backends=["echo"], labels={"gpu": "h100"})).verdict == (
        Verdict.SELECTOR_MISMATCH
    )
    full_and_small = node("a", free=1, hosted=1, labels=a100, backends=["echo"])
    assert pipeline.judge(model, full_and_small).verdict == Verdict.BACKEND_MISSING
    assert pipeline.judge(model, node("b", free=1, hosted=1, labels=a100, backends=["vllm"])).verdict == (
        Verdict.NO_FREE_SLOT
    )
    # The refusal's headline is the furthest check any node passed.
    plan = evaluate(model, [full_and_small, node("h100", labels={"gpu": "h100"})])
    assert plan.headline == "no node offers backend vllm"
    assert plan.refusal().startswith("cannot place m: no node offers backend vllm (a: backend vllm not")
    plan = evaluate(model, [full_and_small, node("b", free=1, hosted=1, labels=a100, backends=["vllm"])])
    assert plan.headline == REASON_NO_FREE_SLOT


# --- eviction ---------------------------------------------------------------------------------------


def idle(rid, node_id, model, index=0, *, ago=1, vram=0):
    return ReplicaView(
        id=rid,
        node_id=node_id,
        model_name=model,
        replica_index=index,
        idle_since=NOW - timedelta(seconds=ago) if ago is not None else None,
        vram_bytes=vram * GiB,
    )


def test_evicts_the_only_idle_replica_on_a_matching_node():  # 80
    nodes = [node("A", free=2, total=10)]
    victim = idle("n0", "A", "n", ago=1, vram=8)
    chosen = choose_eviction(
        ModelRequirement("m", 8 * GiB), nodes, [victim], replica_counts={"n": 1}, min_replicas={}
    )
    assert chosen == victim
    assert chosen.process_key == "n#0"


def test_eviction_only_on_nodes_matching_the_selector():  # 81
    nodes = [
        node("other", free=2, total=10, labels={"tier": "slow"}),
        node("match", free=2, total=10, labels={"tier": "fast"}),
    ]
    older = idle("old", "other", "n", ago=100, vram=8)
    newer = idle("new", "match", "k", ago=1, vram=8)
    chosen = choose_eviction(
        ModelRequirement("m", 8 * GiB, {"tier": "fast"}),
        nodes,
        [older, newer],
        replica_counts={"n": 1, "k": 1},
        min_replicas={},
    )
    assert chosen == newer


def test_eviction_never_takes_a_model_below_its_min():  # 82
    nodes = [node("A", free=2, total=10), node("B", free=2, total=10)]
    protected = idle("n0", "A", "n", ago=100, vram=8)
    other = idle("k0", "B", "k", ago=1, vram=8)
    counts = {"n": 1, "k": 1}
    model = ModelRequirement("m", 8 * GiB)
    assert (
        choose_eviction(model, nodes, [protected, other], replica_counts=counts, min_replicas={"n": 1})
        == other
    )
    assert choose_eviction(model, nodes, [protected], replica_counts=counts, min_replicas={"n": 1}) is None
    # With two replicas of n, one may go.
    assert (
        choose_eviction(model, nodes, [protected], replica_counts={"n": 2}, min_replicas={"n": 1})
        == protected
    )


def test_eviction_skips_a_node_still_too_small_after_removal():  # 83
    nodes = [node("A", free=1, total=10), node("B", free=4, total=10)]
    too_small = idle("a0", "A", "n", ago=100, vram=2)
    enough = idle("b0", "B", "k", ago=1, vram=4)
    model = ModelRequirement("m", 8 * GiB)
    counts = {"n": 1, "k": 1}
    assert choose_eviction(model, nodes, [too_small], replica_counts=counts, min_replicas={}) is None
    assert (
        choose_eviction(model, nodes, [too_small, enough], replica_counts=counts, min_replicas={}) == enough
    )


def test_no_idle_replica_means_no_eviction():  # 84: the caller answers 503
    nodes = [node("A", free=2, total=10)]
    assert (
        choose_eviction(ModelRequirement("m", 8 * GiB), nodes, [], replica_counts={}, min_replicas={}) is None
    )


def test_evicts_exactly_one_of_two_siblings_lru_first():  # 85
    nodes = [node("A", free=2, total=10)]
    n0 = idle("n0", "A", "n", 0, ago=1, vram=8)
    n1 = idle("n1", "A", "n", 1, ago=50, vram=8)
    chosen = choose_eviction(
        ModelRequirement("m", 8 * GiB), nodes, [n0, n1], replica_counts={"n": 2}, min_replicas={}
    )
    assert chosen == n1


def test_never_used_replica_is_least_recently_used():
    nodes = [node("A", free=2, total=10)]
    used = idle("u", "A", "n", 0, ago=1000, vram=8)
    unused = idle("x", "A", "n", 1, ago=None, vram=8)
    chosen = choose_eviction(
        ModelRequirement("m", 8 * GiB), nodes, [used, unused], replica_counts={"n": 2}, min_replicas={}
    )
    assert chosen == unused


def test_never_evicts_a_replica_of_the_model_itself():
    nodes = [node("A", free=2, total=10, cap=2, hosted=1)]
    own = idle("m0", "A", "m", ago=100, vram=8)
    assert (
        choose_eviction(
            ModelRequirement("m", 8 * GiB), nodes, [own], replica_counts={"m": 1}, min_replicas={}
        )
        is None
    )


def test_eviction_needs_a_free_slot_for_the_model():
    # Slots are per model: evicting another model's replica frees VRAM, never a slot of m.
    nodes = [node("A", free=2, total=10, cap=1, hosted=1)]
    victim = idle("n0", "A", "n", vram=8)
    assert (
        choose_eviction(
            ModelRequirement("m", 8 * GiB), nodes, [victim], replica_counts={"n": 1}, min_replicas={}
        )
        is None
    )


def test_eviction_ignores_replicas_on_unknown_nodes():
    victim = idle("n0", "gone", "n", vram=8)
    model = ModelRequirement("m", 8 * GiB)
    assert (
        choose_eviction(model, [node("A", free=2, total=10)], [victim], replica_counts={}, min_replicas={})
        is None
    )


# --- on the real database ---------------------------------------------------------------------------


db = pytest.mark.django_db(transaction=True)


def gpu(agent, name, vram_gib=0, cap=1, labels=None, **extra):
    node = NodeFactory(
        name=name,
        address=agent.address,
        total_vram=vram_gib * GiB,
        available_vram=vram_gib * GiB,
        worker_max_replicas_per_model=cap,
        **extra,
    )
    for key, value in (labels or {}).items():
        NodeLabelFactory(node=node, key=key, value=value)
    return node


def verdicts(plan):
    return {c.node: (c.verdict, c.detail) for c in plan.candidates}


def every_verdict_cluster(agent):
    """One node per verdict for an 8 GiB model whose rule selects `gpu=a100`."""
    ModelConfigFactory(name="m", vram_bytes=8 * GiB)
    RuleFactory(model_name="m", node_selector={"gpu": "a100"})
    a100 = {"gpu": "a100"}
    gpu(agent, "pending", 40, labels=a100, status=NodeStatus.PENDING, approved_at=None)
    gpu(agent, "drained", 40, labels=a100, status=NodeStatus.DRAINING)
    gpu(agent, "late", 40, labels=a100, status=NodeStatus.UNHEALTHY)
    gpu(agent, "gpu-3", 40, labels={"gpu": "h100"})
    full = gpu(agent, "gpu-4", 40, cap=2, labels=a100)
    ReplicaFactory(node=full, model_name="m", replica_index=0)
    ReplicaFactory(node=full, model_name="m", replica_index=1, state="loading")
    small = gpu(agent, "gpu-5", 10, labels=a100)
    Node.objects.filter(pk=small.pk).update(reserved_vram=GiB * 48 // 10)  # 5.2 GiB free
    busy = gpu(agent, "gpu-6", 10, labels=a100)
    ReplicaFactory(node=busy, model_name="other", vram_bytes=8 * GiB, last_used=timezone.now())
    Node.objects.filter(pk=busy.pk).update(available_vram=2 * GiB)
    gpu(agent, "gpu-7", 20, labels=a100)
    gpu(agent, "gpu-8", 30, labels=a100)


@db
def test_every_verdict_in_order_with_its_detail(agent):
    every_verdict_cluster(agent)
    plan = placement_plan(model_name="m")
    assert verdicts(plan) == {
        "gpu-8": (Verdict.CHOSEN, "0 replica(s) of m here, 30.0 GiB free, 0 in flight"),
        "gpu-7": (Verdict.RANKED_LOWER, "0 replica(s) of m here, 20.0 GiB free, 0 in flight"),
        "pending": (Verdict.NOT_APPROVED, "not approved"),
        "drained": (Verdict.DRAINING, "draining"),
        "late": (Verdict.NOT_HEALTHY, "unhealthy"),
        "gpu-3": (Verdict.SELECTOR_MISMATCH, "selector gpu=a100 missing"),
        "gpu-4": (Verdict.NO_FREE_SLOT, "2/2 slots used"),
        "gpu-5": (Verdict.NOT_ENOUGH_VRAM, "needs 8.0 GiB, 5.2 GiB free"),
        "gpu-6": (Verdict.EVICTION_CANDIDATE, "needs 8.0 GiB, 2.0 GiB free; room by evicting other#0"),
    }
    assert [c.node for c in plan.candidates][:2] == ["gpu-8", "gpu-7"]  # chosen first, then by rank
    assert plan.victim is None  # a node fits: nothing would be evicted


@db
def test_the_first_verdict_that_applies_wins(agent):
    """A pending, draining-looking node without the label and without room is `not_approved`, etc."""
    ModelConfigFactory(name="m", vram_bytes=8 * GiB)
    RuleFactory(model_name="m", node_selector={"gpu": "a100"})
    gpu(agent, "a", 1, status=NodeStatus.PENDING, approved_at=None)  # also selector, VRAM
    gpu(agent, "b", 1, status=NodeStatus.DRAINING)  # also selector, VRAM
    gpu(agent, "c", 1, status=NodeStatus.OFFLINE)  # also selector, VRAM
    full = gpu(agent, "d", 1)  # selector before slots and VRAM
    ReplicaFactory(node=full, model_name="m")
    full_a100 = gpu(agent, "e", 1, labels={"gpu": "a100"})  # slots before VRAM
    ReplicaFactory(node=full_a100, model_name="m")
    assert {node: verdict for node, (verdict, _) in verdicts(placement_plan(model_name="m")).items()} == {
        "a": Verdict.NOT_APPROVED,
        "b": Verdict.DRAINING,
        "c": Verdict.NOT_HEALTHY,
        "d": Verdict.SELECTOR_MISMATCH,
        "e": Verdict.NO_FREE_SLOT,
    }


@db
def test_the_dry_run_claims_nothing_and_the_real_placement_goes_where_it_said(agent):
    every_verdict_cluster(agent)
    before = list(Node.objects.order_by("name").values_list("name", "reserved_vram"))
    rows = ModelReplica.objects.count()
    plan = placement_plan(model_name="m")
    assert ModelReplica.objects.count() == rows
    assert list(Node.objects.order_by("name").values_list("name", "reserved_vram")) == before
    assert not PlacementDecision.objects.exists() and agent.loads == []
    assert replica_place(model_name="m").node_name == plan.chosen.name == "gpu-8"
    # And the next one, once gpu-8 holds a replica: spread first.
    assert placement_plan(model_name="m").chosen.name == "gpu-7"
    assert replica_place(model_name="m").node_name == "gpu-7"


@db
def test_the_dry_run_names_the_replica_an_eviction_would_unload_and_placement_evicts_it(agent):
    ModelConfigFactory(name="m", vram_bytes=8 * GiB)
    node = gpu(agent, "only", 10, cap=2)
    long_ago = timezone.now() - timedelta(hours=1)
    ReplicaFactory(node=node, model_name="n", replica_index=0, vram_bytes=4 * GiB, last_used=timezone.now())
    ReplicaFactory(node=node, model_name="n", replica_index=1, vram_bytes=8 * GiB, last_used=long_ago)
    Node.objects.filter(pk=node.pk).update(available_vram=GiB)
    plan = placement_plan(model_name="m")
    assert plan.chosen is None and plan.victim.process_key == "n#1"
    assert verdicts(plan)["only"] == (
        Verdict.EVICTION_CANDIDATE,
        "needs 8.0 GiB, 1.0 GiB free; room by evicting n#1",
    )
    assert ModelReplica.objects.filter(model_name="n").count() == 2  # the dry run evicted nothing
    result = replica_place(model_name="m")
    assert result.evicted == ["n#1"] and agent.stops == ["n#1"]
    evicted, placed = PlacementDecision.objects.order_by("id")
    assert (evicted.outcome, evicted.model_name, evicted.node_name, evicted.replica_index) == (
        Outcome.EVICTED,
        "n",
        "only",
        1,
    )
    assert (placed.outcome, placed.trigger, placed.node_name) == (Outcome.PLACED, Trigger.REQUEST, "only")


@db
def test_a_model_the_catalog_does_not_know_has_no_plan(agent):
    from scheduling.placement import UnknownModel

    with pytest.raises(UnknownModel):
        placement_plan(model_name="nope")


@db
def test_a_claim_refused_for_vram_says_not_enough_vram():
    node = NodeFactory(total_vram=10 * GiB, available_vram=10 * GiB, worker_max_replicas_per_model=2)
    assert pipeline.replica_claim(node_id=node.pk, model_name="vr-a", vram_bytes=6 * GiB).replica
    claim = pipeline.replica_claim(node_id=node.pk, model_name="vr-b", vram_bytes=6 * GiB)
    assert claim.replica is None
    assert (claim.refused.verdict, claim.refused.detail) == (
        Verdict.NOT_ENOUGH_VRAM,
        "needs 6.0 GiB, 4.0 GiB free",
    )


@db
def test_two_concurrent_6_gib_loads_on_a_10_gib_node_the_loser_hears_not_enough_vram(agent, monkeypatch):
    """Both plan on the same snapshot (a barrier holds them after it); one claim wins, the other claim is
    refused under the row lock for VRAM, re-ranks once on a fresh snapshot, and answers with the VRAM
    reason — never "no free slot" (the node has free slots)."""
    ModelConfigFactory(name="vr-a", vram_bytes=6 * GiB)
    ModelConfigFactory(name="vr-b", vram_bytes=6 * GiB)
    gpu(agent, "n1", 10, cap=2)
    barrier = threading.Barrier(2, timeout=30)
    snapshot = pipeline.cluster_snapshot
    first_call = threading.local()

    def together():
        result = snapshot()
        if not getattr(first_call, "done", False):
            first_call.done = True
            barrier.wait()
        return result

    monkeypatch.setattr(pipeline, "cluster_snapshot", together)
    # The winner's load waits until the loser has answered: a winner already loaded (and idle) by the time the
    # loser re-plans would be a legitimate eviction victim, and the loser would then place instead of refusing.
    loser_answered = threading.Event()
    load_call = services.replica_load_call

    def held_load_call(**kwargs):
        loser_answered.wait(timeout=120)
        return load_call(**kwargs)

    monkeypatch.setattr(services, "replica_load_call", held_load_call)

    def place(name):
        try:
            return replica_place(model_name=name).node_name
        except NoCapacity as error:
            return str(error)
        finally:
            loser_answered.set()
            connections.close_all()

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(place, ["vr-a", "vr-b"]), key=len)
    assert outcomes[0] == "n1"
    assert outcomes[1].startswith("cannot place vr-") and "not enough VRAM" in outcomes[1], outcomes
    assert "no free slot" not in outcomes[1]
    assert "n1: needs 6.0 GiB, 4.0 GiB free" in outcomes[1]
    refused = PlacementDecision.objects.get(outcome=Outcome.NO_CAPACITY)
    assert refused.candidates == [
        {"node": "n1", "verdict": Verdict.NOT_ENOUGH_VRAM, "detail": "needs 6.0 GiB, 4.0 GiB free"}
    ]


@db
def test_no_capacity_records_every_node_and_the_message_names_them(agent):
    every_verdict_cluster(agent)
    Node.objects.filter(name__in=["gpu-7", "gpu-8"]).delete()
    Node.objects.filter(name="gpu-6").update(available_vram=0)
    ModelReplica.objects.filter(model_name="other").update(in_flight=1)  # busy: no eviction
    with pytest.raises(NoCapacity) as raised:
        replica_place(model_name="m")
    message = str(raised.value)
    assert message.startswith("cannot place m: not enough VRAM (")
    for part in (
        "gpu-3: selector gpu=a100 missing",
        "gpu-4: 2/2 slots used",
        "gpu-5: needs 8.0 GiB, 5.2 GiB free",
    ):
        assert part in message
    record = PlacementDecision.objects.get()
    assert (record.outcome, record.trigger, record.message) == (Outcome.NO_CAPACITY, Trigger.REQUEST, message)
    assert {c["node"]: c["verdict"] for c in record.candidates} == {
        "pending": Verdict.NOT_APPROVED,
        "drained": Verdict.DRAINING,
        "late": Verdict.NOT_HEALTHY,
        "gpu-3": Verdict.SELECTOR_MISMATCH,
        "gpu-4": Verdict.NO_FREE_SLOT,
        "gpu-5": Verdict.NOT_ENOUGH_VRAM,
        "gpu-6": Verdict.NOT_ENOUGH_VRAM,
    }


@db
def test_the_reconciler_records_its_placements_and_breaker_trips(agent, settings):
    from scheduling.reconciler import reconcile_tick

    settings.LOCALAI_UNSATISFIABLE_TICKS = 2
    ModelConfigFactory(name="m")
    ModelConfigFactory(name="never")
    gpu(agent, "n1", 0, cap=2)
    RuleFactory(model_name="m", min_replicas=2)
    RuleFactory(model_name="never", min_replicas=1, node_selector={"gpu": "a100"})
    reconcile_tick()
    placed = PlacementDecision.objects.filter(outcome=Outcome.PLACED).order_by("replica_index")
    assert [(d.trigger, d.node_name, d.replica_index) for d in placed] == [
        (Trigger.RECONCILE, "n1", 0),
        (Trigger.RECONCILE, "n1", 1),
    ]
    assert placed[0].candidates == [
        {"node": "n1", "verdict": Verdict.CHOSEN, "detail": placed[0].candidates[0]["detail"]}
    ]
    short = PlacementDecision.objects.get(model_name="never")
    assert short.outcome == Outcome.NO_CAPACITY
    assert short.candidates == [
        {"node": "n1", "verdict": Verdict.SELECTOR_MISMATCH, "detail": "selector gpu=a100 missing"}
    ]
    reconcile_tick()
    tripped = PlacementDecision.objects.filter(model_name="never").order_by("-id").first()
    assert tripped.outcome == Outcome.TRIPPED and "n1: selector gpu=a100 missing" in tripped.message


def backend_cluster(agent):
    """`m` needs the `vllm` backend: `echo-box` (most VRAM) cannot start it, `vllm-box` can, `old-box` did not
    say (an agent that reports no backends)."""
    ModelConfigFactory(name="m", backend="vllm", vram_bytes=4 * GiB)
    gpu(agent, "echo-box", 40, cap=2, backends=["echo", "whisper"])
    gpu(agent, "vllm-box", 10, cap=2, backends=["echo", "vllm"])
    gpu(agent, "old-box", 20, cap=2, backends=[])


@db
def test_the_dry_run_names_backend_missing_and_placement_never_tries_that_node(agent):
    backend_cluster(agent)
    plan = placement_plan(model_name="m")
    assert verdicts(plan) == {
        "old-box": (Verdict.CHOSEN, "0 replica(s) of m here, 20.0 GiB free, 0 in flight"),
        "vllm-box": (Verdict.RANKED_LOWER, "0 replica(s) of m here, 10.0 GiB free, 0 in flight"),
        "echo-box": (Verdict.BACKEND_MISSING, "backend vllm not offered (offers: echo, whisper)"),
    }
    assert plan.as_dict()["candidates"][-1] == {
        "node": "echo-box",
        "verdict": "backend_missing",
        "detail": "backend vllm not offered (offers: echo, whisper)",
    }
    for _ in range(4):  # spread, then stack: only ever on the two nodes that can start vllm
        replica_place(model_name="m")
    hosts = sorted(ModelReplica.objects.values_list("node__name", flat=True))
    assert hosts == ["old-box", "old-box", "vllm-box", "vllm-box"]
    assert len(agent.loads) == 4
    records = PlacementDecision.objects.filter(outcome=Outcome.PLACED)
    assert all(
        {
            "node": "echo-box",
            "verdict": "backend_missing",
            "detail": "backend vllm not offered (offers: echo, whisper)",
        }
        in record.candidates
        for record in records
    )
    # Both slots of both nodes taken: refused for slots (the furthest check a node passed), nothing loaded.
    with pytest.raises(NoCapacity, match="cannot place m: no free slot"):
        replica_place(model_name="m")
    assert len(agent.loads) == 4


@db
def test_no_node_offering_the_backend_is_no_capacity_not_a_load_failure(agent):
    from scheduling.models import LoadFailure

    backend_cluster(agent)
    Node.objects.filter(name__in=["vllm-box", "old-box"]).update(backends=["echo"])
    with pytest.raises(NoCapacity) as raised:
        replica_place(model_name="m")
    message = str(raised.value)
    assert message.startswith("cannot place m: no node offers backend vllm (")
    assert "echo-box: backend vllm not offered (offers: echo, whisper)" in message
    assert "old-box: backend vllm not offered (offers: echo)" in message
    assert agent.loads == [] and not ModelReplica.objects.exists()
    assert not LoadFailure.objects.exists()  # no backoff: the model loads at once when a node offers it
    record = PlacementDecision.objects.get()
    assert (record.outcome, record.message) == (Outcome.NO_CAPACITY, message)
    assert {c["verdict"] for c in record.candidates} == {Verdict.BACKEND_MISSING}
    Node.objects.filter(name="vllm-box").update(backends=["echo", "vllm"])
    assert replica_place(model_name="m").node_name == "vllm-box"


@db
def test_a_claim_judges_the_backend_again_on_the_locked_row():
    """The node's agent registered again without the backend between the plan and the claim."""
    node = NodeFactory(worker_max_replicas_per_model=2, backends=["echo"])
    claim = pipeline.replica_claim(node_id=node.id, model_name="m", backend="vllm")
    assert claim.replica is None
    assert (claim.refused.verdict, claim.refused.detail) == (
        Verdict.BACKEND_MISSING,
        "backend vllm not offered (offers: echo)",
    )
    requests = [
        pipeline.ClaimRequest(node.id, "m", backend="vllm"),
        pipeline.ClaimRequest(node.id, "e", backend="echo"),
    ]
    refused, granted = pipeline.replicas_claim(requests)
    assert refused.replica is None and refused.refused.verdict == Verdict.BACKEND_MISSING
    assert granted.replica is not None
    assert list(ModelReplica.objects.values_list("model_name", flat=True)) == ["e"]


@db
def test_the_reconciler_places_only_on_nodes_offering_the_backend_and_trips_when_none_does(agent, settings):
    from scheduling.models import LoadFailure, SchedulingRule
    from scheduling.reconciler import reconcile_tick

    settings.LOCALAI_UNSATISFIABLE_TICKS = 2
    backend_cluster(agent)
    Node.objects.filter(name="old-box").update(backends=["echo", "vllm"])
    ModelConfigFactory(name="nowhere", backend="exllama")
    RuleFactory(model_name="m", min_replicas=3)
    RuleFactory(model_name="nowhere", min_replicas=1)
    report = reconcile_tick()
    assert len(report.placed) == 3, report.failed
    hosts = sorted(ModelReplica.objects.filter(model_name="m").values_list("node__name", flat=True))
    assert hosts == ["old-box", "old-box", "vllm-box"]
    assert sorted(load.model_name for load in agent.loads) == ["m", "m", "m"]  # nothing tried for `nowhere`
    short = PlacementDecision.objects.get(model_name="nowhere")
    assert short.outcome == Outcome.NO_CAPACITY
    assert short.message.startswith("cannot place nowhere: no node offers backend exllama (")
    assert {c["node"]: c["verdict"] for c in short.candidates} == {
        "echo-box": Verdict.BACKEND_MISSING,
        "vllm-box": Verdict.BACKEND_MISSING,
        "old-box": Verdict.BACKEND_MISSING,
    }
    rule = SchedulingRule.objects.get(model_name="nowhere")
    assert rule.unsatisfiable_reason == "no node offers backend exllama"
    reconcile_tick()
    rule.refresh_from_db()
    assert rule.unsatisfiable_until is not None  # the breaker tripped: a misconfiguration, not a load failure
    assert not LoadFailure.objects.exists()


@db
def test_the_health_loop_prunes_by_age_then_by_row_cap(settings):
    from scheduling.health import health_tick

    settings.LOCALAI_DECISION_RETENTION = 3600
    settings.LOCALAI_DECISION_MAX_ROWS = 3
    now = timezone.now()
    for minutes in (120, 90, 50, 40, 30, 20, 10):
        PlacementDecision.objects.create(
            created_at=now - timedelta(minutes=minutes),
            model_name=f"m{minutes}",
            trigger="request",
            outcome="placed",
        )
    report = health_tick(now=now)
    assert report.decisions_pruned == 4
    assert sorted(PlacementDecision.objects.values_list("model_name", flat=True)) == ["m10", "m20", "m30"]


@db
def test_a_record_lists_at_most_64_nodes_and_counts_the_others_per_verdict():
    from scheduling.decisions import decision_record

    candidates = [{"node": "chosen", "verdict": Verdict.CHOSEN, "detail": "-"}]
    candidates += [{"node": f"r{i:03d}", "verdict": Verdict.RANKED_LOWER, "detail": "-"} for i in range(80)]
    candidates += [
        {"node": f"s{i:03d}", "verdict": Verdict.SELECTOR_MISMATCH, "detail": "-"} for i in range(20)
    ]
    decision_record(model_name="m", trigger=Trigger.RECONCILE, outcome=Outcome.PLACED, candidates=candidates)
    record = PlacementDecision.objects.get()
    assert len(record.candidates) == 64 and record.candidates[0]["node"] == "chosen"
    assert record.omitted == {Verdict.RANKED_LOWER: 17, Verdict.SELECTOR_MISMATCH: 20}


@db
async def test_a_warm_request_writes_no_record_and_a_cold_one_writes_exactly_one(agent):
    """The warm path (a loaded replica is claimed) never writes a decision; the cold path (a placement) writes
    one `placed` record with the request trigger."""
    from asgiref.sync import sync_to_async

    from scheduling import router

    def setup():
        ModelConfigFactory(name="m")
        gpu(agent, "n1", 0, cap=2)

    await sync_to_async(setup)()
    count = sync_to_async(PlacementDecision.objects.count)
    lease = await router.acquire("m")  # cold: places m#0
    await lease.release()
    records = await sync_to_async(list)(
        PlacementDecision.objects.values_list("trigger", "outcome", "node_name")
    )
    assert records == [(Trigger.REQUEST, Outcome.PLACED, "n1")]
    for _ in range(20):  # warm: m#0 is loaded
        lease = await router.acquire("m")
        await lease.release()
    assert await count() == 1
    assert await sync_to_async(ModelReplica.objects.count)() == 1
