"""The models page in Chromium against a real agent with echo backends (issue 17 items 1 and 6): add a model,
"load one now" and watch it become loaded on the agent's node, "unload all" with confirmation, the
missing-backend warning, delete with confirmation; by keyboard where it matters; at 375 and 1,920 px."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from nodes.models import ModelReplica
from scheduling.models import ModelConfig
from tests.browser.conftest import screenshot
from tests.browser.test_console_a11y import UNLABELLED
from tests.conftest import wait_until
from tests.e2e.gateway_support import start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory, NodeFactory, ReplicaFactory, RuleFactory

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def open_models(page) -> None:
    """The page, waited for generously: on a machine shared by many test runs a first navigation to a fresh
    server can take longer than the context's 10 s default."""
    page.goto("/ui/models/", timeout=60_000)


def confirm(page, text: str, action: str) -> None:
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(text)
    dialog.get_by_role("button", name=action).click()


def test_add_load_unload_warn_and_delete_with_a_real_agent(page, start_agents) -> None:
    (agent,) = start_agents(1)
    assert agent.node().backends == ["echo"]
    open_models(page)

    # Add a model through the form; the backend field offers what the agent reported.
    page.get_by_role("button", name="+ Add model").click()
    expect(page.get_by_label("Name")).to_be_focused()
    page.keyboard.type("pw-echo")
    expect(page.locator("#model-backends option[value=echo]")).to_have_count(1)
    page.get_by_label("Backend").fill("echo")
    page.get_by_label("Context size").fill("2048")
    page.get_by_role("button", name="Add model", exact=True).click()
    row = page.locator('tr[data-model="pw-echo"]')
    expect(row).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="Model pw-echo added.")).to_be_visible()
    expect(page.locator("#model-form")).to_have_count(0)  # the form closed
    expect(row.locator("[data-replica-summary]")).to_contain_text("None loaded")

    # Load one now: placed through the pipeline on the agent's node; the row shows it loaded and the decision.
    row.get_by_role("button", name="Load one now pw-echo").click()
    loaded = row.locator('[data-replica="pw-echo#0"][data-state="loaded"]')
    expect(loaded).to_be_visible(timeout=60_000)
    expect(loaded).to_contain_text(agent.name)
    expect(row.locator("[data-decision] [data-outcome]")).to_have_text("Placed")
    expect(row.locator("[data-decision]")).to_contain_text(f"on {agent.name}")
    expect(row.locator("[data-decision]")).to_contain_text("admin")
    expect(page.get_by_role("status").filter(has_text=f"Loaded pw-echo#0 on {agent.name}")).to_be_visible()
    replica = ModelReplica.objects.get(model_name="pw-echo")
    assert replica.state == "loaded" and replica.node.name == agent.name
    assert [p.process_key for p in agent.processes()] == ["pw-echo#0"]
    screenshot(page, "models-loaded-1920", full_page=True)

    # Unload all, with confirmation: the row empties and the agent stops the process.
    row.get_by_role("button", name="Unload all replicas of pw-echo").click()
    confirm(page, "Unload all 1 replica of pw-echo?", "Unload all")
    expect(row.locator("[data-replica-summary]")).to_contain_text("None loaded")
    expect(
        page.get_by_role("status").filter(has_text="Unloaded 1 replica of pw-echo from 1 node.")
    ).to_be_visible()
    assert not ModelReplica.objects.filter(model_name="pw-echo").exists()
    wait_until(lambda: agent.processes() == [], timeout=30, message="the agent to stop pw-echo#0")

    # A model whose backend no node offers: a warning on the page and on its row.
    page.get_by_role("button", name="+ Add model").click()
    page.get_by_label("Name").fill("pw-llama")
    page.get_by_label("Backend").fill("llama-cpp")
    page.get_by_role("button", name="Add model", exact=True).click()
    warning = page.locator("[data-missing-backends]")
    expect(warning).to_contain_text("pw-llama needs llama-cpp")
    expect(page.locator('tr[data-model="pw-llama"] [data-backend-missing]')).to_be_visible()
    expect(page.locator('tr[data-model="pw-echo"] [data-backend-missing]')).to_have_count(0)

    # Delete with confirmation, by keyboard: Cancel first keeps it, then Delete removes it.
    delete = page.get_by_role("button", name="Delete pw-llama")
    delete.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#confirm-dialog")).to_contain_text("Delete pw-llama from the catalog?")
    page.keyboard.press("Escape")
    expect(page.locator("#confirm-dialog")).not_to_be_visible()
    assert ModelConfig.objects.filter(name="pw-llama").exists()
    delete.focus()
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    expect(page.locator("#confirm-dialog").get_by_role("button", name="Delete")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator('tr[data-model="pw-llama"]')).to_have_count(0)
    expect(page.locator("[data-missing-backends]")).to_have_count(0)
    assert not ModelConfig.objects.filter(name="pw-llama").exists()

    # Each action of the flow is on the audit page, by the signed-in user, newest first.
    page.goto("/ui/audit/?target_type=model")
    rows = page.locator("tr[data-audit-entry]")
    expected = [
        ("model.delete", "pw-llama"),
        ("model.create", "pw-llama"),
        ("model.unload_all", "pw-echo"),
        ("model.load_now", "pw-echo"),
        ("model.create", "pw-echo"),
    ]
    expect(rows).to_have_count(len(expected))
    for index, (action, target) in enumerate(expected):
        expect(rows.nth(index)).to_contain_text(action)
        expect(rows.nth(index)).to_contain_text(target)
        expect(rows.nth(index)).to_contain_text("ops")


def test_load_one_now_refused_shows_every_nodes_verdict(page) -> None:
    ModelConfigFactory(name="nowhere")
    NodeFactory(name="drained-1", status="draining")
    open_models(page)
    row = page.locator('tr[data-model="nowhere"]')
    row.get_by_role("button", name="Load one now nowhere").click()
    expect(row.locator("[data-decision] [data-outcome]")).to_have_text("No capacity")
    expect(row.locator("[data-refusal]")).to_contain_text("drained-1: draining")
    expect(
        page.get_by_role("status").filter(has_text="nowhere not loaded: cannot place nowhere")
    ).to_be_visible()


def test_the_model_form_sets_the_routing_policy(page) -> None:
    ModelConfigFactory(name="chat-a", backend="echo")
    open_models(page)
    row = page.locator('tr[data-model="chat-a"]')
    row.get_by_role("button", name="Edit chat-a").click()
    policy = page.get_by_label("Routing policy")
    expect(policy).to_have_value("least_in_flight")
    policy.select_option("prefix_cache")
    screenshot(page, "models-form-routing-1920")
    page.get_by_role("button", name="Save model").click()
    expect(page.get_by_role("status").filter(has_text="Model chat-a saved")).to_be_visible()
    expect(row).to_contain_text("prefix_cache")
    assert ModelConfig.objects.get(name="chat-a").routing == "prefix_cache"


def test_import_yaml_by_upload(page, tmp_path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "- name: imported-a\n  backend: echo\n- name: imported-b\n  backend: echo\n  context_size: 1024\n"
    )
    open_models(page)
    page.get_by_role("button", name="Import YAML").click()
    expect(page.get_by_label("YAML files")).to_be_focused()
    page.get_by_label("YAML files").set_input_files(str(path))
    page.get_by_role("button", name="Import", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="Imported 2 models")).to_be_visible()
    expect(page.locator('tr[data-model="imported-b"]')).to_contain_text("ctx 1024")
    page.get_by_role("button", name="+ Add model").click()
    expect(page.get_by_label("Name")).to_be_focused()
    assert page.evaluate(UNLABELLED) == []  # the add form, the import form and the table's buttons
    bad = tmp_path / "bad.yaml"
    bad.write_text("backend: echo\n")
    page.get_by_label("YAML files").set_input_files(str(bad))
    page.get_by_role("button", name="Import", exact=True).click()
    expect(page.locator("#model-import [role=alert]")).to_contain_text("bad.yaml: 'name'")


@pytest.mark.parametrize("width, height", [(375, 812), (1920, 1080)])
def test_the_page_fits_narrow_and_wide_screens(page, width, height) -> None:
    nodes = [NodeFactory(name=f"gpu-{i}", worker_max_replicas_per_model=2) for i in range(3)]
    ModelConfigFactory(
        name="org/qwen3-8b:q4",
        backend="llama-cpp",
        model="qwen3-8b-q4_k_m.gguf",
        vram_bytes=6 * 1024**3,
        context_size=8192,
    )
    ModelConfigFactory(name="echo-1", backend="echo")
    RuleFactory(model_name="echo-1", min_replicas=2, node_selector={"gpu.vendor": "nvidia"})
    for index, node in enumerate(nodes[:2]):
        ReplicaFactory(node=node, model_name="echo-1", replica_index=0, in_flight=index)
    ReplicaFactory(node=nodes[2], model_name="echo-1", replica_index=0, state="loading")
    page.set_viewport_size({"width": width, "height": height})
    open_models(page)
    row = page.locator('tr[data-model="echo-1"]')
    row.get_by_role("button", name="Load one now echo-1").click()
    expect(row.locator("[data-decision] [data-outcome]")).to_be_visible()
    expect(page.locator("[data-missing-backends]")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for name in ("+ Add model", "Load one now echo-1", "Unload all replicas of echo-1", "Delete echo-1"):
        box = page.get_by_role("button", name=name).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, name
    screenshot(page, f"models-{width}", full_page=True)
