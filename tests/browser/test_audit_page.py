"""The audit trail in Chromium (issue 17 item 5): drain a node on the nodes page, see the entry in the open
drawer and on `/ui/audit/`; filter by keyboard; the page at 375 and 1,920 px."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from audit.models import AuditEntry
from tests.browser.conftest import screenshot
from tests.factories import NodeFactory

pytestmark = pytest.mark.browser


def test_drain_on_the_nodes_page_shows_in_the_drawer_and_on_the_audit_page(page) -> None:
    node = NodeFactory(name="gpu-audit")
    page.goto("/ui/nodes/")
    page.get_by_role("button", name="gpu-audit", exact=True).click()
    recent = page.locator(f"#node-{node.pk}-audit")
    expect(recent).to_contain_text("No admin action recorded on this node yet.")

    page.get_by_role("button", name="Actions for gpu-audit").click()
    page.get_by_role("menuitem", name="Drain").click()
    expect(page.locator(f"#node-{node.pk}-summary")).to_contain_text("Draining")
    # The open drawer asks for its entries again after the action's toast.
    entry = recent.locator('[data-action="node.drain"]')
    expect(entry).to_contain_text("by ops")
    expect(entry).to_contain_text("healthy → draining")
    screenshot(page, "nodes-drawer-audit-1360")

    recent.get_by_role("link", name="All changes to this node").click()
    expect(page).to_have_url(re.compile(rf"/ui/audit/\?target_type=node&target_id={node.pk}$"))
    rows = page.locator("tr[data-audit-entry]")
    expect(rows).to_have_count(1)
    row = rows.first
    expect(row).to_contain_text("ops")
    expect(row).to_contain_text("node.drain")
    expect(row).to_contain_text("gpu-audit")
    expect(row.locator(".audit-old").first).to_have_text("healthy")
    expect(row.locator(".audit-new").first).to_have_text("draining")
    entry_row = AuditEntry.objects.get(action="node.drain")
    assert (entry_row.actor_name, entry_row.via) == ("ops", "page")


def test_filters_by_keyboard(page) -> None:
    now = timezone.now()
    for index, action in enumerate(["node.drain", "node.resume", "model.create"]):
        AuditEntry.objects.create(
            at=now - timedelta(minutes=index),
            actor_kind="user",
            actor_name=f"user-{index}",
            via="page",
            action=action,
            target_type="model" if action.startswith("model") else "node",
            target_id=f"t{index}",
            target_name=f"target-{index}",
            before=None,
            after={"n": index},
        )
    page.goto("/ui/audit/")
    rows = page.locator("tr[data-audit-entry]")
    expect(rows).to_have_count(3)
    page.get_by_label("Action").focus()
    page.get_by_label("Action").select_option("node.resume")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("user-1")
    assert "action=node.resume" in page.url  # the filters are in the address: a view can be shared
    page.get_by_label("Action").select_option("")
    page.get_by_label("Actor").focus()
    page.keyboard.type("user-2")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("model.create")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Action")).to_be_focused()


@pytest.mark.parametrize("width, height", [(375, 812), (1920, 1080)])
def test_the_page_fits_narrow_and_wide_screens(page, width, height) -> None:
    now = timezone.now()
    samples = [
        ("user", "ops", "page", "node.drain", "node", "gpu-a", {"status": "healthy"}, {"status": "draining"}),
        ("api_key", "ci-admin", "api", "node.labels", "node", "gpu-b",
         {"labels": {"zone": "eu-west"}}, {"labels": {"zone": "eu-west", "rack": "r12"}}),
        ("command", "import_models", "command", "model.create", "model", "org/qwen3-8b-instruct:q4",
         None, {"backend": "llama-cpp", "vram_bytes": 6442450944, "context_size": 8192}),
        ("user", "admin", "admin", "rule.update", "rule", "org/qwen3-8b-instruct:q4",
         {"min_replicas": 1, "max_replicas": 2}, {"min_replicas": 2, "max_replicas": 4}),
        ("command", "create_api_key", "command", "api_key.create", "api_key", "chat-frontend",
         None, {"name": "chat-frontend", "prefix": "lac_AbCd", "is_admin": False}),
    ]  # fmt: skip
    for index, (kind, name, via, action, target_type, target, before, after) in enumerate(samples):
        AuditEntry.objects.create(
            at=now - timedelta(minutes=index * 7),
            actor_kind=kind,
            actor_name=name,
            via=via,
            action=action,
            target_type=target_type,
            target_id=target,
            target_name=target,
            before=before,
            after=after,
        )
    page.set_viewport_size({"width": width, "height": height})
    page.goto("/ui/audit/")
    expect(page.locator("tr[data-audit-entry]")).to_have_count(5)
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for label in ("Actor", "Action", "Target type", "Target (id or name)", "Since", "Until"):
        box = page.get_by_label(label).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, label
    screenshot(page, f"audit-{width}", full_page=True)
