"""Clients for the admin API: admin key, inference-only key, staff and non-staff sessions, node token."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from nodes.apikeys import api_key_create
from nodes.models import Node
from nodes.tokens import new_token_salt, node_token_for, token_hash
from tests.factories import NodeFactory


def bearer_client(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.fixture
def admin_key(db) -> str:
    return api_key_create(name="ops", is_admin=True)[1]


@pytest.fixture
def inference_key(db) -> str:
    return api_key_create(name="app", is_admin=False)[1]


@pytest.fixture
def api(admin_key) -> APIClient:
    """A client with an admin API key."""
    return bearer_client(admin_key)


@pytest.fixture
def inference_client(inference_key) -> APIClient:
    return bearer_client(inference_key)


@pytest.fixture
def staff_user(db):
    return get_user_model().objects.create_user("staff", password="pw-staff-123", is_staff=True)


@pytest.fixture
def staff_client(staff_user) -> APIClient:
    """A staff session that must present a CSRF token on unsafe methods, as a browser would."""
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(staff_user)
    return client


@pytest.fixture
def user_client(db) -> APIClient:
    client = APIClient()
    client.force_login(get_user_model().objects.create_user("plain", password="pw-plain-123"))
    return client


def give_token(node: Node) -> str:
    """Issue a node token the way registration does, and answer it."""
    node.token_salt = new_token_salt()
    token = node_token_for(node)
    node.token_hash = token_hash(token)
    node.save(update_fields=["token_salt", "token_hash"])
    return token


@pytest.fixture
def node_token_client(db) -> APIClient:
    return bearer_client(give_token(NodeFactory()))


# Agent-spawning fixtures (`start_agent`, `control_plane`, ...) for the logs tests against a real agent.
from tests.e2e.conftest import backends_config, control_plane, start_agent  # noqa: E402, F401
