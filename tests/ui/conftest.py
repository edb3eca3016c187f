"""Fixtures of the operator page tests: a staff user and its client."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from tests.ui.agents import start_agent_node  # noqa: F401  (a fixture: a node row with a real agent)

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def staff_user(db):
    return get_user_model().objects.create_user("ops", password="pw-ops-123", is_staff=True)


@pytest.fixture
def staff_client(staff_user) -> Client:
    client = Client()
    client.force_login(staff_user)
    return client


@pytest.fixture
def plain_client(db) -> Client:
    """Signed in, but not staff."""
    user = get_user_model().objects.create_user("viewer", password="pw-viewer-123")
    client = Client()
    client.force_login(user)
    return client
