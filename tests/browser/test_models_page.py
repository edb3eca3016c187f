"""The models page in Chromium: the model form sets the routing policy (issue 14)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from scheduling.models import ModelConfig
from tests.browser.conftest import screenshot
from tests.factories import ModelConfigFactory

pytestmark = pytest.mark.browser


def test_set_a_models_routing_policy_in_the_model_form(page) -> None:
    ModelConfigFactory(name="qwen3-8b", backend="llama-cpp")
    ModelConfigFactory(name="chat-sessions", routing="session")
    page.goto("/ui/models/")
    expect(page.locator('tr[data-model="chat-sessions"] [data-routing]')).to_have_text("Session")
    page.get_by_role("button", name="Edit qwen3-8b").click()
    least = page.get_by_label("Least in flight")
    expect(least).to_be_checked()
    expect(least).to_be_focused()
    page.get_by_label("Prefix cache").check()
    screenshot(page, "models-form-routing")
    page.get_by_role("button", name="Save model").click()
    expect(page.locator('tr[data-model="qwen3-8b"] [data-routing]')).to_have_text("Prefix cache")
    expect(page.locator("#model-form")).to_have_count(0)
    assert ModelConfig.objects.get(name="qwen3-8b").routing == "prefix_cache"
    screenshot(page, "models-table-routing")
