"""Playwright driving Debian's Chromium (no browser download) against the live control plane (`cp_server`),
signed in as a staff user. Screenshots go to `test-artifacts/screenshots/`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from tests.ui.agents import start_agent_node  # noqa: F401  (a fixture: a node row with a real agent)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("LOCALAI_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


@pytest.fixture
def browser(django_db_setup, monkeypatch):
    """Chromium for one test. Playwright's sync API keeps an event loop running in this thread while it is
    open, so the ORM calls of the test (factories, assertions) are allowed here explicitly; the browser is
    closed after each test so that no other test runs under that permission."""
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("LOCALAI_REQUIRE_BROWSER"):
            pytest.fail(message)  # CI: a missing browser is a failure, not a skip
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def staff_session(transactional_db) -> str:
    """The session cookie of a freshly signed-in staff user."""
    user = get_user_model().objects.create_user("ops", password="pw-ops-123", is_staff=True)
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@pytest.fixture
def page(browser, cp_server, staff_session) -> Iterator:
    """A page of a fresh browser context signed in as staff; `page.base_url` is the server's URL."""
    context = browser.new_context(base_url=cp_server.url, viewport={"width": 1360, "height": 900})
    context.add_cookies([{"name": "sessionid", "value": staff_session, "url": cp_server.url}])
    context.set_default_timeout(10_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.js_errors = errors
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def screenshot(page, name: str, **kwargs) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), **kwargs)
    return path
