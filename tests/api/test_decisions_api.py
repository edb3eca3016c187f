"""`GET /api/decisions`, `GET /api/plan` and `cluster_status --why`: the placement pipeline as an operator
sees it (issue 13)."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from urllib.parse import urlencode

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from nodes.models import ModelReplica
from scheduling.choices import Verdict
from scheduling.models import ModelConfig, PlacementDecision
from tests.factories import (
    GiB,
    ModelConfigFactory,
    NodeFactory,
    NodeLabelFactory,
    ReplicaFactory,
    RuleFactory,
)

pytestmark = pytest.mark.django_db


def decision(minutes_ago=0, **fields):
    values = {
        "created_at": timezone.now() - timedelta(minutes=minutes_ago),
        "model_name": "m",
        "trigger": "request",
        "outcome": "placed",
        **fields,
    }
    return PlacementDecision.objects.create(**values)


def test_decisions_newest_first_with_every_filter(api):
    decision(30, model_name="org/llama", node_name="gpu-1", replica_index=0)
    decision(
        20, outcome="no_capacity", candidates=[{"node": "gpu-2", "verdict": "no_free_slot", "detail": "1/1"}]
    )
    newest = decision(10, outcome="evicted", node_name="gpu-2", replica_index=3)
    page = api.get("/api/decisions").json()
    assert page["count"] == 3
    assert page["results"][0]["id"] == newest.id
    assert set(page["results"][0]) == {
        "id",
        "time",
        "model",
        "trigger",
        "outcome",
        "node",
        "replica_index",
        "duration",
        "message",
        "candidates",
        "omitted",
    }

    def models(**query):
        answer = api.get(f"/api/decisions?{urlencode(query)}")
        assert answer.status_code == 200, answer.json()
        return [(r["model"], r["outcome"]) for r in answer.json()["results"]]

    assert models(model="org/llama") == [("org/llama", "placed")]
    assert models(node="gpu-2") == [("m", "evicted"), ("m", "no_capacity")]  # placed there, or named
    assert models(outcome="no_capacity") == [("m", "no_capacity")]
    since = (timezone.now() - timedelta(minutes=15)).isoformat()
    assert models(since=since) == [("m", "evicted")]
    assert api.get("/api/decisions?page_size=1").json()["next"]


@pytest.mark.parametrize("query", ["outcome=exploded", "since=yesterday", "model=%00"])
def test_bad_filters_are_400_in_the_api_shape(api, query):
    answer = api.get(f"/api/decisions?{query}")
    assert answer.status_code == 400
    assert set(answer.json()) == {"error", "details"}


def test_decisions_and_plan_are_admin_only(inference_client, user_client):
    ModelConfigFactory(name="m")
    for client in (inference_client, user_client):
        assert client.get("/api/decisions").status_code == 403
        assert client.get("/api/plan?model=m").status_code == 403


def plan_cluster():
    ModelConfigFactory(name="org/m:8b", vram_bytes=8 * GiB)
    RuleFactory(model_name="org/m:8b", node_selector={"gpu": "a100"})
    mismatch = NodeFactory(name="gpu-3", total_vram=40 * GiB, available_vram=40 * GiB)
    NodeLabelFactory(node=mismatch, key="gpu", value="h100")
    small = NodeFactory(name="gpu-5", total_vram=10 * GiB, available_vram=10 * GiB)
    NodeLabelFactory(node=small, key="gpu", value="a100")
    ReplicaFactory(node=small, model_name="other", vram_bytes=6 * GiB, last_used=timezone.now())
    small.available_vram = 4 * GiB
    small.save()


def test_plan_of_a_model_whose_name_has_a_slash(api):
    plan_cluster()
    answer = api.get("/api/plan", {"model": "org/m:8b"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["chosen"] is None
    assert (body["evict"], body["evict_node"]) == ("other#0", "gpu-5")
    assert body["selector"] == {"gpu": "a100"} and body["vram_bytes"] == 8 * GiB
    assert body["candidates"] == [
        {"node": "gpu-3", "verdict": Verdict.SELECTOR_MISMATCH, "detail": "selector gpu=a100 missing"},
        {
            "node": "gpu-5",
            "verdict": Verdict.EVICTION_CANDIDATE,
            "detail": "needs 8.0 GiB, 4.0 GiB free; room by evicting other#0",
        },
    ]
    assert body["message"].startswith("cannot place org/m:8b: not enough VRAM")
    assert ModelReplica.objects.count() == 1 and not PlacementDecision.objects.exists()  # a dry run


def test_plan_of_an_unknown_model_is_404_and_without_model_400(api):
    assert api.get("/api/plan", {"model": "nope"}).status_code == 404
    assert api.get("/api/plan").status_code == 400


def test_cluster_status_why_prints_the_plan():
    plan_cluster()
    out = StringIO()
    call_command("cluster_status", "--why", "org/m:8b", stdout=out)
    text = out.getvalue()
    assert "would evict other#0 on gpu-5, then place there" in text
    assert "gpu-3  selector_mismatch   selector gpu=a100 missing" in text
    assert "eviction_candidate" in text and "needs 8.0 GiB, 4.0 GiB free" in text
    with pytest.raises(CommandError, match="not in the catalog"):
        call_command("cluster_status", "--why", "nope", stdout=StringIO())


def test_plan_and_cluster_status_name_a_node_that_cannot_start_the_models_backend(api):
    ModelConfigFactory(name="org/v:7b", backend="vllm")
    RuleFactory(model_name="org/v:7b", node_selector={"gpu": "a100"})
    for name, backends in (("gpu-1", ["echo", "whisper"]), ("gpu-2", ["echo", "vllm"])):
        NodeLabelFactory(node=NodeFactory(name=name, backends=backends), key="gpu", value="a100")
    body = api.get("/api/plan", {"model": "org/v:7b"}).json()
    assert body["chosen"] == "gpu-2"
    assert body["candidates"][1] == {
        "node": "gpu-1",
        "verdict": "backend_missing",
        "detail": "backend vllm not offered (offers: echo, whisper)",
    }
    out = StringIO()
    call_command("cluster_status", "--why", "org/v:7b", stdout=out)
    assert "gpu-1  backend_missing  backend vllm not offered (offers: echo, whisper)" in out.getvalue()
    # With no node able to start it, the dry run's message says so rather than "no node matches".
    ModelConfig.objects.filter(name="org/v:7b").update(backend="exllama")
    body = api.get("/api/plan", {"model": "org/v:7b"}).json()
    assert body["chosen"] is None
    assert body["message"].startswith("cannot place org/v:7b: no node offers backend exllama (gpu-1: backend")
    assert {c["verdict"] for c in body["candidates"]} == {"backend_missing"}
    assert not PlacementDecision.objects.exists()  # a dry run
