"""The replica logs page in Chromium against a real agent and echo backends (SCENARIO 180)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from tests.ui.agents import AgentNode

pytestmark = [pytest.mark.browser, pytest.mark.e2e]  # real agents


def test_live_lines_scope_switch_filter_and_reconnect(page, start_agent_node) -> None:
    agent_node: AgentNode = start_agent_node(name="gpu-logs")
    node = agent_node.node
    first = agent_node.load("qwen", 0)
    second = agent_node.load("qwen", 1)
    # Replica rows as the control plane would have them.
    from tests.factories import ReplicaFactory

    ReplicaFactory(node=node, model_name="qwen", replica_index=0, address=first)
    ReplicaFactory(node=node, model_name="qwen", replica_index=1, address=second)

    page.goto(f"/ui/nodes/{node.pk}/")
    page.get_by_role("link", name="Logs of qwen#1").click()
    expect(page.locator("[data-scope-chip]")).to_have_text("replica 1")
    scope = page.get_by_role("navigation", name="Scope")
    expect(scope.get_by_role("link")).to_have_text(["Replica 0", "Replica 1", "All merged"])
    state = page.locator("#log-conn")
    expect(state).to_have_text("Live")
    log = page.get_by_role("log")
    expect(log).to_contain_text("LoadModel model='qwen'")

    agent_node.predict(second, "hello live world")
    expect(log.locator(".log-line", has_text="Predict")).to_have_count(1)  # arrived live, once
    agent_node.predict(first, "not this replica")
    agent_node.predict(second, "again")
    expect(log.locator(".log-line", has_text="Predict")).to_have_count(2)

    page.get_by_text("stderr", exact=True).click()
    expect(log.locator(".log-line.stdout").first).to_be_hidden()
    page.get_by_text("All", exact=True).click()
    expect(log.locator(".log-line.stdout").first).to_be_visible()

    # The socket drops: the page says so and comes back by itself.
    page.evaluate("window.lacLogSocket().close(4000)")
    expect(state).to_have_text("Reconnecting…")
    expect(state).to_have_text("Live")
    expect(log.locator(".log-line", has_text="Predict")).to_have_count(
        2
    )  # the buffer replaced, no duplicates
    screenshot(page, "logs", full_page=False)

    scope.get_by_role("link", name="All merged").click()
    expect(page.locator("[data-scope-chip]")).to_have_text("merged · 2 replicas")
    expect(state).to_have_text("Live")
    expect(log.locator(".log-line", has_text="Predict")).to_have_count(3)
    expect(log.locator(".log-key", has_text="qwen#0").first).to_be_visible()
    agent_node.predict(first, "merged live")
    expect(log.locator(".log-line", has_text="Predict")).to_have_count(4)
    screenshot(page, "logs-merged", full_page=False)
