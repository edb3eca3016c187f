"""Placement on the real database with a real in-process gRPC agent (SCENARIOS 36–39, 67, 74–79, 86)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, connections

from nodes.models import ModelReplica, Node
from scheduling import pipeline, services
from scheduling.loadfailures import load_failure_clear
from scheduling.models import LoadFailure
from scheduling.placement import LoadFailed, NoCapacity, UnknownModel
from scheduling.services import model_options_for, replica_place
from tests.factories import (
    GiB,
    ModelConfigFactory,
    NodeFactory,
    NodeLabelFactory,
    ReplicaFactory,
    RuleFactory,
)

pytestmark = pytest.mark.django_db(transaction=True)


def gpu_node(agent, name, vram_gib=0, cap=1, **extra):
    vram = vram_gib * GiB
    return NodeFactory(
        name=name,
        address=agent.address,
        total_vram=vram,
        available_vram=vram,
        worker_max_replicas_per_model=cap,
        **extra,
    )


def test_load_carries_catalog_entry_and_no_transaction_is_open(agent):  # 77
    ModelConfigFactory(
        name="m",
        backend="llama-cpp",
        model="m.gguf",
        vram_bytes=3 * GiB,
        context_size=4096,
        options={"options": ["delay_ms:5"], "gpu_layers": 33, "f16": True},
    )
    node = gpu_node(agent, "n1", 10, backends=["echo", "llama-cpp"])
    connection.ensure_connection()
    caller_pid = connection.connection.info.backend_pid
    seen = {}

    def on_load(request):
        with connections["default"].cursor() as cursor:  # the gRPC thread's own connection
            cursor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [caller_pid])
            seen["state"] = cursor.fetchone()[0]
            cursor.execute("SELECT reserved_vram FROM nodes_node WHERE id = %s", [node.id])
            seen["reserved"] = cursor.fetchone()[0]
        connections["default"].close()

    agent.on_load = on_load
    result = replica_place(model_name="m")
    request = agent.loads[0]
    assert (request.model_name, request.replica_index, request.backend) == ("m", 0, "llama-cpp")
    assert request.vram_bytes == 3 * GiB
    assert request.model_options.Model == "m.gguf"
    assert request.model_options.ContextSize == 4096
    assert request.model_options.NGPULayers == 33
    assert list(request.model_options.Options) == ["delay_ms:5"]
    assert seen == {"state": "idle", "reserved": 3 * GiB}  # committed reservation, no open transaction
    replica = ModelReplica.objects.get(pk=result.replica_id)
    assert (replica.state, replica.address, replica.replica_index) == ("loaded", "127.0.0.1:50000", 0)
    assert replica.loaded_at is not None


def test_model_options_accept_proto_names_and_ignore_unknown_keys():
    config = ModelConfigFactory.build(
        name="x", model="", options={"Options": ["a:1"], "Threads": 4, "zzz": 1}
    )
    assert model_options_for(config) == {"Model": "x", "Options": ["a:1"], "Threads": 4}


def test_unknown_model_is_refused_without_writing(agent):
    gpu_node(agent, "n1", 10)
    with pytest.raises(UnknownModel):
        replica_place(model_name="not-in-catalog")
    assert not ModelReplica.objects.exists()


def test_not_enough_vram_writes_nothing(agent):  # 67
    ModelConfigFactory(name="big", vram_bytes=32 * GiB)
    node = gpu_node(agent, "small", 2)
    with pytest.raises(NoCapacity, match="not enough VRAM"):
        replica_place(model_name="big")
    assert not ModelReplica.objects.exists()
    node.refresh_from_db()
    assert node.reserved_vram == 0
    assert agent.loads == []


def test_selector_pins_placement_and_no_match_says_so(agent):  # 74, 75
    ModelConfigFactory(name="m")
    RuleFactory(model_name="m", node_selector={"gpu.vendor": "nvidia"})
    gpu_node(agent, "plain", 40)
    with pytest.raises(NoCapacity, match="no node matches the selector"):
        replica_place(model_name="m")
    nvidia = gpu_node(agent, "nv", 8)
    NodeLabelFactory(node=nvidia, key="gpu.vendor", value="nvidia")
    assert replica_place(model_name="m").node_name == "nv"


def test_unschedulable_nodes_are_never_candidates(agent):
    ModelConfigFactory(name="m")
    gpu_node(agent, "draining", 10, status="draining")
    gpu_node(agent, "pending", 10, status="pending", approved_at=None)
    gpu_node(agent, "agent-type", 10, node_type="agent")
    with pytest.raises(NoCapacity):
        replica_place(model_name="m")


def test_lost_slot_between_ranking_and_claim_moves_to_the_next(agent, monkeypatch):  # 76
    ModelConfigFactory(name="m")
    top = gpu_node(agent, "top", 40)
    gpu_node(agent, "second", 10)
    snapshot = pipeline.cluster_snapshot
    raced = []

    def racing_snapshot():
        nodes = snapshot()
        if not raced:  # a rival's claim, once
            raced.append(ReplicaFactory(node=top, model_name="m", replica_index=0, state="loading"))
        return nodes

    monkeypatch.setattr(pipeline, "cluster_snapshot", racing_snapshot)
    assert replica_place(model_name="m").node_name == "second"


def test_failed_load_releases_row_and_reservation_and_stops_the_key(agent):  # 78, 79
    ModelConfigFactory(name="m", vram_bytes=2 * GiB)
    node = gpu_node(agent, "n1", 10)
    ReplicaFactory(node=node, model_name="other", vram_bytes=GiB)
    Node.objects.filter(pk=node.pk).update(reserved_vram=GiB)
    agent.fail = "fail_load:true was given"
    with pytest.raises(LoadFailed, match="fail_load"):
        replica_place(model_name="m")
    assert not ModelReplica.objects.filter(model_name="m").exists()
    node.refresh_from_db()
    assert node.reserved_vram == GiB
    assert agent.stops == ["m#0"]
    agent.fail = ""
    load_failure_clear(model_name="m", reason="retry now")  # else the load backoff answers first
    assert replica_place(model_name="m").replica_index == 0  # the slot is not poisoned


def test_a_load_refused_before_the_agent_holds_its_token_is_tried_again(agent):
    """An agent that has not yet read its registration answer refuses calls as UNAUTHENTICATED: the load is
    tried again (docs/reliability.md, "A node's first moments"), placed, and the model is not put in its
    load-failure backoff."""
    ModelConfigFactory(name="m", vram_bytes=GiB)
    gpu_node(agent, "n1", 10)
    agent.unauthenticated = 3
    assert replica_place(model_name="m").replica_index == 0
    assert len(agent.loads) == 4 and agent.stops == []
    assert ModelReplica.objects.get(model_name="m").state == "loaded"
    assert not LoadFailure.objects.filter(model_name="m").exists()


def test_a_load_refused_as_unauthenticated_past_the_grace_fails(agent, monkeypatch):
    """An agent that keeps refusing the token (not a registration still on its way) fails the load after
    `TOKEN_GRACE`, as any refused load does."""
    monkeypatch.setattr(services, "TOKEN_GRACE", 0.2)
    ModelConfigFactory(name="m", vram_bytes=GiB)
    gpu_node(agent, "n1", 10)
    agent.unauthenticated = 10**6
    with pytest.raises(LoadFailed, match="wrong node token"):
        replica_place(model_name="m")
    assert not ModelReplica.objects.filter(model_name="m").exists()
    assert agent.stops == ["m#0"]


def test_load_timeout_fails_and_cleans_up(agent, settings):  # 78
    settings.LOCALAI_LOAD_TIMEOUT = 0.3
    ModelConfigFactory(name="m", vram_bytes=GiB)
    node = gpu_node(agent, "n1", 10)
    agent.load_seconds = 5
    with pytest.raises(LoadFailed):
        replica_place(model_name="m")
    assert not ModelReplica.objects.exists()
    node.refresh_from_db()
    assert node.reserved_vram == 0
    assert agent.stops == ["m#0"]


def test_cpu_node_is_placed_on_by_slots_alone(agent):  # 70
    ModelConfigFactory(name="m", vram_bytes=8 * GiB)
    gpu_node(agent, "cpu", 0)
    result = replica_place(model_name="m")
    assert result.node_name == "cpu"
    assert Node.objects.get(name="cpu").reserved_vram == 0


def test_stacks_as_index_1_on_the_only_node(agent):  # 72
    ModelConfigFactory(name="m")
    gpu_node(agent, "only", 10, cap=2)
    assert [replica_place(model_name="m").replica_index for _ in range(2)] == [0, 1]
    with pytest.raises(NoCapacity, match="no free slot"):
        replica_place(model_name="m")


def test_eviction_unloads_exactly_the_lru_idle_replica_on_a_matching_node(agent):  # 80, 81, 85
    ModelConfigFactory(name="m", vram_bytes=8 * GiB)
    RuleFactory(model_name="m", node_selector={"tier": "fast"})
    slow = gpu_node(agent, "slow", 10, cap=2)
    fast = gpu_node(agent, "fast", 14, cap=2)
    NodeLabelFactory(node=fast, key="tier", value="fast")
    from django.utils import timezone

    long_ago = timezone.now() - timezone.timedelta(hours=1)
    ReplicaFactory(node=slow, model_name="n", replica_index=0, vram_bytes=8 * GiB, last_used=long_ago)
    ReplicaFactory(node=fast, model_name="n", replica_index=0, vram_bytes=4 * GiB)
    ReplicaFactory(node=fast, model_name="n", replica_index=1, vram_bytes=8 * GiB, last_used=long_ago)
    for node in (slow, fast):  # the worker already counts its replicas as used
        Node.objects.filter(pk=node.pk).update(available_vram=2 * GiB)
    ModelReplica.objects.update(last_seen_at=timezone.now())
    result = replica_place(model_name="m")
    assert result.node_name == "fast"
    assert result.evicted == ["n#1"]
    assert agent.stops == ["n#1"]
    remaining = set(ModelReplica.objects.filter(model_name="n").values_list("node__name", "replica_index"))
    assert remaining == {("slow", 0), ("fast", 0)}


def test_busy_replicas_are_never_evicted(agent):  # 84
    ModelConfigFactory(name="m", vram_bytes=8 * GiB)
    node = gpu_node(agent, "n1", 10)
    ReplicaFactory(node=node, model_name="n", vram_bytes=8 * GiB, in_flight=1)
    Node.objects.filter(pk=node.pk).update(available_vram=2 * GiB)
    with pytest.raises(NoCapacity, match="not enough VRAM"):
        replica_place(model_name="m")
    assert agent.stops == []


def test_concurrent_placements_never_over_commit(agent):  # 86 (smaller numbers)
    ModelConfigFactory(name="m", vram_bytes=3 * GiB)
    nodes = [gpu_node(agent, f"n{i}", 10, cap=4) for i in range(5)]

    def one(_):
        try:
            replica_place(model_name="m")
            return "ok"
        except NoCapacity:
            return "503"
        finally:
            connections.close_all()

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(one, range(30)))
    assert set(outcomes) <= {"ok", "503"}
    assert outcomes.count("ok") == 15  # 3 × 3 GiB fit in 10 GiB on each of 5 nodes
    for node in nodes:
        node.refresh_from_db()
        rows = ModelReplica.objects.filter(node=node)
        assert node.reserved_vram == sum(row.vram_bytes for row in rows) <= node.available_vram
        assert len({row.replica_index for row in rows}) == rows.count()
