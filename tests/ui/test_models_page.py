"""The models page (`/ui/models/`): the catalog with each model's routing policy, and the model form that
sets it (issue 14)."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from scheduling.models import ModelConfig
from tests.factories import ModelConfigFactory
from tests.ui.conftest import HTMX

pytestmark = pytest.mark.django_db


def test_the_table_shows_each_models_policy(staff_client: Client) -> None:
    ModelConfigFactory(name="chat-a", routing="prefix_cache")
    ModelConfigFactory(name="chat-b", routing="session")
    html = staff_client.get("/ui/models/").content.decode()
    assert 'data-routing="prefix_cache">Prefix cache<' in html
    assert 'data-routing="session">Session<' in html


def test_the_form_sets_the_policy_and_refuses_bad_input(staff_client: Client) -> None:
    ModelConfigFactory(name="chat-a", routing="least_in_flight")
    form = staff_client.get("/ui/models/?model=chat-a", **HTMX).content.decode()
    assert 'id="model-routing-least_in_flight" name="routing" value="least_in_flight" checked' in form
    saved = staff_client.post("/ui/models/save", {"name": "chat-a", "routing": "prefix_cache"}, **HTMX)
    assert saved.status_code == 200
    assert json.loads(saved["HX-Trigger"])["toast"]["message"] == "chat-a now routes by prefix cache."
    assert 'data-routing="prefix_cache"' in saved.content.decode()
    assert ModelConfig.objects.get(name="chat-a").routing == "prefix_cache"
    bad = staff_client.post("/ui/models/save", {"name": "chat-a", "routing": "random"}, **HTMX)
    assert bad.status_code == 422 and ModelConfig.objects.get(name="chat-a").routing == "prefix_cache"
    missing = staff_client.post("/ui/models/save", {"name": "nope", "routing": "session"}, **HTMX)
    assert missing.status_code == 422 and "nope is not in the catalog." in missing.content.decode()


def test_staff_only(client: Client) -> None:
    assert client.get("/ui/models/").status_code == 302
    assert client.post("/ui/models/save", {"name": "x", "routing": "session"}).status_code in (302, 403)
