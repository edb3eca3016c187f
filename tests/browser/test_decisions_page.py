"""Placement decisions as the operator sees them (issue 13): the decisions page with its filters, the
scheduling page's per-node reasons for a short rule, the drawer's "placed by" per replica."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from nodes.models import Node
from scheduling.placement import NoCapacity
from scheduling.reconciler import reconcile_tick
from scheduling.services import replica_place
from tests.browser.conftest import screenshot
from tests.factories import (
    GiB,
    ModelConfigFactory,
    NodeFactory,
    NodeLabelFactory,
    ReplicaFactory,
    RuleFactory,
)
from tests.scheduling.fake_agent import FakeAgent, FakeAgentServer

pytestmark = pytest.mark.browser


@pytest.fixture
def agent():
    fake = FakeAgent()
    with FakeAgentServer(fake) as server:
        fake.address = server.address
        yield fake


def cluster(agent):
    """gpu-3 lacks the label, gpu-4 has no free slot, gpu-5 has 5.2 GiB free for an 8 GiB model; gpu-1
    takes `small` models."""

    def gpu(name, vram_gib, cap=1, label="a100"):
        node = NodeFactory(
            name=name,
            address=agent.address,
            total_vram=vram_gib * GiB,
            available_vram=vram_gib * GiB,
            worker_max_replicas_per_model=cap,
        )
        NodeLabelFactory(node=node, key="gpu", value=label)
        return node

    gpu("gpu-3", 40, label="h100")
    full = gpu("gpu-4", 40, cap=2)
    ReplicaFactory(node=full, model_name="big", replica_index=0)
    ReplicaFactory(node=full, model_name="big", replica_index=1)
    small = gpu("gpu-5", 10)
    small.reserved_vram = GiB * 48 // 10
    small.save()
    ModelConfigFactory(name="big", vram_bytes=8 * GiB)
    RuleFactory(model_name="big", node_selector={"gpu": "a100"}, min_replicas=3)
    ModelConfigFactory(name="small", vram_bytes=GiB)
    RuleFactory(model_name="small", node_selector={"gpu": "h100"}, min_replicas=1)


def test_scheduling_page_shows_why_a_rule_is_short(page, agent) -> None:
    cluster(agent)
    reconcile_tick()  # places small on gpu-3; big stays at 2 of 3 and records why
    page.goto("/ui/scheduling/")
    why = page.locator('tr[data-rule="big"] [data-why]')
    expect(why).to_have_text(
        "2 of 3: gpu-3: selector gpu=a100 missing; gpu-4: 2/2 slots used; gpu-5: needs 8.0 GiB, 5.2 GiB free"
    )
    expect(page.locator('tr[data-rule="small"] [data-why]')).to_have_count(0)
    expect(page.locator('tr[data-rule="big"] [data-status]')).to_have_text("Short")
    screenshot(page, "scheduling-why-short", full_page=True)
    page.locator('tr[data-rule="big"]').get_by_role("link", name="Decisions for big").click()
    expect(page).to_have_url("/ui/decisions/?model=big")
    rows = page.locator("tr[data-decision]")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("No capacity")


def test_decisions_page_filters_and_shows_every_verdict(page, agent) -> None:
    cluster(agent)
    reconcile_tick()
    with pytest.raises(NoCapacity):  # a request's placement of one more: gpu-3's only slot is taken
        replica_place(model_name="small")
    page.goto("/ui/decisions/")
    expect(page.locator("tr[data-decision]")).to_have_count(3)
    page.get_by_label("Outcome").select_option("placed")
    expect(page.locator("tr[data-decision]")).to_have_count(1)
    expect(page).to_have_url(re.compile(r"/ui/decisions/\?.*outcome=placed"))  # shareable
    row = page.locator("tr[data-decision]").first
    expect(row).to_contain_text("small")
    expect(row).to_contain_text("gpu-3")
    page.get_by_label("Outcome").select_option("")
    expect(page.locator("tr[data-decision]")).to_have_count(3)
    page.get_by_label("Model").fill("big")
    refused = page.locator('tr[data-decision]:has(td.model-name:text-is("big"))')
    expect(refused).to_have_count(1)
    expect(page.locator("tr[data-decision]")).to_have_count(1)
    refused.locator("summary").click()
    verdicts = refused.locator("[data-verdict]")
    expect(verdicts).to_have_count(3)
    expect(refused.locator('[data-verdict="selector_mismatch"]')).to_contain_text("gpu-3")
    expect(refused.locator('[data-verdict="no_free_slot"]')).to_contain_text("2/2 slots used")
    expect(refused.locator('[data-verdict="not_enough_vram"]')).to_contain_text("needs 8.0 GiB, 5.2 GiB free")
    screenshot(page, "decisions-page", full_page=True)


def test_the_drawer_shows_the_decision_that_placed_each_replica(page, agent) -> None:
    cluster(agent)
    reconcile_tick()
    page.goto(f"/ui/nodes/{Node.objects.get(name='gpu-3').pk}/")
    placed = page.locator('[data-process-key="small#0"] [data-placed-by]')
    expect(placed).to_contain_text("placed by reconciler")
    expect(placed).to_contain_text("chosen over 2 other nodes")
    screenshot(page, "drawer-placed-by")
    placed.click()
    expect(page).to_have_url("/ui/decisions/?model=small&node=gpu-3")
    expect(page.locator("tr[data-decision]")).to_have_count(1)
