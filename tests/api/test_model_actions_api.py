"""`POST /api/models/{name}/load` ("load one now") and `POST /api/models/{name}/unload` ("unload all"),
issue 17 item 1: refusals carry the decision record; a replica serving requests is never cut off silently."""

from __future__ import annotations

import pytest

from nodes.models import ModelReplica
from scheduling.models import PlacementDecision
from tests.factories import ModelConfigFactory, NodeFactory, ReplicaFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_load_refused_answers_503_naming_every_node(api) -> None:
    ModelConfigFactory(name="m")
    NodeFactory(name="gpu-1", approved_at=None, status="pending")
    answer = api.post("/api/models/m/load")
    assert answer.status_code == 503, answer.content
    body = answer.json()
    assert body["error"].startswith("cannot place m:")
    assert "gpu-1" in body["error"]
    decision = body["details"]["decision"]
    assert decision["outcome"] == "no_capacity" and decision["trigger"] == "admin"
    assert decision["candidates"] == [{"node": "gpu-1", "verdict": "not_approved", "detail": "not approved"}]
    assert PlacementDecision.objects.get().trigger == "admin"


def test_load_of_an_unknown_model_is_404_and_needs_an_admin(api, inference_client) -> None:
    assert api.post("/api/models/nope/load").status_code == 404
    ModelConfigFactory(name="m")
    assert inference_client.post("/api/models/m/load").status_code == 403
    assert inference_client.post("/api/models/m/unload").status_code == 403


def test_load_while_the_cooldown_runs_is_409_with_retry_after(api, settings) -> None:
    from scheduling.loadfailures import LoadAttempt, load_failure_record

    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 60
    ModelConfigFactory(name="m")
    NodeFactory(name="gpu-1")
    load_failure_record(attempt=LoadAttempt("m"), error="LoadModel failed: no such file")
    answer = api.post("/api/models/m/load")
    assert answer.status_code == 409
    assert "no such file" in answer.json()["error"]
    assert 0 < answer.json()["details"]["retry_after"] <= 60
    assert not ModelReplica.objects.exists()


def test_unload_all_refuses_busy_replicas_without_force_and_changes_nothing(api) -> None:
    ModelConfigFactory(name="m")
    idle = ReplicaFactory(node__name="a", model_name="m", replica_index=0)
    busy = ReplicaFactory(node__name="b", model_name="m", replica_index=0, in_flight=2)
    other = ReplicaFactory(node=idle.node, model_name="other")
    answer = api.post("/api/models/m/unload", {}, format="json")
    assert answer.status_code == 409
    body = answer.json()
    assert "serving 2 requests" in body["error"] and "nothing was unloaded" in body["error"]
    assert body["details"]["busy"] == [{"node": "b", "process_key": "m#0", "state": "loaded", "in_flight": 2}]
    assert set(ModelReplica.objects.values_list("pk", flat=True)) == {idle.pk, busy.pk, other.pk}

    answer = api.post("/api/models/m/unload", {"force": True}, format="json")
    assert answer.status_code == 200
    assert answer.json()["unloaded"] == [
        {"node": "a", "process_key": "m#0", "state": "loaded", "in_flight": 0},
        {"node": "b", "process_key": "m#0", "state": "loaded", "in_flight": 2},
    ]
    assert list(ModelReplica.objects.values_list("pk", flat=True)) == [other.pk]


def test_unload_all_of_idle_replicas_needs_no_force_and_an_empty_model_answers_nothing(api) -> None:
    ModelConfigFactory(name="m")
    ReplicaFactory(node__name="a", model_name="m", replica_index=0)
    ReplicaFactory(node__name="b", model_name="m", replica_index=0, state="loading")
    answer = api.post("/api/models/m/unload")
    assert answer.status_code == 200
    assert [r["process_key"] for r in answer.json()["unloaded"]] == ["m#0", "m#0"]
    assert not ModelReplica.objects.exists()
    assert api.post("/api/models/m/unload").json() == {"unloaded": []}
    # Not in the catalog and not running: 404; not in the catalog but running: unloaded.
    assert api.post("/api/models/ghost/unload").status_code == 404
    ReplicaFactory(model_name="ghost")
    assert len(api.post("/api/models/ghost/unload").json()["unloaded"]) == 1


def test_unload_all_refuses_a_bad_force(api) -> None:
    ModelConfigFactory(name="m")
    answer = api.post("/api/models/m/unload", {"force": "maybe"}, format="json")
    assert answer.status_code == 400 and "force" in answer.json()["details"]


def test_models_named_like_the_routes_are_still_reachable(api) -> None:
    ModelConfigFactory(name="x/load")
    ModelConfigFactory(name="x/unload")
    assert api.get("/api/models/x/load").json()["name"] == "x/load"
    assert api.get("/api/models/x/unload").json()["name"] == "x/unload"


def test_load_now_and_unload_all_are_audited_with_the_outcome(api) -> None:
    from audit.models import AuditEntry

    ModelConfigFactory(name="m")
    NodeFactory(name="gpu-1", approved_at=None, status="pending")
    assert api.post("/api/models/m/load").status_code == 503
    load = AuditEntry.objects.get(action="model.load_now")
    assert (load.target_type, load.target_id, load.via) == ("model", "m", "api")
    assert load.after["outcome"] == "refused" and "gpu-1" in load.after["error"]
    assert load.after["decision"] == PlacementDecision.objects.get().pk

    ReplicaFactory(node__name="a", model_name="m", replica_index=0, in_flight=1)
    assert api.post("/api/models/m/unload").status_code == 409
    assert not AuditEntry.objects.filter(action="model.unload_all").exists()
    assert api.post("/api/models/m/unload", {"force": True}, format="json").status_code == 200
    unload = AuditEntry.objects.get(action="model.unload_all")
    assert unload.before == {
        "replicas": [{"node_name": "a", "process_key": "m#0", "state": "loaded", "in_flight": 1}],
        "force": True,
    }
    assert unload.after == {"replicas": []}
