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
        "target_in_flight": 0,
        "upscale_delay": 30,
        "downscale_delay": None,
        "scale_to_zero_after": 0,
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


# --- load-based autoscaling fields (README "Autoscaling") -----------------------------------------------


def test_autoscaling_fields_round_trip_in_whole_seconds(api):
    body = {
        "model_name": "A",
        "min_replicas": 0,
        "max_replicas": 8,
        "target_in_flight": 4,
        "upscale_delay": 10,
        "downscale_delay": 120,
        "scale_to_zero_after": 600,
    }
    answer = api.post(URL, body, format="json")
    assert answer.status_code == 200, answer.json()
    rule = api.get(f"{URL}/A").json()
    assert {key: rule[key] for key in body} == body
    # Posting again without them puts the defaults back (the POST replaces the rule's fields).
    api.post(URL, {"model_name": "A"}, format="json")
    rule = SchedulingRule.objects.get(model_name="A")
    assert (rule.target_in_flight, rule.upscale_delay, rule.downscale_delay, rule.scale_to_zero_after) == (
        0,
        30,
        None,
        0,
    )


def test_saving_a_rule_restarts_its_pending_scale_timers(api):
    from django.utils import timezone

    api.post(URL, {"model_name": "A", "target_in_flight": 2}, format="json")
    now = timezone.now()
    SchedulingRule.objects.update(scale_up_since=now, scale_down_since=now, scaled_up_at=now)
    api.post(URL, {"model_name": "A", "target_in_flight": 3}, format="json")
    rule = SchedulingRule.objects.get(model_name="A")
    assert (rule.scale_up_since, rule.scale_down_since) == (None, None)
    assert rule.scaled_up_at == now  # the no-flap guard keeps the last scale-up


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_in_flight", -1),
        ("target_in_flight", 1.5),
        ("target_in_flight", "four"),
        ("upscale_delay", -5),
        ("upscale_delay", 2.5),
        ("upscale_delay", "30s"),
        ("downscale_delay", -1),
        ("downscale_delay", 0.1),
        ("scale_to_zero_after", -1),
        ("scale_to_zero_after", 10**9),
        ("scale_to_zero_after", None),
        ("upscale_delay", None),
    ],
)
def test_bad_autoscaling_values_are_a_400_and_nothing_is_saved(api, field, value):
    answer = api.post(URL, {"model_name": "B", field: value}, format="json")
    assert answer.status_code == 400
    assert field in str(answer.json())
    assert not SchedulingRule.objects.filter(model_name="B").exists()
