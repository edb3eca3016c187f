"""The scheduling page and its HTMX fragments (BEHAVIOUR §8, SCENARIOS 178-179, 181)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from html import unescape

import pytest
from django.test import Client
from django.utils import timezone

from scheduling.models import SchedulingRule
from tests.factories import ModelConfigFactory, NodeFactory, ReplicaFactory, RuleFactory
from tests.ui.conftest import HTMX

pytestmark = pytest.mark.django_db


def toast_of(response) -> dict:
    return json.loads(response["HX-Trigger"])["toast"]


def rule_row(html: str, model_name: str) -> str:
    match = re.search(rf'<tr data-rule="{re.escape(model_name)}">.*?</tr>', html, re.S)
    assert match, f"no row for {model_name}"
    return match.group(0)


def test_rules_table_modes_selectors_limits_and_status(staff_client: Client) -> None:
    node = NodeFactory(worker_max_replicas_per_model=2)
    ReplicaFactory(node=node, model_name="auto", replica_index=0)
    ReplicaFactory(node=node, model_name="auto", replica_index=1, state="loading")
    ReplicaFactory(node=node, model_name="pinned", replica_index=0, state="failed")
    RuleFactory(model_name="auto", min_replicas=2, max_replicas=0)
    RuleFactory(model_name="pinned", node_selector={"gpu.vendor": "nvidia", "zone": "a"})
    RuleFactory(model_name="idle")
    until = timezone.now() + timedelta(minutes=5)
    RuleFactory(
        model_name="stuck", min_replicas=3, max_replicas=4, unsatisfiable_until=until, unsatisfiable_ticks=3
    )
    RuleFactory(
        model_name="cooled", min_replicas=1, unsatisfiable_until=timezone.now() - timedelta(seconds=1)
    )
    html = staff_client.get("/ui/scheduling/").content.decode()
    assert "<html" in html

    auto = rule_row(html, "auto")
    assert "Auto-scaling</span>" in auto and "Any node" in auto and "no limit" in auto
    assert re.findall(r'<td class="num" data-label="(\w+)">(\d+)</td>', auto) == [
        ("Min", "2"),
        ("Current", "2"),
    ]  # min 2, current 2 (loaded + loading)
    assert 'data-status="ok">OK<' in auto
    pinned = rule_row(html, "pinned")
    assert "Placement</span>" in pinned and "gpu.vendor=nvidia</li>" in pinned and "zone=a</li>" in pinned
    assert "Inactive</span>" in rule_row(html, "idle")
    stuck = rule_row(html, "stuck")
    local = timezone.localtime(until)
    assert f"Unsatisfiable until {local:%H:%M}</span>" in stuck and re.search(
        r'<td class="num" data-label="\w+">4</td>', stuck
    )
    assert 'data-status="ok">OK<' in rule_row(html, "cooled")


def test_table_fragment_and_fixed_queries(staff_client: Client, django_assert_max_num_queries) -> None:
    for index in range(3):
        RuleFactory(model_name=f"m{index}", min_replicas=1)
    # session, user, rules with their current replicas, load failures (the last refusals only for short rules)
    with django_assert_max_num_queries(5):
        fragment = staff_client.get("/ui/scheduling/", **HTMX).content.decode()
    assert "<html" not in fragment and fragment.count("<tr data-rule=") == 3
    for index in range(3, 30):
        RuleFactory(model_name=f"m{index}", min_replicas=1)
        ModelConfigFactory(name=f"m{index}")
    with django_assert_max_num_queries(5):
        staff_client.get("/ui/scheduling/", **HTMX)
    with django_assert_max_num_queries(6):  # + the catalog for the form's model picker
        staff_client.get("/ui/scheduling/")


def test_form_fragment_lists_the_catalog_and_fills_an_existing_rule(staff_client: Client) -> None:
    ModelConfigFactory(name="llama-3")
    ModelConfigFactory(name="org/qwen:7b")
    blank = staff_client.get("/ui/scheduling/form", **HTMX).content.decode()
    assert "<html" not in blank and "New scheduling rule" in blank
    assert '<option value="llama-3">' in blank and '<option value="org/qwen:7b">' in blank
    assert 'list="rule-model-catalog"' in blank
    RuleFactory(model_name="org/qwen:7b", node_selector={"zone": "a"}, min_replicas=0, max_replicas=0)
    edit = staff_client.get("/ui/scheduling/form?model=org/qwen:7b", **HTMX).content.decode()
    assert "Edit rule" in edit and 'value="org/qwen:7b" readonly' in edit
    assert 'id="rule-mode-pin" name="mode" value="pin" checked' in edit
    assert 'name="selector" value="zone=a"' in edit
    full = staff_client.get("/ui/scheduling/form?model=org/qwen:7b")
    assert "<html" in full.content.decode() and "Edit rule" in full.content.decode()


def post_rule(client: Client, **fields):
    data = {"mode": "autoscale", "min_replicas": "1", "max_replicas": "0", **fields}
    return client.post("/ui/scheduling/save", data, **HTMX)


def test_create_an_autoscale_rule(staff_client: Client) -> None:
    response = post_rule(
        staff_client,
        model_name="typed/model:1",
        min_replicas="2",
        max_replicas="4",
        selector=["gpu.vendor=nvidia"],
    )
    assert response.status_code == 200
    rule = SchedulingRule.objects.get(model_name="typed/model:1")
    assert (rule.min_replicas, rule.max_replicas, rule.node_selector) == (2, 4, {"gpu.vendor": "nvidia"})
    html = response.content.decode()
    assert '<section id="rules" class="table-wrap" aria-label="Rules" hx-swap-oob="true"' in html
    assert 'id="rule-form"' not in html  # the form closes
    assert toast_of(response) == {"message": "Rule for typed/model:1 saved.", "level": "success"}


def test_a_selector_being_typed_counts_as_a_chip(staff_client: Client) -> None:
    post_rule(staff_client, model_name="m", mode="pin", selector_key="zone", selector_value="b")
    rule = SchedulingRule.objects.get(model_name="m")
    assert (rule.min_replicas, rule.max_replicas, rule.node_selector) == (0, 0, {"zone": "b"})


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"min_replicas": "3", "max_replicas": "2"}, "rule-min-error", "Must not exceed max_replicas"),
        ({"min_replicas": "-1"}, "rule-min-error", "greater than or equal to 0"),
        ({"max_replicas": "-1"}, "rule-max-error", "greater than or equal to 0"),
        ({"model_name": ""}, "rule-model-error", "may not be blank"),
        ({"model_name": "bad#name"}, "rule-model-error", "'#' is not allowed"),
        ({"mode": "pin"}, None, "Pin to nodes needs at least one key=value label"),
        ({"selector": ["novalue"]}, None, "Selector entries are key=value"),
    ],
)
def test_validation_errors_are_shown_inline(
    staff_client: Client, fields: dict, field: str | None, message: str
) -> None:
    response = post_rule(staff_client, **{"model_name": "m", **fields})
    assert response.status_code == 422
    html = unescape(response.content.decode())
    assert 'id="rule-form"' in html and message in html
    if field:
        assert re.search(rf'<p class="field-error" id="{field}">[^<]*{re.escape(message)}', html)
    else:
        assert '<div class="form-errors" role="alert">' in html
    assert toast_of(response)["level"] == "error"
    assert not SchedulingRule.objects.exists()


def test_min_above_max_keeps_what_was_typed(staff_client: Client) -> None:
    html = post_rule(
        staff_client, model_name="typed", min_replicas="3", max_replicas="2", selector=["a=b"]
    ).content.decode()
    assert 'value="typed"' in html and 'id="rule-min" name="min_replicas"' in html
    assert re.search(r'id="rule-min"[^>]*value="3"', html) and re.search(r'id="rule-max"[^>]*value="2"', html)
    assert 'name="selector" value="a=b"' in html


def test_max_zero_means_no_limit(staff_client: Client) -> None:
    assert post_rule(staff_client, model_name="m", min_replicas="3", max_replicas="0").status_code == 200


def test_edit_in_place_keeps_the_rule_and_resets_its_breaker(staff_client: Client) -> None:
    rule = RuleFactory(
        model_name="m", min_replicas=1, unsatisfiable_ticks=3, unsatisfiable_until=timezone.now()
    )
    assert (
        post_rule(staff_client, model_name="m", min_replicas="2", max_replicas="8", editing="on").status_code
        == 200
    )
    updated = SchedulingRule.objects.get()
    assert updated.pk == rule.pk and (updated.min_replicas, updated.max_replicas) == (2, 8)
    assert updated.unsatisfiable_until is None


def test_delete_a_rule(staff_client: Client) -> None:
    RuleFactory(model_name="org/m:1")
    response = staff_client.post("/ui/scheduling/delete", {"model_name": "org/m:1"}, **HTMX)
    assert response.status_code == 200 and not SchedulingRule.objects.exists()
    assert toast_of(response)["message"] == "Rule for org/m:1 deleted."
    missing = staff_client.post("/ui/scheduling/delete", {"model_name": "org/m:1"}, **HTMX)
    assert missing.status_code == 404 and toast_of(missing)["level"] == "error"


def test_plain_posts_work_without_htmx(staff_client: Client) -> None:
    response = staff_client.post(
        "/ui/scheduling/save", {"model_name": "m", "mode": "autoscale", "min_replicas": "1"}, follow=True
    )
    assert (
        response.redirect_chain == [("/ui/scheduling/", 302)]
        and "Rule for m saved." in response.content.decode()
    )
    invalid = staff_client.post(
        "/ui/scheduling/save", {"model_name": "m", "mode": "autoscale", "min_replicas": "-1"}
    )
    assert (
        invalid.status_code == 200
        and "<html" in invalid.content.decode()
        and "field-error" in invalid.content.decode()
    )


def test_scheduling_posts_are_staff_only_and_need_csrf(plain_client: Client, staff_user) -> None:
    assert plain_client.post("/ui/scheduling/save", {"model_name": "m"}).status_code == 403
    assert plain_client.post("/ui/scheduling/delete", {"model_name": "m"}).status_code == 403
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff_user)
    assert (
        client.post("/ui/scheduling/save", {"model_name": "m", "mode": "autoscale"}, **HTMX).status_code
        == 403
    )
    assert not SchedulingRule.objects.exists()


# --- load-based scaling fields (README "Autoscaling") ---------------------------------------------------


def test_create_a_rule_with_load_based_scaling_and_edit_it_again(staff_client: Client) -> None:
    response = post_rule(
        staff_client,
        model_name="auto",
        min_replicas="0",
        max_replicas="8",
        target_in_flight="4",
        upscale_delay="15",
        downscale_delay="120",
        scale_to_zero_after="600",
    )
    assert response.status_code == 200
    rule = SchedulingRule.objects.get(model_name="auto")
    assert (rule.target_in_flight, rule.upscale_delay, rule.downscale_delay, rule.scale_to_zero_after) == (
        4,
        15,
        120,
        600,
    )
    row = rule_row(response.content.decode(), "auto")
    assert "Auto-scaling" in row and "4 in flight per replica · to zero after 600 s" in row
    edit = staff_client.get("/ui/scheduling/form?model=auto", **HTMX).content.decode()
    for input_id, value in [
        ("rule-target", "4"),
        ("rule-upscale-delay", "15"),
        ("rule-downscale-delay", "120"),
        ("rule-zero-after", "600"),
    ]:
        assert re.search(rf'id="{input_id}"[^>]*value="{value}"', edit), input_id
    assert 'id="rule-mode-autoscale" name="mode" value="autoscale" checked' in edit


def test_empty_scaling_fields_take_the_defaults(staff_client: Client, settings) -> None:
    post_rule(staff_client, model_name="plain")
    rule = SchedulingRule.objects.get(model_name="plain")
    assert (rule.target_in_flight, rule.upscale_delay, rule.downscale_delay, rule.scale_to_zero_after) == (
        0,
        30,
        None,
        0,
    )
    blank = staff_client.get("/ui/scheduling/form", **HTMX).content.decode()
    down = f"{settings.LOCALAI_SCALE_DOWN_DELAY:g}"
    assert re.search(rf'id="rule-downscale-delay"[^>]*placeholder="{down}"', blank)
    assert f"Empty: LOCALAI_SCALE_DOWN_DELAY ({down} s)" in blank


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"target_in_flight": "-1"}, "rule-target-error", "greater than or equal to 0"),
        ({"upscale_delay": "2.5"}, "rule-upscale-delay-error", "A valid integer is required"),
        ({"downscale_delay": "soon"}, "rule-downscale-delay-error", "A valid integer is required"),
        ({"scale_to_zero_after": "99999999"}, "rule-zero-after-error", "less than or equal to"),
    ],
)
def test_bad_scaling_values_are_shown_inline(
    staff_client: Client, fields: dict, field: str, message: str
) -> None:
    response = post_rule(staff_client, model_name="m", **fields)
    assert response.status_code == 422
    html = unescape(response.content.decode())
    assert re.search(rf'<p class="field-error" id="{field}">[^<]*{re.escape(message)}', html)
    value = next(iter(fields.values()))
    assert f'value="{value}"' in html  # what was typed stays
    assert not SchedulingRule.objects.exists()
