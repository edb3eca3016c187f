"""Per-node credentials, derived from `SECRET_KEY` so nothing secret is stored in clear.

- The **node token** authenticates a worker's calls to `/api/node/{id}/*` and the control plane's calls to
  the agent's WorkerControl service. It depends on the node's `token_salt`, which changes at every
  registration, so registering again invalidates the previous token. Only its SHA-256 is stored.
- The **backend token** is what the agent gives its backend processes (`LOCALAI_GRPC_AUTH_TOKEN`) and the
  gateway presents to them. It is stable for the node's lifetime.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from django.conf import settings

from nodes.models import Node


def _hmac_token(message: str) -> str:
    digest = hmac.new(settings.SECRET_KEY.encode(), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_token_salt() -> str:
    """A fresh random salt; storing it on the node revokes the previous node token."""
    return secrets.token_hex(16)


def token_hash(token: str) -> str:
    """What is stored in `Node.token_hash`: the SHA-256 of the token, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def node_token_for(node: Node) -> str:
    """The node's current token: HMAC-SHA256(SECRET_KEY, "node-token:<id>:<salt>"), urlsafe base64."""
    return _hmac_token(f"node-token:{node.id}:{node.token_salt}")


def node_token_matches(node: Node, token: str) -> bool:
    """Whether `token` is the node's current token (constant-time; a node without a token matches nothing)."""
    if not node.token_hash or not token:
        return False
    return hmac.compare_digest(token_hash(token), node.token_hash)


def backend_token_for(node: Node) -> str:
    """The token the node's backends require: HMAC-SHA256(SECRET_KEY, "backend-token:<id>"), stable per node."""
    return _hmac_token(f"backend-token:{node.id}")
