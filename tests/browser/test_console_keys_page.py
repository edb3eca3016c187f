"""The API keys page in Chromium (issue 17 items 4 and 6): a key created on the page works against the live
gateway, revoking it on the page makes the gateway refuse it; by keyboard alone, at 375 and 1,920 px."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from nodes.apikeys import api_key_create
from nodes.models import ApiKey
from tests.browser.conftest import screenshot

pytestmark = pytest.mark.browser


def models_status(cp_server, key: str) -> int:
    response = httpx.get(f"{cp_server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return response.status_code


def test_create_use_and_revoke_a_key_by_keyboard(page, cp_server) -> None:
    api_key_create(name="existing-admin", is_admin=True)
    page.goto("/ui/keys/")
    page.get_by_label("Name").focus()
    page.keyboard.type("playwright-client")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Scope")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Create key")).to_be_focused()
    page.keyboard.press("Enter")

    created = page.locator("[data-created-key]")
    expect(created).to_contain_text("Key playwright-client created")
    expect(page.get_by_label("New API key")).to_be_focused()  # keyboard users land on the new key
    raw = page.get_by_label("New API key").input_value()
    assert raw.startswith("lac_")
    expect(page.locator('tr[data-key="playwright-client"]')).to_contain_text("inference")
    created.get_by_role("button", name="Copy").click()
    expect(page.locator("#copy-state")).not_to_be_empty()
    screenshot(page, "keys-created-1920", full_page=True)

    assert models_status(cp_server, raw) == 200

    row = page.locator('tr[data-key="playwright-client"]')
    row.get_by_role("button", name="Revoke key playwright-client").focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Revoke the key playwright-client?")
    page.keyboard.press("Tab")
    expect(dialog.get_by_role("button", name="Revoke")).to_be_focused()
    page.keyboard.press("Enter")
    expect(row.locator("[data-status]")).to_contain_text("revoked")
    expect(page.get_by_role("status").filter(has_text="Key playwright-client revoked.")).to_be_visible()
    expect(row.get_by_role("button")).to_have_count(0)
    assert ApiKey.objects.get(name="playwright-client").revoked_at is not None

    assert models_status(cp_server, raw) == 401

    # Both actions are on the audit page, by the signed-in user (the first key was made by this test's code).
    page.goto("/ui/audit/?target_type=api_key")
    rows = page.locator("tr[data-audit-entry]").filter(has_text="playwright-client")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("api_key.revoke")
    expect(rows.nth(1)).to_contain_text("api_key.create")
    for index in (0, 1):
        expect(rows.nth(index)).to_contain_text("ops")


def test_an_invalid_name_is_reported_at_the_form(page) -> None:
    page.goto("/ui/keys/")
    page.get_by_label("Name").fill("tab\tinside")
    page.get_by_role("button", name="Create key").click()
    form = page.locator("#key-create")
    expect(form.get_by_role("alert")).to_contain_text("Control characters are not allowed")
    expect(page.get_by_label("Name")).to_have_attribute("aria-invalid", "true")
    assert not ApiKey.objects.exists()


@pytest.mark.parametrize("width, height", [(375, 812), (1920, 1080)])
def test_the_page_fits_narrow_and_wide_screens(page, width, height) -> None:
    for index in range(4):
        key, _ = api_key_create(name=f"service-{index}", is_admin=index == 0)
    ApiKey.objects.filter(name="service-3").update(revoked_at=key.created_at)
    page.set_viewport_size({"width": width, "height": height})
    page.goto("/ui/keys/")
    page.get_by_label("Name").fill("mobile")
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("[data-created-key]")).to_be_visible()
    # Nothing wider than the screen: no horizontal scrolling of the page.
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for name in ("Create key", "Copy", "Revoke key service-0"):
        box = page.get_by_role("button", name=name).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, name
    screenshot(page, f"keys-{width}", full_page=True)
