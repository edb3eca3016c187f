"""A model that cannot load, as the operator sees it (issue 12 item 3): "load failing since 12:03: <error>" on
the nodes page and the scheduling page, and the "Retry now" button."""

from __future__ import annotations

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from scheduling.loadfailures import LoadAttempt, load_failure_record
from scheduling.models import LoadFailure
from tests.browser.conftest import screenshot
from tests.factories import ModelConfigFactory, NodeFactory, RuleFactory

pytestmark = pytest.mark.browser

ERROR = (
    "loading qwen3-8b on gpu-1 failed: qwen3-8b#0: LoadModel failed: could not load model: "
    "/models/qwen3-8b.gguf: no such file or directory"
)


def failing(model_name: str) -> LoadFailure:
    return load_failure_record(attempt=LoadAttempt(model_name), error=ERROR)


def test_the_nodes_page_shows_a_failing_model_and_retry_now_clears_it(page) -> None:
    NodeFactory(name="gpu-1")
    ModelConfigFactory(name="qwen3-8b")
    row = failing("qwen3-8b")
    since = timezone.localtime(row.first_failed_at)
    page.goto("/ui/nodes/")
    banner = page.locator('[data-load-failure="qwen3-8b"]')
    expect(banner).to_contain_text(f"load failing since {since:%H:%M}: {ERROR}")
    expect(banner).to_contain_text("1 failed attempt")
    screenshot(page, "nodes-load-failing", full_page=True)
    banner.get_by_role("button", name="Retry now").click()
    expect(page.get_by_role("status").filter(has_text="qwen3-8b will be loaded again")).to_be_visible()
    expect(page.locator("[data-load-failure]")).to_have_count(0)
    assert not LoadFailure.objects.exists()


def test_the_scheduling_page_shows_it_per_rule_and_retry_now_clears_it(page) -> None:
    ModelConfigFactory(name="qwen3-8b")
    RuleFactory(model_name="qwen3-8b", min_replicas=1)
    RuleFactory(model_name="healthy", min_replicas=1)
    row = failing("qwen3-8b")
    since = timezone.localtime(row.first_failed_at)
    page.goto("/ui/scheduling/")
    status = page.locator('tr[data-rule="qwen3-8b"] [data-status]')
    expect(status).to_have_text(f"Load failing since {since:%H:%M}")
    expect(page.locator('tr[data-rule="qwen3-8b"]')).to_contain_text("no such file or directory")
    expect(page.locator('tr[data-rule="healthy"] [data-status]')).to_have_text("OK")
    expect(page.locator('[data-load-failure="qwen3-8b"]')).to_contain_text(
        f"load failing since {since:%H:%M}"
    )
    screenshot(page, "scheduling-load-failing", full_page=True)
    page.locator('[data-load-failure="qwen3-8b"]').get_by_role("button", name="Retry now").click()
    expect(page.get_by_role("status").filter(has_text="qwen3-8b will be loaded again")).to_be_visible()
    expect(status).to_have_text("OK")
    expect(page.locator("[data-load-failure]")).to_have_count(0)
    assert not LoadFailure.objects.exists()
