"""The overview in Chromium (issue 17 items 3 and 6): the last hour's charts drawn by the vendored uPlot from
the stored samples, refreshed without reloading the page; the nodes page one click away; 375 and 1,920 px."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from console.models import MetricSample
from tests.browser.conftest import screenshot
from tests.factories import NodeFactory

pytestmark = pytest.mark.browser

GIB = 1024**3


def samples(count: int, *, names: list[str], end=None) -> None:
    end = end or timezone.now()
    for index in range(count):
        wave = (index % 12) / 12
        MetricSample.objects.create(
            at=end - timedelta(seconds=15 * (count - index)),
            interval_seconds=15,
            requests=int(150 + 120 * wave),
            errors=(index % 7 == 0 and 3) or 0,
            latency_p50_ms=40 + 30 * wave,
            latency_p99_ms=180 + 200 * wave,
            in_flight=int(4 + 6 * wave),
            loaded_replicas=3 + (index > count // 2),
            nodes={
                name: {
                    "used": int((6 + 8 * wave + 4 * n) * GIB),
                    "reserved": int((2 + n) * GIB),
                    "total": 24 * GIB,
                }
                for n, name in enumerate(names)
            },
        )


def test_charts_draw_and_refresh_without_a_reload(page, settings) -> None:
    settings.LOCALAI_HEALTH_CHECK_INTERVAL = 5  # the page refreshes every 5 s
    names = [
        NodeFactory(name="gpu-01", total_vram=24 * GIB).name,
        NodeFactory(name="gpu-02", total_vram=24 * GIB).name,
    ]
    samples(200, names=names)
    page.goto("/ui/")
    charts = page.locator("#charts")
    expect(charts).to_have_attribute("data-samples", "200")
    expect(page.locator("[data-chart] canvas")).to_have_count(6)
    expect(page.locator('[data-chart="vram"] .u-legend')).to_contain_text("gpu-02 reserved")
    expect(page.locator('[data-now="latency"]')).to_contain_text("p99")
    expect(page.locator('[data-now="vram"]')).to_contain_text("gpu-01")
    page.evaluate("window.__notReloaded = true")
    latest = MetricSample.objects.order_by("-at").first()
    latest.pk, latest.at = None, timezone.now()
    latest.save()
    expect(charts).to_have_attribute("data-samples", "201", timeout=30_000)
    assert page.evaluate("window.__notReloaded === true")
    page.set_viewport_size({"width": 1920, "height": 1080})
    screenshot(page, "overview-1920", full_page=True)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Nodes").click()
    expect(page).to_have_url(f"{page.url.split('/ui/')[0]}/ui/nodes/")


def test_no_samples_yet_says_so(page) -> None:
    page.goto("/ui/")
    expect(page.locator("#charts-state")).to_have_text(
        "No samples yet: the first one is stored by the next health tick."
    )


def test_fits_a_narrow_screen(page) -> None:
    names = [NodeFactory(name=f"gpu-{index}", total_vram=24 * GIB).name for index in range(3)]
    samples(120, names=names)
    page.set_viewport_size({"width": 375, "height": 812})
    page.goto("/ui/")
    expect(page.locator("#charts")).to_have_attribute("data-samples", "120")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    box = page.locator('[data-chart="rps"] canvas').bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375
    screenshot(page, "overview-375", full_page=True)
