"""The scheduling page in Chromium (SCENARIOS 178-179): create with presets, inline errors, breaker badge."""

from __future__ import annotations

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from scheduling.models import SchedulingRule
from scheduling.reconciler import reconcile_tick
from tests.browser.conftest import screenshot
from tests.factories import ModelConfigFactory, NodeFactory, ReplicaFactory, RuleFactory

pytestmark = pytest.mark.browser


def test_create_an_autoscale_rule_with_presets_and_see_the_breaker_trip(page) -> None:
    ModelConfigFactory(name="qwen3-8b")
    ModelConfigFactory(name="llama-3.2-1b")
    page.goto("/ui/scheduling/")
    page.get_by_role("button", name="+ New rule").click()
    model = page.get_by_label("Model")
    expect(model).to_be_focused()
    model.fill("qwen3-8b")
    page.get_by_text("Auto-scale", exact=False).last.click()
    page.get_by_role("group", name="Min presets").get_by_role("button", name="2").click()
    page.get_by_role("group", name="Max presets").get_by_role("button", name="4").click()
    expect(page.get_by_label("Min replicas")).to_have_value("2")
    expect(page.get_by_label("Max replicas")).to_have_value("4")
    expect(page.get_by_role("group", name="Max presets").get_by_role("button", name="4")).to_have_attribute(
        "aria-pressed", "true"
    )
    page.get_by_label("Selector key").fill("gpu.vendor")
    page.get_by_label("Selector value").fill("nvidia")
    page.get_by_label("Selector value").press("Enter")  # adds the chip, does not save
    expect(page.locator("[data-chip-list]")).to_contain_text("gpu.vendor=nvidia")
    page.get_by_role("button", name="Save rule").click()
    row = page.locator('tr[data-rule="qwen3-8b"]')
    expect(row).to_contain_text("Auto-scaling")
    expect(row).to_contain_text("gpu.vendor=nvidia")
    expect(row.locator("[data-status]")).to_have_text("OK")
    expect(page.locator("#rule-form")).to_have_count(0)
    rule = SchedulingRule.objects.get(model_name="qwen3-8b")
    assert (rule.min_replicas, rule.max_replicas, rule.node_selector) == (2, 4, {"gpu.vendor": "nvidia"})

    # No node matches: three reconciler ticks open the breaker.
    for _ in range(3):
        reconcile_tick()
    rule.refresh_from_db()
    assert rule.unsatisfiable_until is not None
    page.reload()
    until = timezone.localtime(rule.unsatisfiable_until)
    expect(page.locator('tr[data-rule="qwen3-8b"] [data-status]')).to_have_text(
        f"Unsatisfiable until {until:%H:%M}"
    )


def test_min_above_max_shows_the_servers_error_inline_and_edit_in_place(page) -> None:
    node = NodeFactory()
    ReplicaFactory(node=node, model_name="llama", replica_index=0)
    RuleFactory(model_name="llama", min_replicas=1, max_replicas=2)
    RuleFactory(model_name="pinned", node_selector={"zone": "a"})
    page.goto("/ui/scheduling/")
    page.get_by_role("button", name="+ New rule").click()
    page.get_by_label("Model").fill("typed/custom:model")
    page.get_by_text("Pin to nodes").click()
    expect(page.get_by_label("Min replicas")).to_be_hidden()
    page.get_by_text("Auto-scale", exact=False).last.click()
    page.get_by_label("Min replicas").fill("3")
    page.get_by_label("Max replicas").fill("2")
    page.get_by_role("button", name="Save rule").click()
    expect(page.locator("#rule-min-error")).to_contain_text("Must not exceed max_replicas")
    expect(page.get_by_label("Min replicas")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Model")).to_have_value("typed/custom:model")
    expect(page.get_by_role("status").filter(has_text="Rule not saved")).to_be_visible()
    screenshot(page, "scheduling", full_page=True)
    assert not SchedulingRule.objects.filter(model_name="typed/custom:model").exists()

    page.get_by_role("button", name="Edit rule for llama").click()
    expect(page.get_by_label("Model")).to_have_value("llama")
    page.get_by_role("group", name="Max presets").get_by_role("button", name="8").click()
    page.get_by_role("button", name="Save rule").click()
    expect(page.locator('tr[data-rule="llama"] td.num').nth(1)).to_have_text("8")
    assert SchedulingRule.objects.get(model_name="llama").max_replicas == 8

    page.locator('tr[data-rule="pinned"]').get_by_role("button", name="Delete rule for pinned").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page.locator('tr[data-rule="pinned"]')).to_have_count(0)
    assert not SchedulingRule.objects.filter(model_name="pinned").exists()


def test_the_rule_form_sets_load_based_scaling(page) -> None:
    ModelConfigFactory(name="qwen3-8b")
    page.goto("/ui/scheduling/")
    page.get_by_role("button", name="+ New rule").click()
    page.get_by_label("Model").fill("qwen3-8b")
    page.get_by_label("Min replicas").fill("0")
    page.get_by_label("Max replicas").fill("8")
    expect(page.get_by_role("group", name="Load-based scaling")).to_be_visible()
    page.get_by_label("Target in-flight per replica").fill("4")
    page.get_by_label("Upscale delay (s)").fill("15")
    page.get_by_label("Scale to zero after (s)").fill("-3")
    page.get_by_role("button", name="Save rule").click()
    expect(page.locator("#rule-zero-after-error")).to_contain_text("greater than or equal to 0")
    expect(page.get_by_label("Target in-flight per replica")).to_have_value("4")
    screenshot(page, "scheduling-autoscale-form")
    page.get_by_label("Scale to zero after (s)").fill("600")
    page.get_by_role("button", name="Save rule").click()
    row = page.locator('tr[data-rule="qwen3-8b"]')
    expect(row).to_contain_text("4 in flight per replica · to zero after 600 s")
    rule = SchedulingRule.objects.get(model_name="qwen3-8b")
    assert (rule.target_in_flight, rule.upscale_delay, rule.downscale_delay, rule.scale_to_zero_after) == (
        4,
        15,
        None,
        600,
    )
    screenshot(page, "scheduling-autoscale-row", full_page=True)
    page.get_by_role("button", name="Edit rule for qwen3-8b").click()
    expect(page.get_by_label("Scale to zero after (s)")).to_have_value("600")
    page.get_by_text("Pin to nodes").click()
    expect(page.get_by_role("group", name="Load-based scaling")).to_be_hidden()


@pytest.mark.parametrize("width, height", [(375, 812), (1920, 1080)])
def test_the_page_fits_narrow_and_wide_screens(page, width, height) -> None:
    ModelConfigFactory(name="org/qwen3-8b-instruct:q4_k_m")
    RuleFactory(model_name="org/qwen3-8b-instruct:q4_k_m", min_replicas=2, max_replicas=4,
                node_selector={"gpu.vendor": "nvidia", "zone": "eu-west-1"})  # fmt: skip
    RuleFactory(model_name="pinned", node_selector={"zone": "a"})
    page.set_viewport_size({"width": width, "height": height})
    page.goto("/ui/scheduling/")
    expect(page.locator('tr[data-rule="pinned"]')).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for name in ("+ New rule", "Edit rule for pinned"):
        box = page.get_by_role("button", name=name).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, name
    screenshot(page, f"scheduling-{width}", full_page=True)
