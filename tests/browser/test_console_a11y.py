"""Every control of the console pages has a label, and the pages' actions work from the keyboard (issue 17
item 6)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from nodes.apikeys import api_key_create
from tests.factories import ModelConfigFactory

pytestmark = pytest.mark.browser

UNLABELLED = """() => Array.from(document.querySelectorAll('main input:not([type=hidden]), main select, main textarea, main button'))
  .filter((el) => {
    const name = (el.labels && el.labels.length && el.labels[0].textContent.trim())
      || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
      || (el.tagName === 'BUTTON' && el.textContent.trim());
    return !name;
  })
  .map((el) => el.outerHTML.slice(0, 120))"""


@pytest.mark.parametrize(
    "path",
    ["/ui/", "/ui/nodes/", "/ui/scheduling/", "/ui/keys/", "/ui/playground/", "/ui/audit/", "/ui/models/"],
)
def test_every_control_has_a_label(page, path) -> None:
    ModelConfigFactory(name="echo-a")
    api_key_create(name="some-key")
    page.goto(path)
    assert page.evaluate(UNLABELLED) == []


def test_the_playground_modes_switch_by_keyboard(page) -> None:
    ModelConfigFactory(name="echo-a")
    page.goto("/ui/playground/")
    page.get_by_label("Model").focus()
    page.keyboard.press("Tab")
    expect(page.locator("#pg-mode-chat")).to_be_focused()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#pg-mode-embeddings")).to_be_checked()
    expect(page.get_by_label("First text")).to_be_visible()
    expect(page.get_by_label("Message")).to_be_hidden()
    page.keyboard.press("ArrowLeft")
    expect(page.get_by_label("Message")).to_be_visible()
