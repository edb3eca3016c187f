"""Pure placement and eviction choices (SCENARIOS §3: 66–75, 80–85), without a database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from scheduling.placement import (
    REASON_NO_FREE_SLOT,
    REASON_NO_MATCHING_NODE,
    REASON_NOT_ENOUGH_VRAM,
    IdleReplica,
    ModelRequirement,
    NodeSnapshot,
    choose_eviction,
    filter_candidates,
    place,
    rank_candidates,
    selector_matches,
)

GiB = 1024**3
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def node(name, *, free=0, reserved=0, total=None, cap=1, hosted=0, in_flight=0, labels=None):
    """A snapshot with `free` GiB available (total defaults to available, 0 meaning a CPU node)."""
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
    assert filter_candidates(ModelRequirement("m", 8 * GiB), nodes).reason == REASON_NO_FREE_SLOT


# --- eviction ---------------------------------------------------------------------------------------


def idle(rid, node_id, model, index=0, *, ago=1, vram=0):
    return IdleReplica(
        id=rid,
        node_id=node_id,
        model_name=model,
        replica_index=index,
        last_used=NOW - timedelta(seconds=ago) if ago is not None else None,
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
