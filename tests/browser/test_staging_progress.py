"""A replica's download progress in Chromium (issue 15): the nodes drawer and the logs page show a bar and the
rate, and both move as the agent's reports arrive (posted through `replica_download_progress`, the service behind
`POST /api/node/{id}/downloads`)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from nodes.services import replica_download_progress
from tests.browser.conftest import screenshot
from tests.factories import ModelConfigFactory, NodeFactory, claim_row

pytestmark = pytest.mark.browser
MiB = 1024 * 1024
SHA = "ab" * 32


def report(node, done: int, rate: int) -> None:
    replica_download_progress(
        node=node,
        reports=[
            {"key": "llama-8b#0", "state": "downloading", "bytes": done, "total": 400 * MiB, "rate": rate}
        ],
    )


def test_the_progress_bar_moves_in_the_drawer_and_on_the_logs_page(page) -> None:
    node = NodeFactory(name="gpu-stage", total_vram=24 * 1024**3, available_vram=24 * 1024**3)
    claim_row(node_id=node.pk, model_name="llama-8b", vram_bytes=6 * 1024**3, artifacts=frozenset({SHA}))
    report(node, 60 * MiB, 45 * MiB)

    page.goto("/ui/nodes/")
    page.get_by_role("button", name="gpu-stage", exact=True).click()
    row = page.locator('[data-process-key="llama-8b#0"]')
    expect(row.locator(".pill")).to_have_text("Downloading")
    bar = row.locator("[data-staging] progress")
    expect(bar).to_have_attribute("value", "0.150")
    expect(row.locator("[data-staging-text]")).to_contain_text("15% · 60.0 MB of 400.0 MB · 45.0 MB/s")
    screenshot(page, "staging-drawer-15")

    report(node, 260 * MiB, 52 * MiB)
    expect(bar).to_have_attribute("value", "0.650", timeout=20_000)  # the drawer polls every second meanwhile
    expect(row.locator("[data-staging-text]")).to_contain_text("65% · 260.0 MB of 400.0 MB · 52.0 MB/s")
    screenshot(page, "staging-drawer-65")

    page.goto(f"/ui/nodes/{node.pk}/logs/llama-8b%230")
    panel = page.locator("#staging-panel")
    expect(panel.locator("progress")).to_have_attribute("value", "0.650", timeout=20_000)
    report(node, 380 * MiB, 50 * MiB)
    expect(panel.locator("progress")).to_have_attribute("value", "0.950", timeout=20_000)
    expect(panel).to_contain_text("95% · 380.0 MB of 400.0 MB · 50.0 MB/s")
    screenshot(page, "staging-logs-95")

    replica_download_progress(node=node, reports=[{"key": "llama-8b#0", "state": "loading"}])
    expect(panel).to_contain_text("Files in place · loading", timeout=20_000)


def test_the_progress_bar_moves_on_the_models_page(page) -> None:
    """The models page lists each replica of a model with its state: a replica staging its files shows the
    same bar and rate, and the table polls every second while one does."""
    ModelConfigFactory(name="llama-8b", backend="echo")
    node = NodeFactory(name="gpu-stage", total_vram=24 * 1024**3, available_vram=24 * 1024**3)
    claim_row(node_id=node.pk, model_name="llama-8b", vram_bytes=6 * 1024**3, artifacts=frozenset({SHA}))
    report(node, 100 * MiB, 40 * MiB)

    page.goto("/ui/models/", timeout=60_000)
    replica = page.locator('tr[data-model="llama-8b"] [data-replica="llama-8b#0"]')
    expect(replica).to_have_attribute("data-state", "downloading")
    bar = replica.locator("[data-staging] progress")
    expect(bar).to_have_attribute("value", "0.250")
    expect(replica.locator("[data-staging-text]")).to_contain_text("25% · 100.0 MB of 400.0 MB · 40.0 MB/s")
    expect(page.locator('tr[data-model="llama-8b"] [data-replica-summary]')).to_contain_text("1 downloading")

    report(node, 300 * MiB, 48 * MiB)
    expect(bar).to_have_attribute("value", "0.750", timeout=20_000)
    expect(replica.locator("[data-staging-text]")).to_contain_text("75% · 300.0 MB of 400.0 MB · 48.0 MB/s")
    screenshot(page, "staging-models-75")
