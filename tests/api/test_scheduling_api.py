"""`/api/nodes/scheduling*` (SCENARIOS 57-61)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from nodes.choices import ReplicaState
from scheduling.models import SchedulingRule
from tests.factories import ReplicaFactory, RuleFactory

pytestmark = pytest.mark.django_db

URL = "/api/nodes/scheduling"


def test_create_and_read(api):
    # SCENARIO 57
    body = {
        "model_name": "M",
        "node_selector": {"gpu.vendor": "nvidia"},
        "min_replicas": 1,
        "max_replicas": 3,
    }
    assert api.post(URL, body, format="json").status_code == 200
    rule = api.get(f"{URL}/M").json()
    assert rule == {
        "id": SchedulingRule.objects.get().id,
        "model_name": "M",
        "node_selector": {"gpu.vendor": "nvidia"},
        "min_replicas": 1,
        "max_replicas": 3,
        "prefetch": False,
        "unsatisfiable_until": None,
        "unsatisfiable_ticks": 0,
        "current_replicas": 0,
    }


def test_post_again_updates_in_place(api):
    # SCENARIO 58
    first = api.post(URL, {"model_name": "M", "min_replicas": 1, "max_replicas": 2}, format="json").json()
    SchedulingRule.objects.update(unsatisfiable_ticks=3)
    second = api.post(URL, {"model_name": "M", "min_replicas": 2, "max_replicas": 5}, format="json").json()
    assert SchedulingRule.objects.count() == 1
    assert second["id"] == first["id"] and (second["min_replicas"], second["max_replicas"]) == (2, 5)
    assert second["unsatisfiable_ticks"] == 0


def test_list_with_current_replicas_and_delete(api, django_assert_max_num_queries):
    # SCENARIO 59
    RuleFactory(model_name="list-a", min_replicas=1)
    RuleFactory(model_name="list-b", max_replicas=2)
    for i in range(5):
        RuleFactory(model_name=f"more-{i}")
    ReplicaFactory(model_name="list-a", replica_index=0)
    ReplicaFactory(model_name="list-a", replica_index=1, state=ReplicaState.LOADING)
    ReplicaFactory(model_name="list-a", replica_index=2, state=ReplicaState.FAILED)
    api.get(URL)
    with django_assert_max_num_queries(2):  # the key, the rules with their counts
        rules = {rule["model_name"]: rule for rule in api.get(URL).json()}
    assert rules["list-a"]["current_replicas"] == 2 and rules["list-b"]["current_replicas"] == 0
    assert api.delete(f"{URL}/list-a").status_code == 204
    assert api.get(f"{URL}/list-a").status_code == 404
    assert api.get(f"{URL}/never").status_code == 404
    assert api.delete(f"{URL}/never").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model_name": "M", "min_replicas": -1}, "min_replicas"),
        ({"model_name": "M", "max_replicas": -1}, "max_replicas"),
        ({"model_name": "M", "min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"model_name": "M", "min_replicas": 10**12}, "min_replicas"),
        ({"model_name": "M", "min_replicas": "x"}, "min_replicas"),
        ({"min_replicas": 1}, "model_name"),
        ({"model_name": ""}, "model_name"),
        ({"model_name": "m" * 256}, "model_name"),
        ({"model_name": "a#0"}, "model_name"),
        ({"model_name": "a\x00b"}, "model_name"),
        ({"model_name": ["M"]}, "model_name"),
        ({"model_name": "M", "node_selector": {"a": 1}}, "node_selector"),
        ({"model_name": "M", "node_selector": {"a": {"b": "c"}}}, "node_selector"),
        ({"model_name": "M", "node_selector": ["a"]}, "node_selector"),
        ({"model_name": "M", "node_selector": {"": "x"}}, "node_selector"),
    ],
)
def test_invalid_rules_are_400_naming_the_field(api, body, field):
    # SCENARIO 60 (first three) and 62
    response = api.post(URL, body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["details"]
    assert not SchedulingRule.objects.exists()


def test_min_with_no_max_limit_is_accepted(api):
    # SCENARIO 60 (last)
    response = api.post(URL, {"model_name": "M", "min_replicas": 3, "max_replicas": 0}, format="json")
    assert response.status_code == 200 and response.json()["max_replicas"] == 0


@pytest.mark.parametrize("name", ["org/model:v1.5", "Qwen/Qwen3-8B-GGUF:Q4_K_M", "模型/ü.v2", "a b"])
def test_odd_model_names_round_trip(api, name):
    # SCENARIO 61
    assert api.post(URL, {"model_name": name, "min_replicas": 1}, format="json").status_code == 200
    response = api.get(f"{URL}/{quote(name)}")
    assert response.status_code == 200 and response.json()["model_name"] == name
    assert api.delete(f"{URL}/{quote(name)}").status_code == 204
    assert not SchedulingRule.objects.exists()


def test_malformed_json_is_400(api):
    response = api.post(URL, "{", content_type="application/json")
    assert response.status_code == 400 and set(response.json()) == {"error", "details"}
