"""Authentication of the worker self-service API (`/api/node/*`).

- Registration presents `Authorization: Bearer <LOCALAI_REGISTRATION_TOKEN>` (constant-time compare). With
  the setting empty, registration is open (a system check warns about it).
- Every later call presents the node's own token. The order of the answers: no bearer credential → 401; an
  unknown node id → 404 (also the answer an agent gets after an admin deleted its node, so it registers
  again); the node's current token → accepted (`request.auth` is the `Node`); another node's current token →
  403; anything else (a revoked or made-up token) → 401.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from nodes.models import Node
from nodes.selectors import node_get
from nodes.tokens import node_token_matches, token_hash

NODE_ID_KWARG = "node_id"


def bearer_token(request: Request) -> str | None:
    """The value of `Authorization: Bearer <value>`; None when there is no usable bearer credential."""
    parts = authentication.get_authorization_header(request).split()
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    try:
        return parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None


class RegistrationTokenAuthentication(authentication.BaseAuthentication):
    """`Bearer <LOCALAI_REGISTRATION_TOKEN>`; everything is let in when the setting is empty."""

    def authenticate(self, request: Request) -> tuple[None, None]:
        expected = settings.LOCALAI_REGISTRATION_TOKEN
        if not expected:
            return None, None
        presented = bearer_token(request)
        if presented is None:
            raise exceptions.NotAuthenticated("A registration token is required (Authorization: Bearer).")
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise exceptions.AuthenticationFailed("Invalid registration token.")
        return None, None

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="node-registration"'


class NodeTokenAuthentication(authentication.BaseAuthentication):
    """The node token of the node named by the route's `node_id`; `request.auth` is that `Node`."""

    def authenticate(self, request: Request) -> tuple[None, Node]:
        presented = bearer_token(request)
        if presented is None:
            raise exceptions.NotAuthenticated("This node's token is required (Authorization: Bearer).")
        node_id = (request.parser_context or {}).get("kwargs", {}).get(NODE_ID_KWARG)
        node = node_get(node_id=node_id) if node_id is not None else None
        if node is None:
            raise exceptions.NotFound("Unknown node: register again.")
        if node_token_matches(node, presented):
            return None, node
        if Node.objects.filter(token_hash=token_hash(presented)).exclude(token_hash="").exists():
            raise exceptions.PermissionDenied("This token belongs to another node.")
        raise exceptions.AuthenticationFailed("Invalid or revoked node token: register again.")

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="node"'


class RegistrationTokenScheme(OpenApiAuthenticationExtension):
    target_class = "nodes.api.auth.RegistrationTokenAuthentication"
    name = "registrationToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "LOCALAI_REGISTRATION_TOKEN (not needed while the setting is empty).",
        }


class NodeTokenScheme(OpenApiAuthenticationExtension):
    target_class = "nodes.api.auth.NodeTokenAuthentication"
    name = "nodeToken"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "The node token returned by registration."}
