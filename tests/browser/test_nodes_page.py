"""The nodes page in Chromium (SCENARIOS 172-177, 181): approve, capacity editor, labels, drawer across polls."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from nodes.models import Node, NodeLabel
from tests.browser.conftest import screenshot
from tests.factories import GiB, NodeFactory, NodeLabelFactory, ReplicaFactory

pytestmark = pytest.mark.browser


def poll_now(page) -> None:
    """Runs the page's 5 s poll at once (its element also answers `lac:poll`), and waits for it to land."""
    with page.expect_response(lambda response: response.url.endswith("/ui/nodes/")):
        page.evaluate("htmx.trigger('#nodes-poll', 'lac:poll')")
    page.wait_for_function("!document.querySelector('.htmx-request, .htmx-settling, .htmx-swapping')")


def test_approve_a_pending_node(page) -> None:
    node = NodeFactory(name="fresh", status="pending", approved_at=None)
    page.goto("/ui/nodes/")
    row = page.locator(f"#node-{node.pk}-summary")
    expect(row).to_contain_text("Pending")
    row.get_by_role("button", name="Approve").click()
    expect(page.get_by_role("status").filter(has_text="Node fresh approved.")).to_be_visible()
    expect(row).to_contain_text("Healthy")
    expect(row.get_by_role("button", name="Approve")).to_have_count(0)
    node.refresh_from_db()
    assert node.approved_at is not None


def test_capacity_editor_enter_saves_override_then_reset(page) -> None:
    node = NodeFactory(name="gpu-a", worker_max_replicas_per_model=1)
    page.goto("/ui/nodes/")
    badge = page.locator(f"#node-{node.pk}-summary .slot-badge")
    expect(badge).to_have_text("1× slots")
    expect(badge).to_have_class(re.compile(r"\bmuted\b"))
    page.get_by_role("button", name="gpu-a", exact=True).click()
    manage = page.locator(f"#node-{node.pk}-drawer details.node-manage")
    expect(manage).not_to_have_attribute("open", "")  # closed by default
    manage.locator("summary").click()
    page.get_by_role("button", name="Edit replica slots of gpu-a").click()
    field = page.get_by_label("Replica slots per model")
    expect(field).to_be_focused()
    # Esc cancels
    field.fill("7")
    field.press("Escape")
    expect(field).to_be_hidden()
    expect(page.locator(f"#node-{node.pk}-capacity [data-cap-value]")).to_have_text("1")
    # Enter saves
    page.get_by_role("button", name="Edit replica slots of gpu-a").click()
    field.fill("3")
    field.press("Enter")
    capacity = page.locator(f"#node-{node.pk}-capacity")
    expect(capacity.locator("[data-override]")).to_have_text("override")
    expect(capacity.locator("[data-cap-value]")).to_have_text("3")
    expect(badge).to_have_text("3× slots")
    expect(badge).to_have_class(re.compile(r"\baccent\b"))
    node.refresh_from_db()
    assert node.max_replicas_override == 3
    capacity.get_by_role("button", name=re.compile("^Reset")).click()
    expect(capacity.locator("[data-override]")).to_have_count(0)
    expect(badge).to_have_text("1× slots")
    expect(badge).to_have_class(re.compile(r"\bmuted\b"))
    node.refresh_from_db()
    assert node.max_replicas_override is None


def test_shrinking_below_loaded_replicas_asks_first(page) -> None:
    node = NodeFactory(name="busy", worker_max_replicas_per_model=4)
    for index in range(3):
        ReplicaFactory(node=node, model_name="qwen", replica_index=index)
    page.goto(f"/ui/nodes/{node.pk}/")
    page.locator(f"#node-{node.pk}-drawer summary").click()
    page.get_by_role("button", name="Edit replica slots of busy").click()
    page.get_by_label("Replica slots per model").fill("2")
    page.get_by_label("Replica slots per model").press("Enter")
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("qwen has 3 replicas loaded on busy")
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    page.keyboard.press("Tab")
    expect(dialog.get_by_role("button", name="Lower to 2")).to_be_focused()
    page.keyboard.press("Tab")  # focus stays in the dialog
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    dialog.get_by_role("button", name="Lower to 2").click()
    expect(page.locator(f"#node-{node.pk}-capacity [data-cap-value]")).to_have_text("2")
    node.refresh_from_db()
    assert node.max_replicas_override == 2


def test_add_and_remove_a_label(page) -> None:
    node = NodeFactory(name="lab")
    page.goto("/ui/nodes/")
    page.get_by_role("button", name="lab", exact=True).click()
    page.locator(f"#node-{node.pk}-drawer summary").click()
    page.get_by_label("Label key").fill("zone")
    page.get_by_label("Label value").fill("eu-1")
    page.get_by_label("Label value").press("Enter")
    expect(page.locator(f"#node-{node.pk}-summary .label-strip")).to_contain_text("zone=eu-1")
    expect(page.get_by_role("status").filter(has_text="label zone=eu-1 set")).to_be_visible()
    assert NodeLabel.objects.get(node=node, key="zone").value == "eu-1"
    page.get_by_role("button", name="Remove label zone").click()
    expect(page.locator(f"#node-{node.pk}-summary .label-strip")).not_to_contain_text("zone=eu-1")
    expect(page.locator(f"#node-{node.pk}-labels")).not_to_contain_text("zone=eu-1")
    assert not NodeLabel.objects.filter(node=node, key="zone").exists()


def test_poll_updates_figures_and_keeps_the_drawer_and_an_edit_in_progress(page) -> None:
    node = NodeFactory(name="steady", total_vram=24 * GiB, available_vram=20 * GiB)
    ReplicaFactory(node=node, model_name="m")
    page.goto("/ui/nodes/")
    page.get_by_role("button", name="steady", exact=True).click()
    page.locator(f"#node-{node.pk}-drawer summary").click()
    page.get_by_role("button", name="Edit replica slots of steady").click()
    page.get_by_label("Replica slots per model").fill("5")
    NodeFactory(name="newcomer", status="pending", approved_at=None)
    Node.objects.filter(pk=node.pk).update(available_vram=4 * GiB)
    poll_now(page)
    expect(page.locator("[data-stat=total]")).to_have_text("2")
    expect(page.locator(f"#node-{node.pk}-summary .vram-figures")).to_contain_text("20.0")
    expect(page.locator(f"#node-{node.pk}-drawer")).to_be_visible()
    expect(page.get_by_role("button", name="steady", exact=True)).to_have_attribute("aria-expanded", "true")
    field = page.get_by_label("Replica slots per model")
    expect(field).to_have_value("5")
    expect(field).to_be_focused()
    expect(page.locator("details.node-manage")).to_have_attribute("open", "")


def test_kebab_menu_drain_resume_and_remove_with_confirm(page) -> None:
    node = NodeFactory(name="kebab")
    page.goto("/ui/nodes/")
    menu = page.get_by_role("button", name="Actions for kebab")
    menu.click()
    page.get_by_role("menuitem", name="Drain").click()
    expect(page.locator(f"#node-{node.pk}-summary")).to_contain_text("Draining")
    menu = page.get_by_role("button", name="Actions for kebab")
    menu.focus()
    page.keyboard.press("ArrowDown")
    expect(page.get_by_role("menuitem", name="Resume")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.get_by_role("menu")).to_be_hidden()
    expect(menu).to_be_focused()
    menu.click()
    page.get_by_role("menuitem", name="Remove…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Remove kebab?")
    dialog.get_by_role("button", name="Cancel").click()
    assert Node.objects.filter(pk=node.pk).exists()
    page.get_by_role("button", name="Actions for kebab").click()
    page.get_by_role("menuitem", name="Remove…").click()
    page.get_by_role("dialog").get_by_role("button", name="Remove").click()
    expect(page.locator(f"#node-{node.pk}")).to_have_count(0)
    expect(page.get_by_role("status").filter(has_text="Node kebab removed.")).to_be_visible()


def test_nodes_page_screenshot_with_a_drawer_open(page) -> None:
    gpu = NodeFactory(
        name="gpu-a",
        address="10.0.0.11:50051",
        total_vram=80 * GiB,
        available_vram=30 * GiB,
        reserved_vram=6 * GiB,
        gpu_vendor="nvidia",
        worker_max_replicas_per_model=4,
        backends=["echo", "llama-cpp", "whisper"],
    )
    for key, value in [
        ("gpu.vendor", "nvidia"),
        ("gpu.vram", "80GB+"),
        ("zone", "eu-west"),
        ("rack", "r12"),
        ("tier", "prod"),
        ("team", "ml"),
        ("pool", "a100"),
    ]:
        NodeLabelFactory(node=gpu, key=key, value=value)
    NodeLabelFactory(node=gpu, key="node.replica-slots", value="4")
    ReplicaFactory(node=gpu, model_name="qwen3-8b", replica_index=0, in_flight=2)
    ReplicaFactory(node=gpu, model_name="qwen3-8b", replica_index=1)
    ReplicaFactory(node=gpu, model_name="llama-3.2-1b", replica_index=0, state="loading")
    NodeFactory(
        name="gpu-b",
        address="10.0.0.12:50051",
        total_vram=24 * GiB,
        available_vram=20 * GiB,
        gpu_vendor="nvidia",
    )
    NodeFactory(name="cpu-c", address="10.0.0.13:50051", status="draining")
    NodeFactory(name="edge-agent", address="10.0.0.20:50051", node_type="agent")
    NodeFactory(name="new-d", address="10.0.0.14:50051", status="pending", approved_at=None)
    page.goto("/ui/nodes/")
    page.get_by_role("button", name="gpu-a", exact=True).click()
    expect(page.locator(f"#node-{gpu.pk}-replicas")).to_contain_text("rep 1")
    page.locator(f"#node-{gpu.pk}-drawer summary").click()
    screenshot(page, "nodes", full_page=True)


def test_drawer_shows_who_set_each_label(page) -> None:
    from nodes import services
    from tests.factories import TEST_CREDENTIAL

    result = services.node_register(
        name="sourced",
        address="10.0.0.31:50051",
        labels={"zone": "eu-1", "tier": "bronze"},
        node_credential=TEST_CREDENTIAL,
    )
    services.node_labels_merge(node=result.node, labels={"tier": "gold", "team": "ml"})
    node = result.node
    page.goto("/ui/nodes/")
    page.get_by_role("button", name="sourced", exact=True).click()
    page.locator(f"#node-{node.pk}-drawer summary").click()
    chips = page.locator(f"#node-{node.pk}-labels li")
    expect(chips.filter(has_text="zone=eu-1").locator("[data-label-source]")).to_have_text("worker")
    expect(chips.filter(has_text="tier=gold").locator("[data-label-source]")).to_have_text("admin")
    expect(chips.filter(has_text="team=ml").locator("[data-label-source]")).to_have_text("admin")
    expect(chips.filter(has_text="node.name=sourced").locator("[data-label-source]")).to_have_text("auto")
    expect(chips.filter(has_text="tier=bronze")).to_have_count(0)
    screenshot(page.locator(f"#node-{node.pk}-labels"), "nodes-label-sources")


@pytest.mark.parametrize("width, height", [(375, 812), (1920, 1080)])
def test_the_page_and_its_drawer_fit_narrow_and_wide_screens(page, width, height) -> None:
    gpu = NodeFactory(name="gpu-wide-labels", total_vram=80 * GiB, available_vram=30 * GiB, backends=["echo"])
    for key, value in [("gpu.vendor", "nvidia"), ("zone", "eu-west-1-long-zone-name"), ("rack", "r12")]:
        NodeLabelFactory(node=gpu, key=key, value=value)
    ReplicaFactory(node=gpu, model_name="org/qwen3-8b-instruct:q4_k_m", replica_index=0, in_flight=2)
    NodeFactory(name="cpu-c", status="draining")
    NodeFactory(name="new-d", status="pending", approved_at=None)
    page.set_viewport_size({"width": width, "height": height})
    page.goto("/ui/nodes/")
    page.get_by_role("button", name="gpu-wide-labels", exact=True).click()
    replicas = page.locator(f"#node-{gpu.pk}-replicas")
    expect(replicas.get_by_role("button", name="Unload org/qwen3-8b-instruct:q4_k_m#0")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for name in ("Actions for gpu-wide-labels", "Approve"):
        box = page.get_by_role("button", name=name).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, name
    page.evaluate("window.scrollTo(0, 0)")  # the sticky top bar at the top of the full-page picture
    screenshot(page, f"nodes-{width}", full_page=True)
