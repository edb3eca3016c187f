"""`/api/docs/` renders every route of the OpenAPI schema, from assets served by the control plane itself."""

from __future__ import annotations

import httpx
import pytest

from tests.browser.conftest import screenshot

pytestmark = pytest.mark.browser


def test_api_docs_render_every_operation(page, cp_server):
    schema = httpx.get(f"{cp_server.url}/api/schema/?format=json", timeout=30).json()
    operations = {
        (method.upper(), path)
        for path, item in schema["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    page.goto("/api/docs/")
    page.locator(".opblock").first.wait_for()
    rendered = page.locator(".opblock").count()
    screenshot(page, "api-docs")

    assert rendered == len(operations) > 25
    assert all(url.startswith(cp_server.url) for url in requested), "the docs page must not need the internet"
