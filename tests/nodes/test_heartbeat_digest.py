"""Heartbeats at fleet scale (issue 16): a heartbeat reporting nothing new is one UPDATE; anything new is
reconciled in full; agents that send no digest behave as before."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from nodes.choices import NodeStatus, ReplicaState
from nodes.models import ModelReplica, Node
from scheduling.health import probe_unheard_replicas
from tests.factories import ReplicaFactory, claim_row
from tests.nodes.test_worker_api import assert_error, auth, registered
from worker_client.agent.keys import replica_digest

pytestmark = pytest.mark.django_db
GiB = 1024**3


def listed(*keys: str) -> list[dict]:
    return [{"key": key, "address": "127.0.0.1:1", "state": "running"} for key in keys]


def beat(api, node_id: str, token: str, **body):
    return api.post(f"/api/node/{node_id}/heartbeat", body, format="json", **auth(token))


@pytest.fixture
def steady(api, register):
    """An approved node with two loaded replicas its agent has listed once (the full reconciliation ran)."""
    node_id, token = registered(register, total_vram=24 * GiB, available_vram=24 * GiB, gpu_vendor="nvidia")
    node = Node.objects.get(pk=node_id)
    node.status, node.approved_at = NodeStatus.HEALTHY, timezone.now()
    node.save()
    for index in (0, 1):
        ReplicaFactory(node=node, model_name="m", replica_index=index, state=ReplicaState.LOADED)
    first = beat(api, node_id, token, replicas=listed("m#0", "m#1"), total_vram=24 * GiB, gpu_vendor="nvidia")
    assert first.status_code == 200, first.content
    assert first.json()["send_replicas"] is False
    return node_id, token


def test_digest_is_the_sorted_distinct_keys():
    assert replica_digest(["b#0", "a#1", "b#0"]) == replica_digest(["a#1", "b#0"])
    assert replica_digest([]) == replica_digest(())
    assert replica_digest(["a#1"]) != replica_digest(["a#2"])


def test_an_unchanged_heartbeat_is_exactly_one_update(api, steady):
    node_id, token = steady
    before = timezone.now()
    with CaptureQueriesContext(connection) as captured:
        answer = beat(
            api,
            node_id,
            token,
            replica_digest=replica_digest(["m#1", "m#0"]),
            available_vram=7 * GiB,
            total_vram=24 * GiB,
            gpu_vendor="nvidia",
        )
    assert answer.status_code == 200, answer.content
    assert answer.json() == {
        "status": "healthy",
        "max_replicas_per_model": 1,
        "orphans": [],
        "send_replicas": False,
    }
    statements = [query["sql"].lstrip().split()[0].upper() for query in captured.captured_queries]
    assert statements == ["UPDATE"], [query["sql"] for query in captured.captured_queries]
    node = Node.objects.get(pk=node_id)
    assert node.last_heartbeat >= before
    assert node.available_vram == 7 * GiB


def test_an_old_agent_listing_an_unchanged_set_without_digest_is_one_update_too(api, steady):
    node_id, token = steady
    with CaptureQueriesContext(connection) as captured:
        answer = beat(api, node_id, token, replicas=listed("m#0", "m#1"))
    assert answer.status_code == 200
    assert answer.json()["orphans"] == []
    assert len(captured.captured_queries) == 1


def test_a_wrong_token_with_a_matching_digest_is_refused_as_before(api, register, steady):
    node_id, _token = steady
    _other_id, other_token = registered(register, "w2")
    digest = replica_digest(["m#0", "m#1"])
    assert_error(beat(api, node_id, other_token, replica_digest=digest), 403)
    assert_error(beat(api, node_id, "made-up", replica_digest=digest), 401)
    answer = api.post(f"/api/node/{node_id}/heartbeat", {"replica_digest": digest}, format="json")
    assert_error(answer, 401)


def test_a_malformed_digest_is_a_400_naming_it(api, steady):
    node_id, token = steady
    assert_error(beat(api, node_id, token, replica_digest="not-hex"), 400, "replica_digest")


def test_a_digest_that_does_not_match_records_nothing_and_asks_for_the_list(api, steady):
    node_id, token = steady
    Node.objects.filter(pk=node_id).update(last_heartbeat=timezone.now() - timedelta(seconds=60))
    stale = Node.objects.get(pk=node_id).last_heartbeat
    answer = beat(api, node_id, token, replica_digest=replica_digest(["m#0"]))
    assert answer.status_code == 200
    assert answer.json()["send_replicas"] is True
    assert Node.objects.get(pk=node_id).last_heartbeat == stale
    assert ModelReplica.objects.filter(node_id=node_id).count() == 2  # nothing reconciled on a digest alone


def test_a_changed_list_is_reconciled_in_full(api, steady):
    node_id, token = steady
    # m#1 is gone from the agent and a process the control plane has no row for appeared.
    ModelReplica.objects.filter(node_id=node_id).update(loaded_at=timezone.now() - timedelta(hours=1))
    answer = beat(
        api, node_id, token, replicas=listed("m#0", "x#0"), replica_digest=replica_digest(["m#0", "m#1"])
    )
    assert answer.status_code == 200
    assert answer.json()["orphans"] == ["x#0"]
    assert answer.json()["send_replicas"] is True  # an orphan: the sets still differ
    assert sorted(r.process_key for r in ModelReplica.objects.filter(node_id=node_id)) == ["m#0"]


def test_a_new_row_makes_the_same_digest_miss_until_the_agent_lists_it(api, steady):
    node_id, token = steady
    digest = replica_digest(["m#0", "m#1"])
    loading = claim_row(node_id=node_id, model_name="n", vram_bytes=2 * GiB)
    assert loading is not None
    missed = beat(api, node_id, token, replica_digest=digest)
    assert missed.json()["send_replicas"] is True
    full = beat(api, node_id, token, replicas=listed("m#0", "m#1"))
    assert full.json()["send_replicas"] is True  # the load on its way is kept, unlisted
    assert Node.objects.get(pk=node_id).reserved_vram == 2 * GiB
    listing = beat(api, node_id, token, replicas=listed("m#0", "m#1", "n#0"))
    assert listing.json()["send_replicas"] is False
    assert Node.objects.get(pk=node_id).reserved_vram == 0
    now_digest = replica_digest(["m#0", "m#1", "n#0"])
    with CaptureQueriesContext(connection) as captured:
        assert beat(api, node_id, token, replica_digest=now_digest).json()["send_replicas"] is False
    assert len(captured.captured_queries) == 1


@pytest.mark.parametrize("status", [NodeStatus.UNHEALTHY, NodeStatus.OFFLINE])
def test_a_lapsed_node_comes_back_through_the_full_path(api, steady, status):
    node_id, token = steady
    Node.objects.filter(pk=node_id).update(status=status)
    digest = replica_digest(["m#0", "m#1"])
    assert beat(api, node_id, token, replica_digest=digest).json()["send_replicas"] is True
    answer = beat(api, node_id, token, replicas=listed("m#0", "m#1"))
    assert answer.json()["status"] == NodeStatus.HEALTHY


def test_a_new_total_vram_goes_the_full_way_and_relabels(api, steady):
    node_id, token = steady
    digest = replica_digest(["m#0", "m#1"])
    answer = beat(api, node_id, token, replica_digest=digest, total_vram=80 * GiB)
    assert answer.json()["send_replicas"] is True
    beat(api, node_id, token, replicas=listed("m#0", "m#1"), total_vram=80 * GiB)
    node = Node.objects.get(pk=node_id)
    assert node.total_vram == 80 * GiB
    assert node.labels.get(key="gpu.vram").value == "80GB+"


def test_the_unchanged_heartbeat_counts_as_news_of_its_replicas_for_the_probe(api, steady, settings):
    node_id, token = steady
    settings.LOCALAI_PROBE_STALE_AFTER = 60
    long_ago = timezone.now() - timedelta(hours=1)
    ModelReplica.objects.filter(node_id=node_id).update(last_seen_at=long_ago, loaded_at=long_ago)
    Node.objects.filter(pk=node_id).update(last_heartbeat=long_ago)
    assert beat(api, node_id, token, replica_digest=replica_digest(["m#0", "m#1"])).json() == {
        "status": "healthy",
        "max_replicas_per_model": 1,
        "orphans": [],
        "send_replicas": False,
    }
    probed, removed = probe_unheard_replicas(now=timezone.now())
    assert (probed, removed) == (0, [])
    # Without that heartbeat, both would have been probed (and, with no backend to answer, removed).
    Node.objects.filter(pk=node_id).update(last_heartbeat=long_ago)
    probed, _removed = probe_unheard_replicas(now=timezone.now())
    assert probed == 2
